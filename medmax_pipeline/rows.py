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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

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
    return row, None


def _iter_raw_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    with open(path, "rb") as f:
        for line_no, raw_line in enumerate(f, start=1):
            stripped = raw_line.strip()
            if not stripped:
                continue
            try:
                yield line_no, json.loads(stripped), None
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield line_no, None, f"bad JSON: {exc}"


def _iter_raw_parquet(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    line_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            line_no += 1
            yield line_no, row, None


def iter_raw_rows(path: str | Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line, decoded row or None, parse error or None) for each row of a jsonl or parquet file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file {path} does not exist")
    if path.suffix == ".parquet":
        return _iter_raw_parquet(path)
    return _iter_raw_jsonl(path)


def read_row_batches(
    path: str | Path, split: str, batch_size: int = 8192
) -> Iterator[tuple[pa.RecordBatch, list[RowProblem]]]:
    """Stream checked rows as record batches of ROW_SCHEMA, with the problems found in each batch."""
    path = Path(path)
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
