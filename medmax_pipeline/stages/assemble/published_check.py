"""Checks of public rows' published image blocks against the blocks this machine derived itself.

Two questions, on rows whose published tokens already passed check_published_tokens:

- Does a public (credential = no) row carry the block of a credentialed image? The label alone is
  not trusted: a row whose complete block has exactly the codes of a locally tokenized
  credentialed image is refused (exact match of the 1024 codes; a block re-encoded differently
  would not match, so this catches copies, not look-alikes).
- Are the published tokens those the pipeline re-derives (images.include_public)? The row's first
  block is compared with the re-derived block of its image, key "public:<image_path>": medmax_data
  names one image per row, the first, so later blocks of a row have no image to compare with and
  are only counted. Per image: rows, identical rows, and the most codes that differ in a row.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from medmax_pipeline.core import constants as C
from medmax_pipeline.stages.assemble.image_lookup import ImageLookup, codes_digest

PUBLISHED_CHECK_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("image_key", pa.string()),
        ("rows", pa.int64()),  # public rows whose first block names this image
        ("compared_rows", pa.int64()),  # of those, compared with a re-derived block
        ("identical_rows", pa.int64()),
        ("differing_rows", pa.int64()),
        ("identical", pa.bool_()),  # every compared row identical; null when none was compared
        ("differing_codes", pa.int64()),  # the most of the 1024 codes that differ in one row; null when none compared
        ("unchecked_later_blocks", pa.int64()),  # blocks after the first in those rows: no image names them
    ]
)
# Per image key: rows, compared_rows, identical_rows, max differing codes (-1: none compared), later blocks.
PublishedCounts = dict[str, list[int]]


def complete_blocks(values: np.ndarray, offsets: np.ndarray, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(row, flat start) of every complete image block (8197 followed by 1025 more ids in the row)
    of the given rows, in order. The rows' tokens are already checked, so a block is well formed."""
    offsets = np.asarray(offsets, dtype=np.int64)
    begins = np.flatnonzero(np.asarray(values) == C.BEGIN_IMAGE_ID)
    begin_rows = np.searchsorted(offsets, begins, side="right") - 1
    wanted = np.zeros(len(offsets) - 1, dtype=bool)
    wanted[np.asarray(rows, dtype=np.int64)] = True
    keep = wanted[begin_rows] & (begins + C.IMAGE_BLOCK_LEN <= offsets[1:][begin_rows])
    return begin_rows[keep], begins[keep]


def block_codes(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """(n, 1024) VQGAN codes of the blocks starting at `starts`."""
    index = np.asarray(starts, dtype=np.int64)[:, None] + 1 + np.arange(C.CODES_PER_IMAGE)
    return np.asarray(values)[index].astype(np.int64) - C.IMAGE_CODE_OFFSET


def rows_with_credentialed_blocks(values: np.ndarray, offsets: np.ndarray, rows: Sequence[int], lookup: ImageLookup) -> dict[int, int]:
    """Row -> 1-based number of its first block whose codes are those of a credentialed image."""
    found: dict[int, int] = {}
    if not lookup.credentialed_digests or len(rows) == 0:
        return found
    block_rows, starts = complete_blocks(values, offsets, rows)
    codes = block_codes(values, starts)
    number: dict[int, int] = {}
    for row, block in zip(block_rows.tolist(), codes):
        number[row] = number.get(row, 0) + 1
        if row not in found and codes_digest(block) in lookup.credentialed_digests:
            found[row] = number[row]
    return found


def compare_published_blocks(
    values: np.ndarray, offsets: np.ndarray, rows: Sequence[int], image_paths: Sequence[str | None], lookup: ImageLookup
) -> PublishedCounts:
    """Counts per image key of the rows' first blocks against the re-derived public blocks.
    image_paths[i] is the image_path of rows[i]. Empty when no public block was re-derived."""
    counts: PublishedCounts = {}
    if not lookup.public_index or len(rows) == 0:
        return counts
    block_rows, starts = complete_blocks(values, offsets, rows)
    first = np.unique(block_rows, return_index=True)
    first_start = dict(zip(first[0].tolist(), starts[first[1]].tolist()))
    n_blocks = np.bincount(block_rows, minlength=len(offsets) - 1)
    compared_rows, compared_starts, compared_codes, compared_keys = [], [], [], []
    for row, path in zip(rows, image_paths):
        if not path or row not in first_start:
            continue
        key = f"public:{path}"
        entry = counts.setdefault(key, [0, 0, 0, -1, 0])
        entry[0] += 1
        entry[4] += int(n_blocks[row]) - 1
        if key in lookup.public_index:
            compared_rows.append(row)
            compared_starts.append(first_start[row])
            compared_codes.append(lookup.public_index[key])
            compared_keys.append(key)
    if compared_rows:
        published = block_codes(values, np.asarray(compared_starts))
        derived = np.asarray(lookup.codes[np.asarray(compared_codes)], dtype=np.int64)
        differing = (published != derived).sum(axis=1)
        for key, diff in zip(compared_keys, differing.tolist()):
            entry = counts[key]
            entry[1] += 1
            entry[2] += diff == 0
            entry[3] = max(entry[3], diff)
    return counts


class PublishedCheck:
    """compare_published_blocks counts of a whole split."""

    def __init__(self, split: str, enabled: bool) -> None:
        self.split = split
        self.enabled = enabled  # public blocks were re-derived: the check ran
        self.counts: PublishedCounts = {}

    def add(self, counts: PublishedCounts) -> None:
        for key, (rows, compared, identical, diff, later) in counts.items():
            entry = self.counts.setdefault(key, [0, 0, 0, -1, 0])
            entry[0] += rows
            entry[1] += compared
            entry[2] += identical
            entry[3] = max(entry[3], diff)
            entry[4] += later

    def table(self) -> pa.Table:
        rows: list[dict[str, Any]] = []
        for key in sorted(self.counts):
            n, compared, identical, diff, later = self.counts[key]
            rows.append({
                "split": self.split, "image_key": key, "rows": n, "compared_rows": compared, "identical_rows": identical,
                "differing_rows": compared - identical, "identical": compared == identical if compared else None,
                "differing_codes": diff if compared else None, "unchecked_later_blocks": later,
            })
        return pa.Table.from_pylist(rows, schema=PUBLISHED_CHECK_SCHEMA)

    def images(self) -> tuple[int, list[tuple[str, int]]]:
        """(images compared, [(key, most differing codes) of the images that differ])."""
        compared = [k for k, e in self.counts.items() if e[1]]
        differing = [(k, self.counts[k][3]) for k in sorted(compared) if self.counts[k][2] < self.counts[k][1]]
        return len(compared), differing

    def summary(self) -> str:
        if not self.enabled:
            return ("published token check: skipped, no re-derived blocks of public images "
                    "(collect ran without images.include_public); published_token_check.parquet is empty")
        compared, differing = self.images()
        not_compared = sum(e[0] - e[1] for e in self.counts.values())
        later = sum(e[4] for e in self.counts.values())
        return (f"published token check: {compared} public images compared, {compared - len(differing)} identical, "
                f"{len(differing)} differing; {not_compared} rows without a re-derived block, {later} later blocks unchecked")
