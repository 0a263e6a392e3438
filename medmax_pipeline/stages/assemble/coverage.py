"""Coverage accounting of assembly: why a row is missing (its category), and per (split, source,
task, credential) how many rows were expected, filled and missing by category."""

from __future__ import annotations

from typing import Any, Mapping

import pyarrow as pa

# Categories of a missing row: the coverage columns, in this order.
IMAGE_MISSING = "image_missing"
IMAGE_UNREADABLE = "image_unreadable"
NO_IMAGE_KEY = "no_image_key"
MALFORMED_ROW = "malformed_row"
TOO_LONG = "dropped_too_long"
INVALID_TOKENS = "invalid_published_tokens"
# A credential = no row whose published tokens hold the block of a credentialed image: the label
# is wrong, and the row must not reach the public export.
CREDENTIALED_TOKENS = "credentialed_image_in_public_row"
# A credential = no row whose response is that of a credential = yes row (copied_text.py).
CREDENTIALED_TEXT = "credentialed_text_in_public_row"
CATEGORIES = (IMAGE_MISSING, IMAGE_UNREADABLE, NO_IMAGE_KEY, MALFORMED_ROW, TOO_LONG, INVALID_TOKENS, CREDENTIALED_TOKENS, CREDENTIALED_TEXT)
# Categories that say the input itself is broken (they count toward --max-error-fraction);
# missing or unreadable images and too long rows are expected and only counted, and so are
# copied responses (shared boilerplate text is not proof of a broken input, a copied block is).
ERROR_CATEGORIES = (MALFORMED_ROW, INVALID_TOKENS, CREDENTIALED_TOKENS)

COVERAGE_KEYS = ("split", "source", "task", "credential")
COVERAGE_SCHEMA = pa.schema(
    [(k, pa.string()) for k in COVERAGE_KEYS]
    + [("rows_expected", pa.int64()), ("rows_filled", pa.int64()), ("rows_missing", pa.int64())]
    + [(c, pa.int64()) for c in CATEGORIES]
)


class Coverage:
    """Counts per (split, source, task, credential): expected, filled and missing by category."""

    def __init__(self, split: str) -> None:
        self.split = split
        self.counts: dict[tuple[Any, ...], dict[str, int]] = {}

    def _entry(self, key: tuple[Any, ...]) -> dict[str, int]:
        entry = self.counts.get(key)
        if entry is None:
            entry = self.counts[key] = {"rows_expected": 0, "rows_filled": 0, **{c: 0 for c in CATEGORIES}}
        return entry

    def add_filled(self, dataset: pa.RecordBatch) -> None:
        if dataset.num_rows == 0:
            return
        table = pa.table({k: dataset.column(k) for k in ("source", "task", "credential")})
        grouped = table.group_by(["source", "task", "credential"]).aggregate([([], "count_all")])
        for row in grouped.to_pylist():
            entry = self._entry((self.split, row["source"], row["task"], row["credential"]))
            entry["rows_expected"] += row["count_all"]
            entry["rows_filled"] += row["count_all"]

    def add_problem(self, problem: Mapping[str, Any]) -> None:
        entry = self._entry((self.split, problem["source"], problem["task"], problem["credential"]))
        entry["rows_expected"] += 1
        entry[problem["category"]] += 1

    def table(self) -> pa.Table:
        rows = []
        for key in sorted(self.counts, key=lambda k: tuple("" if v is None else str(v) for v in k)):
            entry = self.counts[key]
            rows.append(
                {
                    **dict(zip(COVERAGE_KEYS, key)),
                    "rows_expected": entry["rows_expected"],
                    "rows_filled": entry["rows_filled"],
                    "rows_missing": entry["rows_expected"] - entry["rows_filled"],
                    **{c: entry[c] for c in CATEGORIES},
                }
            )
        return pa.Table.from_pylist(rows, schema=COVERAGE_SCHEMA)

    def totals(self) -> dict[str, int]:
        total = {"rows_expected": 0, "rows_filled": 0, **{c: 0 for c in CATEGORIES}}
        for entry in self.counts.values():
            for k in total:
                total[k] += entry[k]
        return total


def coverage_summary(coverage: Coverage) -> str:
    total = coverage.totals()
    lines = [
        f"split {coverage.split}: {total['rows_filled']} of {total['rows_expected']} rows filled, "
        f"{total['rows_expected'] - total['rows_filled']} missing",
        "missing by reason: " + ", ".join(f"{c} {total[c]}" for c in CATEGORIES),
        f"{'source':<28} {'task':<24} {'cred':<4} {'expected':>9} {'filled':>9} {'missing':>8}",
    ]
    for row in coverage.table().to_pylist():
        lines.append(
            f"{str(row['source']):<28.28} {str(row['task']):<24.24} {str(row['credential']):<4} "
            f"{row['rows_expected']:>9} {row['rows_filled']:>9} {row['rows_missing']:>8}"
        )
    return "\n".join(lines)
