"""rows.read_row_batches' fast jsonl path gives exactly what the per-line reader gives.

The reference below is the original reader: json.loads per line, validate_row per row. The fast
path (token arrays parsed in bulk by numpy) must agree on every row, every problem and every
reason, whatever the batch size, including lines built to trip it up.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path

import pyarrow as pa
import pytest

from medmax_pipeline.core import parallel_rows, rows
from medmax_pipeline.core.artifacts import describe_input

TRICKY = [
    '{"text": 123, "task":"a","source":"b","credential":"no"}',
    '{"text": "x", "tokens":[1.0], "task":"a","source":"b","credential":"no"}',
    '{"text": "x", "tokens":[true], "task":"a","source":"b","credential":"no"}',
    '{"text": "x", "tokens":[3000000000], "task":"a","source":"b","credential":"no"}',
    '{"text": "x", "tokens":[99999999999999999999999], "task":"a","source":"b","credential":"no"}',
    '{"text": "x", "tokens":[-5], "task":"a","source":"b","credential":"no"}',
    '{"text": "x", "tokens":"", "task":"a","source":"b","credential":"no"}',
    '{"text": "x", "tokens": null, "task":"a","source":"b","credential":"no"}',
    '{"text": "x", "tokens":[1,null], "task":"a","source":"b","credential":"no"}',
    '{"text": "x", "tokens":[1e2], "task":"a","source":"b","credential":"no"}',
    '{"text": "x", "tokens": [1, 2,], "task":"a","source":"b","credential":"no"}',
    '{"text": "x", "tokens": [+1], "task":"a","source":"b","credential":"no"}',
    '{"text": "x", "tokens": [1 2], "task":"a","source":"b","credential":"no"}',
    '{"text": "x", "text":"y", "task":"a","source":"b","credential":"no"}',
    '{"text": "x", "meta": {"tokens": [5]}, "task":"a","source":"b","credential":"no"}',
    '{"text": "x \\"tokens\\": [9]", "tokens" : [ 1 ,2 ] , "task":"a","source":"tokens","credential":"no", "subject_id": "10000032"}',
    '{"text": "x", "tokens": [], "task":"a","source":"b","credential":"maybe"}',
    '{"text": "x", "task":"a","source":"b","credential":"YES ", "sid": null}',
    '{"text": "x", "tokens": [1, 2], "task":"a","source":"b","credential":"no", "image_path": ""}',
    '{"text": "x", "tokens": [1, 2], "task":"a","credential":"no"}',
    '{"text": "\\u00e9", "tokens": [7], "task":"a","source":"b","credential":"no", "image_path": 5}',
    '{"text": "x", "task":"a","source":"b","credential":"no"} junk',
    '{"text": "x", "tokens": [4, 5], "task":"a","source":"b","credential":"no"',
    "[1, 2]",
    "{not json",
    "",
    "   ",
]


def reference(path: Path, split: str) -> tuple[list[dict], list[tuple[int, str]]]:
    kept, problems = [], []
    for line_no, raw, error in rows._iter_raw_jsonl(path):
        row, reason = (None, error) if error else rows.validate_row(raw)
        if row is None:
            problems.append((line_no, reason))
        else:
            kept.append({"row_id": rows.row_id_for(split, line_no), "split": split, "line": line_no, **row})
    return kept, problems


def read_all(path: Path, split: str, batch_size: int) -> tuple[list[dict], list[tuple[int, str]], list[int]]:
    kept, problems, sizes = [], [], []
    for batch, batch_problems in rows.read_row_batches(path, split, batch_size):
        assert batch.schema.equals(rows.ROW_SCHEMA)
        sizes.append(batch.num_rows + len(batch_problems))
        kept += batch.to_pylist()
        problems += [(p.line, p.reason) for p in batch_problems]
        assert all(p.file == str(path) and p.row_id == f"{split}:{p.line}" for p in batch_problems)
    return kept, problems, sizes


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory) -> Path:
    rng = random.Random(7)
    lines = []
    for i in range(1500):
        if rng.random() < 0.08:
            lines.append(rng.choice(TRICKY))
        else:
            tokens = [rng.randrange(0, 65536) for _ in range(rng.randrange(0, 40))]
            row = {"text": f"row {i} <image>", "tokens": tokens, "image_path": f"p/{i}.jpg", "task": "VQA", "source": "s", "credential": "no"}
            separators = (",", ":") if i % 3 == 0 else (", ", ": ")  # compact and default json.dumps output
            lines.append(json.dumps(row, separators=separators))
    path = tmp_path_factory.mktemp("rows") / "train.jsonl"
    # Last line without a trailing newline, as some writers leave it.
    path.write_text("\n".join(lines) + "\n" + '{"text": "end", "tokens": [0, 2], "task":"a","source":"b","credential":"no"}')
    return path


@pytest.mark.parametrize("batch_size", [1, 5, 64, 8192])
def test_fast_reader_matches_per_line_reader(mixed_file, batch_size):
    expected_rows, expected_problems = reference(mixed_file, "train")
    got_rows, got_problems, sizes = read_all(mixed_file, "train", batch_size)
    assert len(expected_problems) > 50  # the file does exercise the problem paths
    assert got_rows == expected_rows
    assert got_problems == expected_problems
    assert max(sizes) <= batch_size


def test_every_tricky_line_alone(tmp_path):
    for i, line in enumerate(TRICKY):
        path = tmp_path / f"t{i}.jsonl"
        path.write_text(line + "\n")
        expected_rows, expected_problems = reference(path, "validation")
        got_rows, got_problems, _ = read_all(path, "validation", 8192)
        assert (got_rows, got_problems) == (expected_rows, expected_problems), line


def test_large_rows_round_trip(tmp_path):
    """Rows of MedMax size (~1.3k ids) come back id for id."""
    rng = random.Random(3)
    sequences = [[0] + [rng.randrange(4, 65536) for _ in range(1300)] + [2] for _ in range(50)]
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": "t", "tokens": s, "task": "VQA", "source": "s", "credential": "no"}) + "\n" for s in sequences))
    got, problems, _ = read_all(path, "train", 16)
    assert problems == [] and [r["tokens"] for r in got] == sequences
    assert [r["row_id"] for r in got] == [f"train:{i}" for i in range(1, 51)]


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        next(rows.read_row_batches(tmp_path / "nope.jsonl", "train"))


# --- byte ranges (core/parallel_rows.py): the serial reader's batches, in worker processes -------


def serial_batches(path: Path, batch_size: int) -> list[tuple[list[dict], list[tuple[int, str]]]]:
    return [(batch.to_pylist(), [(p.line, p.reason) for p in problems]) for batch, problems in rows.read_row_batches(path, "train", batch_size)]


def rows_of_range(path: str, split: str, byte_range: parallel_rows.ByteRange) -> tuple[pa.RecordBatch, list[tuple[int, str]]]:
    """A per-range function for map_line_ranges (top level, so that spawned workers can load it)."""
    batch, problems = rows.read_jsonl_range(path, split, *byte_range)
    return batch, [(p.line, p.reason) for p in problems]


def fail_after_first_range(byte_range: parallel_rows.ByteRange) -> tuple[pa.RecordBatch, None]:
    if byte_range.first_line > 1:
        raise ValueError(f"refused range at line {byte_range.first_line}")
    return pa.record_batch({"line": [byte_range.first_line]}), None


@pytest.fixture(scope="module")
def blank_lines_file(mixed_file, tmp_path_factory) -> Path:
    """mixed_file with lines that bytes.strip() empties (blank for the reader) spread through it."""
    lines = mixed_file.read_bytes().split(b"\n")
    blanks = [b"", b"   ", b"\t\r", b"\x0c", b" \x0b "]
    out = []
    for i, line in enumerate(lines):
        if i % 37 == 5:
            out.append(blanks[i % len(blanks)])
        out.append(line)
    path = tmp_path_factory.mktemp("blank") / "train.jsonl"
    path.write_bytes(b"\n".join(out))
    return path


@pytest.mark.parametrize("batch_size", [1, 7, 64, 8192])
def test_line_ranges_are_the_serial_batches(blank_lines_file, batch_size):
    ranges = list(parallel_rows.plan_line_ranges(blank_lines_file, batch_size, block_size=4096))
    assert ranges[0].start == 0 and ranges[-1].end == blank_lines_file.stat().st_size
    assert all(a.end == b.start for a, b in zip(ranges, ranges[1:]))
    by_range = [rows_of_range(str(blank_lines_file), "train", r) for r in ranges]
    assert [(batch.to_pylist(), problems) for batch, problems in by_range] == serial_batches(blank_lines_file, batch_size)


def test_map_line_ranges_gives_results_in_file_order_and_the_file_fingerprint(blank_lines_file):
    fingerprints: list[str] = []
    work = functools.partial(rows_of_range, str(blank_lines_file), "train")
    got = list(parallel_rows.map_line_ranges(blank_lines_file, 64, 2, work, on_fingerprint=fingerprints.append, in_flight_per_worker=1))
    assert len(got) > 4  # more ranges than are in flight at once
    assert [(batch.to_pylist(), problems) for batch, problems in got] == serial_batches(blank_lines_file, 64)
    assert fingerprints == [describe_input(blank_lines_file)["fingerprint"]]


def test_map_line_ranges_raises_a_worker_error(blank_lines_file):
    results = parallel_rows.map_line_ranges(blank_lines_file, 64, 2, fail_after_first_range)
    with pytest.raises(ValueError, match="refused range at line"):
        list(results)

