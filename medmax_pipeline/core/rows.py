"""Reading MedMax dataset rows (medmax_data's train.jsonl / validation.jsonl, or parquet) safely.

Every row gets a stable `row_id` ("{split}:{line}", the 1-based line of a jsonl file or the
1-based row of a parquet file) and is checked for types. A malformed row never becomes data:
it is returned as a RowProblem naming the file, the line and the reason, and reading goes on.

Row columns (medmax_data): text, tokens, image_path, task, source, credential. Any other key of
a row (for example subject_id / study_id / dicom_id that a credentialed source's path template
reads) is kept, as a JSON object in the column `extra`.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DATA_COLUMNS = ("text", "tokens", "image_path", "task", "source", "credential")
CREDENTIAL_VALUES = ("yes", "no")

ROW_SCHEMA = pa.schema(
    [
        ("row_id", pa.string()),
        ("split", pa.string()),
        ("line", pa.int64()),
        ("text", pa.string()),
        ("tokens", pa.list_(pa.int32())),
        ("image_path", pa.string()),
        ("task", pa.string()),
        ("source", pa.string()),
        ("credential", pa.string()),
        ("extra", pa.string()),
    ]
)

PROBLEM_SCHEMA = pa.schema(
    [("file", pa.string()), ("line", pa.int64()), ("row_id", pa.string()), ("reason", pa.string())]
)


@dataclass(frozen=True)
class RowProblem:
    file: str
    line: int
    reason: str
    row_id: str | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


def row_id_for(split: str, line: int) -> str:
    return f"{split}:{line}"


def validate_row(raw: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Check one decoded row; return (normalised row, None) or (None, reason)."""
    if not isinstance(raw, dict):
        return None, f"row is a JSON {type(raw).__name__}, expected an object"
    for key in ("text", "task", "source"):
        if key not in raw or raw[key] is None:
            return None, f"missing column {key!r}"
        if not isinstance(raw[key], str):
            return None, f"column {key!r} is {type(raw[key]).__name__}, expected a string"
    credential = raw.get("credential")
    if not isinstance(credential, str) or credential.strip().lower() not in CREDENTIAL_VALUES:
        return None, f"column 'credential' is {credential!r}, expected 'yes' or 'no'"
    tokens = raw.get("tokens")
    if tokens is None or tokens == "":
        tokens = []
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        return None, "column 'tokens' is not a list of integers"
    if any(t < 0 or t >= 2**31 for t in tokens):
        return None, "column 'tokens' has an id outside the int32 range"
    image_path = raw.get("image_path")
    if image_path == "":
        image_path = None
    if image_path is not None and not isinstance(image_path, str):
        return None, f"column 'image_path' is {type(image_path).__name__}, expected a string"
    extra = {k: v for k, v in raw.items() if k not in DATA_COLUMNS}
    row = {
        "text": raw["text"],
        "tokens": tokens,
        "image_path": image_path,
        "task": raw["task"],
        "source": raw["source"],
        "credential": credential.strip().lower(),
        "extra": json.dumps(extra, sort_keys=True, ensure_ascii=False) if extra else None,
    }
    for key in ("text", "image_path", "task", "source", "extra"):
        reason = lone_surrogate_problem(key, row[key])
        if reason is not None:
            return None, reason
    return row, None


def lone_surrogate_problem(column: str, value: str | None) -> str | None:
    """Why a decoded string cannot be stored as UTF-8, or None. JSON lets a line spell a lone
    surrogate ("\\ud800"); json.loads returns it, and Arrow (every artifact) cannot encode it."""
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = "its other keys" if column == "extra" else f"column {column!r}"
        bad = value[exc.start : exc.end].encode("unicode_escape").decode("ascii")
        return f"{where} hold(s) a lone surrogate ({bad} at character {exc.start}): not valid Unicode"
    return None


def utf8_problem(exc: UnicodeDecodeError) -> str:
    """A UTF-8 UnicodeDecodeError in words: which bytes, at which offset, and why. Bytes ED A0..BF
    xx are a surrogate encoded as UTF-8 (what a lone surrogate becomes when written unchecked)."""
    data = bytes(exc.object)
    bad = data[exc.start : max(exc.end, exc.start + 1)]
    why = exc.reason
    if data[exc.start : exc.start + 1] == b"\xed" and data[exc.start + 1 : exc.start + 2] >= b"\xa0":
        bad, why = data[exc.start : exc.start + 3], "an encoded lone surrogate"
    return f"not valid UTF-8: byte(s) {bad.hex(' ')} at byte {exc.start} ({why})"


def _iter_raw_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    with open(path, "rb") as f:
        for line_no, raw_line in enumerate(f, start=1):
            stripped = raw_line.strip()
            if not stripped:
                continue
            yield (line_no, *_decode_line(stripped))


def _decode_line(stripped: bytes) -> tuple[Any, str | None]:
    try:
        return json.loads(stripped), None
    except (ValueError, RecursionError) as exc:
        # ValueError: JSONDecodeError, UnicodeDecodeError, and an integer past Python's digit
        # limit; RecursionError: arrays nested thousands deep. All are a bad line, not a crash.
        return None, f"bad JSON: {exc}"


def _iter_raw_parquet(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    line_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        try:
            decoded = batch.to_pylist()
        except UnicodeDecodeError:
            # Parquet does not check that its strings are UTF-8 (a lone surrogate written unchecked
            # is ED A0 80): decode this batch row by row, so that only the bad rows are refused.
            decoded = None
        for i in range(batch.num_rows):
            line_no += 1
            yield (line_no, decoded[i], None) if decoded is not None else (line_no, *_parquet_row(batch, i))


def _parquet_row(batch: pa.RecordBatch, index: int) -> tuple[dict[str, Any] | None, str | None]:
    """(row, None) or (None, why its strings are not UTF-8) for one row of a parquet batch."""
    row = {}
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            row[name] = column[index].as_py()
        except UnicodeDecodeError as exc:
            return None, f"column {name!r} is {utf8_problem(exc)}"
    return row, None


def iter_raw_rows(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line, decoded row or None, parse error or None) for each row of a jsonl or parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    if path.suffix == ".parquet":
        return _iter_raw_parquet(path)
    return _iter_raw_jsonl(path)


# ----------------------------------------------------------------------------------------------
# Fast jsonl path. A MedMax row is ~1.3k token ids (~9 KB of JSON digits): decoding them with
# json.loads into Python ints is what made reading slow. Here each line's "tokens" array is cut
# out as bytes, the arrays of many lines are parsed in one numpy call (np.fromstring, ~0.5 GB/s),
# and only the small remainder of the line (text, task, ...) goes through json.loads and
# validate_row. Any line the fast path is not sure about (no or repeated "tokens" key) and every
# bad row is decoded whole, per line, and a block holding an array that is not surely a JSON list
# of int32 ids is decoded line by line: so each verdict and reason is json.loads' on the line.
# ----------------------------------------------------------------------------------------------

_TOKENS_KEY = b'"tokens"'
_TOKENS_OPEN = re.compile(rb"[ \t\r\n]*:[ \t\r\n]*\[")
_INT32_MAX = 2**31 - 1
_JSON_SPACE = b" \t\r"  # JSON's whitespace inside a line (a newline ends the line)


class _SlowBlock(Exception):
    """The block's token arrays did not parse as plain integer lists: decode its lines one by one."""


def _split_tokens(line: bytes) -> tuple[bytes, memoryview, int] | None:
    """(line with its tokens array emptied, the array's inner bytes, the number of values it should
    hold: commas + 1, or 0 when only JSON whitespace), or None when unsure. The inner bytes are a
    view, not a copy: they are ~85% of a MedMax line, and are copied once, when joined for parsing."""
    key = line.find(_TOKENS_KEY)
    if key < 0 or line.find(_TOKENS_KEY, key + len(_TOKENS_KEY)) >= 0:
        return None
    if line[key - 1 : key] == b"\\":  # the quote is escaped: part of another string ('"a\\"tokens": [')
        return None
    opened = _TOKENS_OPEN.match(line, key + len(_TOKENS_KEY))
    if opened is None:
        return None
    start = opened.end()
    stop = line.find(b"]", start)
    if stop < 0:
        return None
    commas = line.count(b",", start, stop)
    # "[ ]" is empty; "[\f]" is not JSON: it counts one value, which the parse then refuses.
    count = commas + 1 if commas or line[start:stop].translate(None, _JSON_SPACE) else 0
    return line[:start] + line[stop:], memoryview(line)[start:stop], count


# Bytes a plain JSON integer array may hold between its brackets, minus "-" (see _json_int_list).
_ARRAY_BYTES = b"0123456789," + _JSON_SPACE


def _json_int_list(data: bytes, count: int) -> bool:
    """Whether `data` (the joined inner bytes of token arrays) is a JSON list body of `count`
    non-negative integers: comma-separated elements, each JSON whitespace around one number
    without a leading zero. numpy's reader is looser, so this is decided here, before it reads:
    it takes "+5", "- 5", "07", form feed or vertical tab as whitespace, and an element that is
    only whitespace ("1, ,2", "1,  ") as the value 0. Minus signs are refused too: a negative id
    is a bad row anyway, and json.loads words its reason.

    How: the bytes are digits, commas and JSON whitespace only; the digit runs and the commas
    alternate, run first and last (run_i < comma_i < run_i+1), so each element holds exactly
    one run; no run starts with 0 and goes on. A few numpy passes, no Python loop per value."""
    if data.translate(None, _ARRAY_BYTES):  # any byte besides digits, commas and JSON whitespace
        return False
    text = np.frombuffer(data, dtype=np.uint8)
    digit = text >= ord("0")  # the only bytes >= "0" left are digits
    run_start = digit.copy()
    run_start[1:] &= ~digit[:-1]
    runs = np.flatnonzero(run_start)
    commas = np.flatnonzero(text == ord(","))
    if runs.size != count or commas.size != count - 1:
        return False
    if not ((runs[:-1] < commas).all() and (commas < runs[1:]).all()):
        return False
    after_zero = runs[text[runs] == ord("0")] + 1  # a run starting with 0 is "0" itself or "07"
    return not digit[after_zero[after_zero < text.size]].any()


def _parse_int_lists(segments: list[memoryview], counts: list[int]) -> np.ndarray:
    """Parse comma-separated integer lists holding `counts` values each; values (int64). Raises
    _SlowBlock unless every list is a JSON integer list (_json_int_list) of ids in int32 range."""
    data = b",".join(seg for seg, count in zip(segments, counts) if count)
    total = sum(counts)
    if not data:
        return np.zeros(0, np.int64)
    if not _json_int_list(data, total):
        raise _SlowBlock
    with warnings.catch_warnings():
        # numpy warns (here: raises) when the text does not parse to its end; a check that cannot
        # fire after _json_int_list, kept so that a numpy change cannot slip values in.
        warnings.simplefilter("error")
        try:
            values = np.fromstring(data, dtype=np.int64, sep=",")
        except (ValueError, DeprecationWarning):
            raise _SlowBlock from None
    if values.size != total:
        raise _SlowBlock
    if values.max() > _INT32_MAX:
        # An id outside int32 (numpy saturates numbers past int64, and one may be past json's
        # digit limit): a bad row; rare, so the per-line reader words its reason.
        raise _SlowBlock
    return values


def _decode_without_tokens(emptied: bytes) -> dict[str, Any] | None:
    """json.loads of a line whose tokens array was emptied, or None when that array may not
    be the row's "tokens" value: the row must end up with tokens == [] and exactly one key
    "tokens" in the whole line (json.loads keeps a repeated key's last value, and a key may be
    spelled with escapes, "tok\\u0065ns", which the byte search does not see)."""
    tokens_keys = 0

    def count_tokens_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal tokens_keys
        tokens_keys += sum(1 for name, _ in pairs if name == "tokens")
        return dict(pairs)

    try:
        raw = json.loads(emptied, object_pairs_hook=count_tokens_keys)
    except (ValueError, RecursionError):
        return None
    if tokens_keys != 1 or not isinstance(raw, dict) or raw.get("tokens") != []:
        return None
    return raw


def _rows_from_lines(
    path: Path, split: str, lines: list[tuple[int, bytes]], fast: bool
) -> tuple[pa.RecordBatch, list[RowProblem]]:
    """Decode and check (line number, stripped line) pairs into a ROW_SCHEMA batch and problems."""
    columns: dict[str, list[Any]] = {name: [] for name in ROW_SCHEMA.names if name != "tokens"}
    token_pieces: list[np.ndarray] = []
    token_counts: list[int] = []
    pending: list[memoryview] = []  # token array bytes of consecutive fast lines, parsed together
    pending_counts: list[int] = []  # values each pending segment holds
    pending_rows: list[int] = []  # index into the kept rows of each pending segment
    problems: list[RowProblem] = []

    def flush_pending() -> None:
        if not pending:
            return
        token_pieces.append(_parse_int_lists(pending, pending_counts))
        for row_index, count in zip(pending_rows, pending_counts):
            token_counts[row_index] = count
        pending.clear()
        pending_counts.clear()
        pending_rows.clear()

    for line_no, stripped in lines:
        row_id = row_id_for(split, line_no)
        parts = _split_tokens(stripped) if fast else None
        row, reason = None, None
        if parts is not None:
            raw = _decode_without_tokens(parts[0])
            row, reason = validate_row(raw) if raw is not None else (None, None)
        if row is None:
            # Not surely the top-level tokens array, or a bad row: decode the line whole, so that
            # the verdict and its reason (with character offsets) are json.loads' on the line.
            parts = None
            raw, parse_error = _decode_line(stripped)
            row, reason = (None, parse_error) if parse_error else validate_row(raw)
        if row is None:
            problems.append(RowProblem(str(path), line_no, reason or "unreadable row", row_id))
            continue
        columns["row_id"].append(row_id)
        columns["split"].append(split)
        columns["line"].append(line_no)
        for key in ("text", "image_path", "task", "source", "credential", "extra"):
            columns[key].append(row[key])
        token_counts.append(0)
        if parts is not None:
            pending.append(parts[1])
            pending_counts.append(parts[2])
            pending_rows.append(len(token_counts) - 1)
        else:
            flush_pending()
            token_pieces.append(np.asarray(row["tokens"], dtype=np.int64))
            token_counts[-1] = len(row["tokens"])
    flush_pending()

    values = np.concatenate(token_pieces) if token_pieces else np.zeros(0, np.int64)
    counts = np.asarray(token_counts, dtype=np.int64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    # Every id is in int32 range: validate_row checked the per-line rows, _parse_int_lists the rest.
    tokens = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.int32)))
    arrays = [
        tokens if name == "tokens" else pa.array(columns[name], type=ROW_SCHEMA.field(name).type)
        for name in ROW_SCHEMA.names
    ]
    batch = pa.RecordBatch.from_arrays(arrays, schema=ROW_SCHEMA)
    problems.sort(key=lambda p: p.line)
    return batch, problems


def rows_from_lines(path: Path, split: str, lines: list[tuple[int, bytes]]) -> tuple[pa.RecordBatch, list[RowProblem]]:
    """Decode (line number, stripped non-blank line) pairs into a ROW_SCHEMA batch and problems."""
    try:
        return _rows_from_lines(path, split, lines, fast=True)
    except _SlowBlock:
        # A token array numpy could not read exactly: decode every line of the block with
        # json.loads, which gives each bad line its own reason.
        return _rows_from_lines(path, split, lines, fast=False)


def _read_jsonl_batches(path: Path, split: str, batch_size: int) -> Iterator[tuple[pa.RecordBatch, list[RowProblem]]]:
    block: list[tuple[int, bytes]] = []
    with open(path, "rb") as f:
        for line_no, raw_line in enumerate(f, start=1):
            stripped = raw_line.strip()
            if not stripped:
                continue
            block.append((line_no, stripped))
            if len(block) >= batch_size:
                yield rows_from_lines(path, split, block)
                block = []
    if block:
        yield rows_from_lines(path, split, block)


# ----------------------------------------------------------------------------------------------
# Byte ranges, for reading one jsonl file in several processes (core/parallel_rows.py). Its
# plan_line_ranges cuts the file where _read_jsonl_batches would end a batch (after every
# batch_size-th line that bytes.strip() leaves non-empty), so a range read by read_jsonl_range is
# exactly one batch of the serial reader: same rows, same problems, same batch boundaries, hence
# the same output files however many processes read.
# ----------------------------------------------------------------------------------------------


def read_jsonl_range(
    path: str | Path, split: str, start: int, end: int, first_line: int
) -> tuple[pa.RecordBatch, list[RowProblem]]:
    """The rows and problems of bytes [start, end) of a jsonl file whose first line is `first_line`
    (a range from parallel_rows.plan_line_ranges)."""
    path = Path(path)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read(end - start)
    lines: list[tuple[int, bytes]] = []
    for line_no, raw_line in enumerate(data.split(b"\n"), start=first_line):
        # A plain json.dumps line needs no strip (which would copy its ~9 KB).
        stripped = raw_line if raw_line[:1] == b"{" and raw_line[-1:] == b"}" else raw_line.strip()
        if stripped:
            lines.append((line_no, stripped))
    return rows_from_lines(path, split, lines)


def read_row_batches(
    path: str | Path, split: str, batch_size: int = 8192
) -> Iterator[tuple[pa.RecordBatch, list[RowProblem]]]:
    """Stream checked rows as record batches of ROW_SCHEMA, with the problems found in each batch.

    Rows are in file order; each batch covers at most `batch_size` input rows (kept + problems).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    if path.suffix != ".parquet":
        yield from _read_jsonl_batches(path, split, batch_size)
        return
    columns: dict[str, list[Any]] = {name: [] for name in ROW_SCHEMA.names}
    problems: list[RowProblem] = []

    def flush() -> tuple[pa.RecordBatch, list[RowProblem]]:
        batch = pa.RecordBatch.from_pydict(columns, schema=ROW_SCHEMA)
        out = (batch, list(problems))
        for values in columns.values():
            values.clear()
        problems.clear()
        return out

    for line_no, raw, parse_error in iter_raw_rows(path):
        row_id = row_id_for(split, line_no)
        row, reason = (None, parse_error) if parse_error else validate_row(raw)
        if row is None:
            problems.append(RowProblem(str(path), line_no, reason or "unreadable row", row_id))
        else:
            columns["row_id"].append(row_id)
            columns["split"].append(split)
            columns["line"].append(line_no)
            for key, value in row.items():
                columns[key].append(value)
        if len(columns["row_id"]) + len(problems) >= batch_size:
            yield flush()
    if columns["row_id"] or problems:
        yield flush()


def problems_table(problems: list[RowProblem]) -> pa.Table:
    return pa.Table.from_pylist(
        [{"file": p.file, "line": p.line, "row_id": p.row_id, "reason": p.reason} for p in problems],
        schema=PROBLEM_SCHEMA,
    )


def row_extra(row: dict[str, Any]) -> dict[str, Any]:
    """The extra (non medmax_data) columns of a row read by read_row_batches."""
    extra = row.get("extra")
    return json.loads(extra) if extra else {}
