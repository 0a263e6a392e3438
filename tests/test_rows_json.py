"""The jsonl row reader accepts and refuses exactly what json.loads (then validate_row) does.

The fast path parses the token arrays of a whole block in one numpy call, and numpy is looser than
JSON ("07", "+5", "- 5", form feed as whitespace). Whether a line is valid must not depend on the
other lines of its block, so every line of a corpus of tricky lines is read alone, and mixed into
blocks of valid lines and of other tricky lines, by the fast and the slow path, and each outcome
(kept with the same values, or refused with the same reason) must be json.loads' outcome.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from medmax_pipeline.core import rows

ARRAY_BODIES = [
    # leading zeros, signs, exponents, floats
    "00", "007", "0, 07", "1, 00", "0,0", "0", "-0", "-01", "-5", "+5", "- 5", "1, -2", "1e2", "1E2", "1e-2", "1.0", "1.", ".5",
    "0x10", "1_000", "Infinity", "NaN", "-Infinity", "true", "null", '"1"', "1, null",
    # nesting, empty elements, commas
    "[1]", "[]", "1, [2]", "[[1, 2], 3]", "1,,2", "1,2,", ",1", ",", "1,", "",
    # whitespace: JSON has space, tab, CR (a newline ends the line); numpy also skips FF and VT
    "1 2", " 1 , 2 ", "\t1,\t2", "\r1\r,2", "1\f,2", "\f1", "1\v,2", "\u00a01", "1,\u20032",
    # elements that are only whitespace (numpy reads each as 0), empty arrays spelled with spaces
    "0, 9000, , 9001, 2", "0,5,6,  ", " , 5, 6, 2", "1, \t,2", "\r", " ", "\t \r", "\f", "\v", " ,", ", ",
    # sizes
    "2147483647", "2147483648", "4294967296", "9223372036854775807", "9223372036854775808",
    "99999999999999999999", "1" * 5000, "5, " + "9" * 4400,
    "0, 8197, 4, 8195, 8196, 2", ", ".join(str(i) for i in range(0, 65536, 97)),
]

LINE = '{{"text": "x", "tokens": [{}], "task": "a", "source": "b", "credential": "no"}}'
OTHER_LINES = [
    # duplicate keys (json.loads keeps the last one)
    '{"text": "x", "tokens": [1], "tokens": [2], "task": "a", "source": "b", "credential": "no"}',
    '{"text": "x", "tokens": [1], "tokens": [00], "task": "a", "source": "b", "credential": "no"}',
    '{"text": "x", "tokens": [00], "tokens": [1], "task": "a", "source": "b", "credential": "no"}',
    '{"text": "x", "task": "a", "task": "c", "tokens": [3], "source": "b", "credential": "no"}',
    # the key spelled with an escape, nested, or as a value
    '{"text": "x", "tok\\u0065ns": [07], "task": "a", "source": "b", "credential": "no"}',
    '{"text": "x", "tok\\u0065ns": [7], "task": "a", "source": "b", "credential": "no"}',
    '{"text": "x", "meta": {"tokens": [07]}, "tokens": [1], "task": "a", "source": "b", "credential": "no"}',
    # the literal "tokens" not the row's tokens key: json.loads takes [] from the escaped spelling
    '{"text": "x", "tokens": [5], "tok\\u0065ns": [], "task": "a", "source": "b", "credential": "no"}',
    '{"text": "x", "meta": {"tokens": [5]}, "tok\\u0065ns": [], "task": "a", "source": "b", "credential": "no"}',
    '{"text": "x", "a\\"tokens": [5], "tok\\u0065ns": [], "task": "a", "source": "b", "credential": "no"}',
    # bad in two ways: json.loads' reason is the one that counts (bad JSON, then the column order)
    '{"tokens": [1, , 2], "task": "a", "source": "b", "credential": "no"}',
    '{"text": "x", "tokens": [1, 2,], "task": "a", "source": "b", "credential": "maybe"}',
    '{"text": "x", "tokens": [2147483648], "task": "a", "source": "b", "credential": "no", "image_path": 5}',
    '{"text": "x", "tokens": [4294967296], "task": "a", "source": "b", "credential": "no", "dicom_id": "\\ud800"}',
    '{"text": "tokens", "tokens": [1, 2], "task": "a", "source": "b", "credential": "no"}',
    '{"text": "x", "tokens": [1], "task": "a", "source": "b", "credential": "no",}',
    '{"text": "x", "tokens" :[ 1 ,2 ] , "task": "a", "source": "b", "credential": "no"}',
    '{"text":"x","tokens":[1,2],"task":"a","source":"b","credential":"no"}',
    # deep nesting: json.loads raises RecursionError
    '{"text": "x", "tokens": ' + "[" * 100_000 + "]" * 100_000 + ', "task": "a", "source": "b", "credential": "no"}',
    # BOM, bad UTF-8, surrogates (lone ones are valid JSON and no valid Unicode)
    '\ufeff{"text": "x", "tokens": [1], "task": "a", "source": "b", "credential": "no"}',
    '{"text": "\\ud800", "tokens": [1], "task": "a", "source": "b", "credential": "no"}',
    '{"text": "a\\udfff", "tokens": [1], "task": "a", "source": "b", "credential": "no"}',
    '{"text": "\\ud83d\\ude00 ok", "tokens": [1], "task": "a", "source": "b", "credential": "no"}',
    '{"text": "x", "tokens": [1], "task": "\\ud800", "source": "b", "credential": "no"}',
    '{"text": "x", "tokens": [1], "task": "a", "source": "\\udc00", "credential": "no"}',
    '{"text": "x", "tokens": [1], "task": "a", "source": "b", "credential": "no", "image_path": "p/\\ud800.jpg"}',
    '{"text": "x", "tokens": [1], "task": "a", "source": "b", "credential": "no", "dicom_id": "\\ud800"}',
    '{"text": "x", "tokens": [1], "task": "a", "source": "b", "credential": "no", "\\ud800": 1}',
    '{"text": "x", "tokens": [1], "task": "a", "source": "b", "credential": "no", "s": NaN}',
    "{'text': 'x'}",
    '{"text": "x", "tokens": [1], "task": "a", "source": "b", "credential": "no"} // comment',
]
TRICKY = [LINE.format(body) for body in ARRAY_BODIES] + OTHER_LINES
TRICKY_BYTES = [line.encode("utf-8", "surrogatepass") for line in TRICKY] + [
    b'{"text": "\xff\xfe", "tokens": [1], "task": "a", "source": "b", "credential": "no"}',  # not UTF-8
    b'{"text": "\xed\xa0\x80", "tokens": [1], "task": "a", "source": "b", "credential": "no"}',  # an encoded surrogate
]


def good_line(i: int) -> bytes:
    tokens = [0] + [random.Random(i).randrange(4, 65536) for _ in range(30)] + [2]
    return json.dumps({"text": f"row {i}", "tokens": tokens, "task": "VQA", "source": "s", "credential": "no"}).encode()


def expected(line: bytes) -> tuple[str, object]:
    """("kept", row) or ("refused", reason): what json.loads and validate_row make of one line."""
    try:
        raw = json.loads(line)
    except (ValueError, RecursionError) as exc:
        return "refused", f"bad JSON: {exc}"
    row, reason = rows.validate_row(raw)
    return ("kept", row) if row is not None else ("refused", reason)


def outcomes(lines: list[bytes], fast: bool) -> dict[int, tuple[str, object]]:
    """Line number -> outcome of the reader for one block of lines (numbered from 1)."""
    numbered = [(i + 1, line.strip()) for i, line in enumerate(lines) if line.strip()]
    if fast:
        batch, problems = rows.rows_from_lines(Path("t.jsonl"), "train", numbered)
    else:
        batch, problems = rows._rows_from_lines(Path("t.jsonl"), "train", numbered, fast=False)
    got: dict[int, tuple[str, object]] = {}
    for row in batch.to_pylist():
        line = row.pop("line")
        assert row.pop("row_id") == f"train:{line}" and row.pop("split") == "train"
        got[line] = ("kept", row)
    for problem in problems:
        assert problem.file == "t.jsonl" and problem.row_id == f"train:{problem.line}"
        assert problem.line not in got
        got[problem.line] = ("refused", problem.reason)
    return got


def check_block(lines: list[bytes]) -> None:
    want = {i + 1: expected(line.strip()) for i, line in enumerate(lines) if line.strip()}
    for fast in (True, False):
        got = outcomes(lines, fast)
        for line_no, outcome in want.items():
            assert got.get(line_no) == outcome, (fast, lines[line_no - 1][:120])


def test_the_corpus_has_both_outcomes():
    kinds = [expected(line)[0] for line in TRICKY_BYTES]
    assert kinds.count("kept") >= 10 and kinds.count("refused") >= 40


@pytest.mark.parametrize("index", range(len(TRICKY_BYTES)))
def test_each_tricky_line_alone(index):
    check_block([TRICKY_BYTES[index]])


@pytest.mark.parametrize("index", range(len(TRICKY_BYTES)))
def test_each_tricky_line_among_valid_lines(index):
    """The neighbours are plain valid rows, so the block would otherwise take the fast path."""
    check_block([good_line(1), good_line(2), TRICKY_BYTES[index], good_line(3)])


def test_tricky_lines_mixed_in_random_blocks():
    rng = random.Random(11)
    pool = TRICKY_BYTES + [good_line(i) for i in range(40)]
    for _ in range(60):
        check_block(rng.sample(pool, rng.randrange(2, 12)))


def test_leading_zero_is_refused_whatever_the_neighbours():
    """The reported bug: `[00, ...` was kept in a block of valid lines, refused in one that went slow."""
    zero = LINE.format("00, 5").encode()
    for block in ([good_line(1), zero], [LINE.format("1.5").encode(), zero]):
        got = outcomes(block, fast=True)
        assert got[2][0] == "refused" and "bad JSON" in got[2][1]


LONE_SURROGATE_LINE = b'{"text": "\\ud800", "tokens": [1], "task": "a", "source": "b", "credential": "no"}'


@pytest.mark.parametrize("body", ["0, 9000, , 9001, 2", "0,5,6,  ", " , 5, 6, 2"])
def test_whitespace_element_is_refused_not_read_as_id_0(tmp_path, body):
    """The reported bug: numpy reads an element of only whitespace as 0, so these invalid arrays
    were kept as [0, 9000, 0, 9001, 2], [0, 5, 6, 0] and [0, 5, 6, 2]."""
    bad = LINE.format(body).encode()
    with pytest.raises(json.JSONDecodeError):
        json.loads(bad)
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\n".join([good_line(1), bad, good_line(2)]) + b"\n")
    for batch_size in (1, 3, 8192):
        kept, problems = [], []
        for batch, batch_problems in rows.read_row_batches(path, "train", batch_size):
            kept += batch.column("line").to_pylist()
            problems += batch_problems
        assert kept == [1, 3]
        assert [(p.line, p.reason.split(":")[0]) for p in problems] == [(2, "bad JSON")]
    batch, problems = rows.read_jsonl_range(path, "train", 0, path.stat().st_size, 1)
    assert batch.column("tokens").to_pylist() == [json.loads(good_line(i))["tokens"] for i in (1, 2)]
    assert [p.line for p in problems] == [2]


def test_lone_surrogate_is_a_row_problem_with_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(good_line(1) + b"\n" + LONE_SURROGATE_LINE + b"\n" + good_line(2) + b"\n")
    for batch_size in (1, 8192):
        kept, problems = [], []
        for batch, batch_problems in rows.read_row_batches(path, "train", batch_size):
            kept += batch.column("line").to_pylist()
            problems += batch_problems
        assert kept == [1, 3]
        assert [(p.file, p.line) for p in problems] == [(str(path), 2)]
        assert "lone surrogate" in problems[0].reason and "'text'" in problems[0].reason


# ----------------------------------------------------------------------------------------------
# Seeded fuzz: MedMax-shaped lines, randomly mutated, read in blocks among valid lines. Every
# line's outcome (kept with the same values, or refused with the same reason) must be json.loads'.
# ----------------------------------------------------------------------------------------------

FUZZ_TEXTS = [
    "<image> What does the chest radiograph show? <reserved08706> No acute process.",
    'He said "caf\u00e9" \\ done\n\ttab',
    "emoji \U0001F600 and \u00e9\u4e2d",
    "",
]
# What a mutation inserts or writes over: JSON's structure, whitespace (and numpy's extra
# whitespace), number parts, string escapes and surrogate halves.
FUZZ_PIECES = [
    ",", ", ", " ,", ",,", "[", "]", "{", "}", ":", " ", "  ", "\t", "\r", "\f", "\v", "\u00a0",
    "-", "+", "e", "E", "e5", "e-1", ".", ".0", "0", "00", "1", "9", "07", "2147483648", "99999999999999999999",
    '"', '\\', '\\"', "\\u", "\\ud800", "\\udc00", "\\ud83d\\ude00", "\\u0065", "null", "true", "NaN",
    "x", "\u00e9", "\U0001F600", '"tokens"', '"tokens": []', "/",
]
# Where a mutation tends to land: next to a byte that makes numbers, arrays and strings.
FUZZ_NEAR = set(',[]{}: \t-+eE."\\0123456789')


def fuzz_base_line(rng: random.Random) -> str:
    """A MedMax-shaped row, as json.dumps (spaced or compact, ASCII or not) writes it."""
    n = rng.choice([0, 1, 3, 8, 40])
    tokens = [0] + [rng.choice([4, 8195, 8196, 8197, 8710, 65535, rng.randrange(3, 65536)]) for _ in range(n)] + [2]
    if n == 0 and rng.random() < 0.5:
        tokens = []
    row: dict = {"text": rng.choice(FUZZ_TEXTS), "tokens": tokens, "task": "VQA", "source": "pmc_oa", "credential": rng.choice(["no", "yes"])}
    if rng.random() < 0.5:
        row["image_path"] = rng.choice(["images/a.jpg", "p/\u00e9.png", ""])
    if rng.random() < 0.3:
        row["subject_id"] = rng.choice(["10000032", 5, None])
    keys = list(row)
    rng.shuffle(keys)
    separators = rng.choice([(", ", ": "), (",", ":"), (" , ", " : ")])
    return json.dumps({k: row[k] for k in keys}, ensure_ascii=rng.random() < 0.5, separators=separators)


def fuzz_mutate(line: str, rng: random.Random) -> str:
    for _ in range(rng.choice([1, 1, 2, 3])):
        near = [i for i, ch in enumerate(line) if ch in FUZZ_NEAR]
        at = rng.choice(near) + rng.choice([0, 1]) if near and rng.random() < 0.85 else rng.randrange(len(line) + 1)
        at = min(at, len(line))
        kind = rng.random()
        if kind < 0.4:
            line = line[:at] + rng.choice(FUZZ_PIECES) + line[at:]
        elif kind < 0.7:
            line = line[:at] + line[at + rng.choice([1, 1, 2]) :]
        else:
            line = line[:at] + rng.choice(FUZZ_PIECES) + line[at + 1 :]
    return line.replace("\n", " ")


def fuzz_bytes(line: str) -> bytes:
    return line.encode("utf-8", "surrogatepass")


def test_fuzzed_lines_read_as_json_loads_reads_them():
    rng = random.Random(20)
    mutated = 0
    for _ in range(800):
        block = []
        for _ in range(rng.randrange(1, 9)):
            line = fuzz_base_line(rng)
            if rng.random() < 0.6:
                line, mutated = fuzz_mutate(line, rng), mutated + 1
            block.append(fuzz_bytes(line))
        check_block(block)
    assert mutated > 1500
