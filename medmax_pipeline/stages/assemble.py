"""Stage 4: credential-aware dataset assembly, one job per split.

Input: one MedMax row file (train.jsonl / validation.jsonl), the image blocks of stage 3, the
problems of stages 1 and 2, and the modified text tokenizer. Output, in --output-dir:

    dataset.parquet          (artifact dataset) every row that could be filled, in file order:
                             ROW_SCHEMA columns + n_tokens int32 + truncated bool. Credentialed
                             as soon as one credential = yes row is in it: stays on this machine.
    dataset_public.parquet   (artifact dataset_public, written as public) the credential = no rows
                             of dataset.parquet, identical to them. Its lineage names the row file
                             only: public rows keep their published tokens and need nothing else,
                             so no credentialed input can reach it, and the writer's guard holds.
    dataset_problems.parquet (artifact dataset_problems) every input row that is not in dataset:
                             file, line, row_id, source, task, credential, category, reason.
    coverage.parquet         (artifact coverage) per split, source, task, credential: rows
                             expected / filled / missing and the missing rows by category.
    coverage_summary.txt     the same, as printed at the end.

Sequences. Public rows (credential = no) keep their published tokens after check_published_tokens.
Credentialed rows get [0] + BPE(text) + [2], each <image> (8711) replaced by the 1026-id block of
the row's image (image_key_for_row -> image_blocks.block).

Truncation (--max-length, --overflow truncate): keep the first max_length ids, but never cut
inside an image block: when the cut falls inside one, cut just before its begin id 8197, so the
sequence may end up shorter than max_length. No eos is appended after a cut (the public release
truncated the same way; an eos there would teach the model to stop mid-answer). A published
sequence that the publisher already truncated (no eos, exactly --published-max-length ids) is
accepted; a partial image block at its end is cut off the same way. `truncated` is true for both.
--overflow drop instead moves rows longer than max_length to dataset_problems.

Failing: malformed input (unreadable lines, <image> / image mismatches, invalid published tokens)
is reported per row and the rest processed; past --max-error-fraction of the input rows the stage
exits non-zero and writes none of its outputs (older outputs in the folder are removed, so that
nothing stale looks complete).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.artifacts import (
    FINGERPRINT_PREFIX,
    ArtifactWriter,
    describe_input,
    new_hash,
    iter_artifact_batches,
    read_artifact,
    read_meta,
    write_artifact,
)
from medmax_pipeline.core.sequences import block_problems, build_sequence
from medmax_pipeline.core.image_keys import CredentialedSource, image_key_for_row
from medmax_pipeline.core.rows import ROW_SCHEMA, RowProblem, plan_jsonl_batches, read_jsonl_range, read_row_batches
from medmax_pipeline.core.text_tokenizer import encode_texts, load_tokenizer

# Categories of a missing row: the coverage columns, in this order.
IMAGE_MISSING = "image_missing"
IMAGE_UNREADABLE = "image_unreadable"
NO_IMAGE_KEY = "no_image_key"
MALFORMED_ROW = "malformed_row"
TOO_LONG = "dropped_too_long"
INVALID_TOKENS = "invalid_published_tokens"
CATEGORIES = (IMAGE_MISSING, IMAGE_UNREADABLE, NO_IMAGE_KEY, MALFORMED_ROW, TOO_LONG, INVALID_TOKENS)
# Categories that say the input itself is broken (they count toward --max-error-fraction);
# missing or unreadable images and too long rows are expected and only counted.
ERROR_CATEGORIES = (MALFORMED_ROW, INVALID_TOKENS)

IMAGE_TAG = "<image>"
PUBLISHED_MAX_LENGTH = 2048  # the public release truncated at 2048 ids (MEDMAX-FACTS.md)

DATASET_SCHEMA = pa.schema(list(ROW_SCHEMA) + [("n_tokens", pa.int32()), ("truncated", pa.bool_())])
PROBLEM_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("line", pa.int64()),
        ("row_id", pa.string()),
        ("source", pa.string()),
        ("task", pa.string()),
        ("credential", pa.string()),
        ("category", pa.string()),
        ("reason", pa.string()),
    ]
)
COVERAGE_KEYS = ("split", "source", "task", "credential")
COVERAGE_SCHEMA = pa.schema(
    [(k, pa.string()) for k in COVERAGE_KEYS]
    + [("rows_expected", pa.int64()), ("rows_filled", pa.int64()), ("rows_missing", pa.int64())]
    + [(c, pa.int64()) for c in CATEGORIES]
)


class AssemblyError(Exception):
    """The stage cannot produce its outputs (too many malformed rows, a bad tokenizer, ...)."""


# ----------------------------------------------------------------------------------------------
# Pure sequence logic
# ----------------------------------------------------------------------------------------------


def _rows_of(offsets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Row of each flat value position, for list offsets. Only for the few positions asked about:
    a row index for every value (np.repeat) cost as much as the checks that read it."""
    return np.searchsorted(offsets, positions, side="right") - 1


def check_published_tokens(
    values: np.ndarray,
    offsets: np.ndarray,
    n_images: np.ndarray,
    published_max_length: int = PUBLISHED_MAX_LENGTH,
) -> tuple[list[str | None], np.ndarray]:
    """Check published sequences (flat `values`, list `offsets`) against the contract.

    Returns (reason or None per row, publisher-truncated mask). A row passes when every id is in
    [0, 65536), it starts with 0, ends with 2 (or is exactly `published_max_length` ids long:
    truncated by the publisher), holds no unreplaced 8711, every 8197 opens a block of 1024 code
    ids in 4..8195 closed by 8196 (only the last block of a publisher-truncated row may be cut
    short), no image id lies outside a block, and it has as many blocks as its text has <image>
    (at most as many when truncated).
    """
    values = np.asarray(values)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    reasons: list[str | None] = [None] * n

    def flag(mask: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(mask).tolist():
            if reasons[i] is None:
                reasons[i] = reason

    nonempty = lengths > 0
    first = np.where(nonempty, values[np.minimum(offsets[:-1], max(len(values) - 1, 0))] if len(values) else -1, -1)
    last = np.where(nonempty, values[np.maximum(offsets[1:] - 1, 0)] if len(values) else -1, -1)
    pub_truncated = nonempty & (last != C.EOS_ID) & (lengths == published_max_length)

    flag(~nonempty, "published tokens are empty")
    out_of_range = (values < 0) | (values >= C.VOCAB_SIZE)
    flag(np.bincount(_rows_of(offsets, np.flatnonzero(out_of_range)), minlength=n) > 0, f"published tokens have an id outside [0, {C.VOCAB_SIZE})")
    flag(nonempty & (first != C.BOS_ID), f"published tokens do not start with bos {C.BOS_ID}")
    flag(nonempty & (last != C.EOS_ID) & ~pub_truncated, f"published tokens do not end with eos {C.EOS_ID}")
    flag(np.bincount(_rows_of(offsets, np.flatnonzero(values == C.IMAGE_PLACEHOLDER_ID)), minlength=n) > 0, "published tokens hold an unreplaced <image> (8711)")

    # Image blocks: mark the inside of every block opened by 8197 with a difference array.
    begins = np.flatnonzero(values == C.BEGIN_IMAGE_ID)
    begin_rows = _rows_of(offsets, begins)
    row_ends = offsets[1:][begin_rows]
    ends = begins + C.IMAGE_BLOCK_LEN - 1
    complete = ends < row_ends
    closed = np.zeros(len(begins), dtype=bool)
    closed[complete] = values[ends[complete]] == C.END_IMAGE_ID
    diff = np.zeros(len(values) + 1, dtype=np.int32)
    np.add.at(diff, begins + 1, 1)
    np.add.at(diff, np.minimum(ends, row_ends), -1)
    inside = np.cumsum(diff[:-1]) > 0
    is_code = (values >= C.FIRST_IMAGE_TOKEN_ID) & (values <= C.LAST_IMAGE_TOKEN_ID)
    frame = np.zeros(len(values), dtype=bool)
    frame[begins] = True
    frame[ends[closed]] = True
    is_image_id = is_code | (values == C.BEGIN_IMAGE_ID) | (values == C.END_IMAGE_ID)
    bad_position = (inside & ~is_code) | (~inside & is_image_id & ~frame)
    bad_block = np.bincount(_rows_of(offsets, np.flatnonzero(bad_position)), minlength=n) > 0
    unclosed = complete & ~closed
    bad_block |= np.bincount(begin_rows[unclosed], minlength=n) > 0
    partial_rows = begin_rows[~complete]
    # A block cut short is only allowed at the end of a publisher-truncated row.
    bad_block |= (np.bincount(partial_rows, minlength=n) > 0) & ~pub_truncated
    flag(bad_block, "published tokens have a malformed image block (expected 8197, 1024 ids in 4..8195, 8196)")

    n_blocks = np.bincount(begin_rows, minlength=n)
    n_images = np.asarray(n_images)
    mismatch = np.where(pub_truncated, n_blocks > n_images, n_blocks != n_images)
    for i in np.flatnonzero(mismatch).tolist():
        if reasons[i] is None:
            reasons[i] = f"published tokens have {n_blocks[i]} image block(s), text has {n_images[i]} <image>"
    return reasons, pub_truncated


def truncation_lengths(values: np.ndarray, offsets: np.ndarray, max_length: int) -> np.ndarray:
    """Kept length of each sequence: min(length, max_length), moved back to the begin of an image
    block that the cut (or the sequence's own end) would split."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    cut = np.minimum(lengths, max_length)
    begins = np.flatnonzero(np.asarray(values) == C.BEGIN_IMAGE_ID)
    if begins.size:
        rows = _rows_of(offsets, begins)
        position = begins - offsets[:-1][rows]
        split = (position < cut[rows]) & (position + C.IMAGE_BLOCK_LEN > cut[rows])
        np.minimum.at(cut, rows[split], position[split])
    return cut


def take_prefixes(values: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first keep[i] values of each list: (flat values, offsets)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    keep = np.asarray(keep, dtype=np.int64)
    new_offsets = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=new_offsets[1:])
    if np.array_equal(keep, np.diff(offsets)):
        return np.asarray(values), offsets
    index = np.arange(new_offsets[-1]) + np.repeat(offsets[:-1] - new_offsets[:-1], keep)
    return np.asarray(values)[index], new_offsets


# ----------------------------------------------------------------------------------------------
# Inputs from other stages
# ----------------------------------------------------------------------------------------------


def parse_credentialed(entries: Sequence[str]) -> dict[str, CredentialedSource]:
    """SOURCE=ROOT=TEMPLATE strings (as Snakemake passes them) to CredentialedSource by source."""
    sources: dict[str, CredentialedSource] = {}
    for entry in entries:
        parts = entry.split("=", 2)
        if len(parts) != 3 or not all(parts):
            raise AssemblyError(f"--credentialed {entry!r}: expected SOURCE=ROOT=TEMPLATE")
        if parts[0] in sources:
            raise AssemblyError(f"--credentialed: source {parts[0]!r} is given twice")
        sources[parts[0]] = CredentialedSource(*parts)
    return sources


@dataclass
class ImageLookup:
    """Image blocks and image problems of the credentialed sources, by image key.

    A block is kept as its 1024 VQGAN codes (0..8191) in one uint16 row of `codes`, row index[key]:
    half the memory of int32 ids, and the frame 8197 ... 8196 and the +4 offset are added back by
    block(), so every block handed out is valid by construction."""

    index: dict[str, int] = field(default_factory=dict)
    codes: np.ndarray = field(default_factory=lambda: np.zeros((0, C.CODES_PER_IMAGE), np.uint16))
    unreadable: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def block(self, key: str) -> np.ndarray:
        """The 1026-id block (int32) of a key in `index`."""
        out = np.empty(C.IMAGE_BLOCK_LEN, np.int32)
        out[0], out[-1] = C.BEGIN_IMAGE_ID, C.END_IMAGE_ID
        np.add(self.codes[self.index[key]], C.IMAGE_CODE_OFFSET, out=out[1:-1], dtype=np.int32)
        return out


def load_image_lookup(
    image_blocks: Path | None, path_problems: Path | None, token_errors: Path | None, sources: Mapping[str, CredentialedSource]
) -> ImageLookup:
    """Keep only keys of the configured credentialed sources: public rows never need an image,
    so memory is bounded by the credentialed images, however many rows there are."""
    lookup = ImageLookup()
    prefixes = tuple(f"{s}:" for s in sources)
    if not prefixes:
        return lookup

    def wanted(keys: pa.Array) -> pa.Array:
        mask = pc.starts_with(keys, prefixes[0])
        for prefix in prefixes[1:]:
            mask = pc.or_(mask, pc.starts_with(keys, prefix))
        return pc.fill_null(mask, False)

    if image_blocks is not None:
        # Room for every block of the file: np.empty only takes memory for the rows written, and
        # filling one preallocated array never holds two copies of the blocks (as concatenating would).
        codes = np.empty((read_meta(image_blocks).num_rows, C.CODES_PER_IMAGE), np.uint16)
        n_codes = 0
        # Small batches: a batch is held as int32 ids while it is checked.
        for batch in iter_artifact_batches(image_blocks, "image_blocks", batch_size=8192, columns=["image_key", "block"]):
            batch = batch.filter(wanted(batch.column(0)))
            if batch.num_rows == 0:
                continue
            lengths = pc.fill_null(pc.list_value_length(batch.column(1)), 0).to_numpy(zero_copy_only=False)
            good = lengths == C.IMAGE_BLOCK_LEN
            keys = batch.column(0).to_pylist()
            flat = batch.column(1).filter(pa.array(good)).flatten().to_numpy(zero_copy_only=False)
            blocks = flat.reshape(-1, C.IMAGE_BLOCK_LEN)
            reasons = iter(block_problems(blocks))
            rows = iter(range(len(blocks)))
            for key, ok in zip(keys, good.tolist()):
                if not ok:
                    lookup.unreadable.setdefault(key, f"image block has the wrong length (expected {C.IMAGE_BLOCK_LEN} ids)")
                    continue
                reason, row = next(reasons), next(rows)
                if reason is not None:
                    lookup.unreadable.setdefault(key, reason)
                elif key not in lookup.index:  # first one wins: deterministic
                    codes[n_codes] = blocks[row, 1:-1] - C.IMAGE_CODE_OFFSET  # checked: 0..8191 fits uint16
                    lookup.index[key] = n_codes
                    n_codes += 1
        lookup.codes = codes[:n_codes]
    if token_errors is not None:
        table = read_artifact(token_errors, "image_token_errors", columns=["image_key", "reason"])
        table = table.filter(wanted(table.column("image_key")))
        for key, reason in zip(table.column("image_key").to_pylist(), table.column("reason").to_pylist()):
            lookup.unreadable.setdefault(key, f"image unreadable: {reason}")
    if path_problems is not None:
        table = read_artifact(path_problems, "image_path_problems", columns=["image_key", "reason"])
        table = table.filter(wanted(table.column("image_key")))
        for key, reason in zip(table.column("image_key").to_pylist(), table.column("reason").to_pylist()):
            lookup.missing.setdefault(key, f"image missing: {reason}")
    return lookup


# ----------------------------------------------------------------------------------------------
# One batch
# ----------------------------------------------------------------------------------------------


@dataclass
class Settings:
    split: str
    max_length: int = C.DEFAULT_MAX_LENGTH
    overflow: str = "truncate"
    published_max_length: int = PUBLISHED_MAX_LENGTH


@dataclass
class BatchResult:
    dataset: pa.RecordBatch
    problems: list[dict[str, Any]]


def _problem(row: Mapping[str, Any], category: str, reason: str, file: str) -> dict[str, Any]:
    return {
        "file": file,
        "line": row["line"],
        "row_id": row["row_id"],
        "source": row.get("source"),
        "task": row.get("task"),
        "credential": row.get("credential"),
        "category": category,
        "reason": reason,
    }


def _list_array(values: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(np.asarray(values, dtype=np.int32)))


def _encode_texts_fast(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """encode_texts, through encode_batch_fast where the tokenizers library has it: the same ids
    without computing character offsets, which the stage never reads (~20% less BPE time)."""
    fast = getattr(tokenizer, "encode_batch_fast", None)
    if fast is None:
        return encode_texts(tokenizer, texts)
    return [e.ids for e in fast(texts, add_special_tokens=False)]


def assemble_batch(
    batch: pa.RecordBatch,
    settings: Settings,
    file: str,
    sources: Mapping[str, CredentialedSource],
    lookup: ImageLookup,
    tokenizer: Any,
) -> BatchResult:
    """Turn one batch of ROW_SCHEMA rows into dataset rows (file order) and problem rows."""
    problems: list[dict[str, Any]] = []
    n = batch.num_rows
    n_images = pc.fill_null(pc.count_substring(batch.column("text"), IMAGE_TAG), 0).to_numpy(zero_copy_only=False)
    public_mask = pc.equal(batch.column("credential"), "no").to_numpy(zero_copy_only=False)
    # The published tokens of the whole batch, without copies: rows are sliced out of `values`
    # at the end, in one concatenation (pyarrow's take / filter on list columns copied them
    # several times and was the most expensive part of this function).
    tokens = batch.column("tokens")
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    values = tokens.values.slice(tokens.offsets[0].as_py(), int(offsets[-1])).to_numpy(zero_copy_only=False)
    keep = np.zeros(n, dtype=bool)
    built: dict[int, np.ndarray] = {}  # row -> sequence built for a credentialed row
    pub_truncated = np.zeros(n, dtype=bool)
    meta_rows: list[dict[str, Any]] | None = None  # row_id, line, ... of every row, made when a problem needs them

    # Public rows: published tokens, checked, all vectorized. The check is per row, so it runs
    # on the whole batch and only the public rows' answers are read.
    public_index = np.flatnonzero(public_mask)
    if public_index.size:
        has_path = pc.fill_null(pc.greater(pc.utf8_length(batch.column("image_path")), 0), False).to_numpy(zero_copy_only=False)
        reasons, truncated_by_publisher = check_published_tokens(values, offsets, n_images, settings.published_max_length)
        pub_truncated[public_index] = truncated_by_publisher[public_index]
        for i in public_index.tolist():
            category = None
            images = n_images[i]
            if images > 0 and not has_path[i]:
                category, reason = MALFORMED_ROW, f"text has {images} <image> but the row has no image_path"
            elif images == 0 and has_path[i]:
                category, reason = MALFORMED_ROW, "row has an image_path but its text has no <image>"
            elif reasons[i] is not None:
                category, reason = INVALID_TOKENS, reasons[i]  # type: ignore[assignment]
            if category is None:
                keep[i] = True
                continue
            meta_rows = meta_rows or batch.select(["row_id", "line", "source", "task", "credential"]).to_pylist()
            problems.append(_problem(meta_rows[i], category, reason, file))

    # Credentialed rows: build the sequence from text and the locally tokenized image.
    cred_index = np.flatnonzero(~public_mask)
    if cred_index.size:
        cred_rows = batch.take(pa.array(cred_index)).select(
            ["row_id", "line", "text", "image_path", "task", "source", "credential", "extra"]
        ).to_pylist()
        good: list[int] = []
        blocks: list[np.ndarray | None] = []
        for i, row in enumerate(cred_rows):
            images = int(n_images[cred_index[i]])
            key = image_key_for_row(row, sources)
            if key.key is None:
                if images == 0:
                    good.append(i)  # a text-only row: nothing to look up
                    blocks.append(None)
                else:
                    problems.append(_problem(row, NO_IMAGE_KEY, key.problem or "no image key", file))
                continue
            if images == 0:
                problems.append(_problem(row, MALFORMED_ROW, f"row names image {key.key} but its text has no <image>", file))
            elif key.key in lookup.index:
                good.append(i)
                blocks.append(lookup.block(key.key))
            elif key.key in lookup.unreadable:
                problems.append(_problem(row, IMAGE_UNREADABLE, f"{key.key}: {lookup.unreadable[key.key]}", file))
            elif key.key in lookup.missing:
                problems.append(_problem(row, IMAGE_MISSING, f"{key.key}: {lookup.missing[key.key]}", file))
            else:
                problems.append(_problem(row, IMAGE_MISSING, f"{key.key}: no image block (not collected or not tokenized)", file))
        encoded = _encode_texts_fast(tokenizer, [cred_rows[i]["text"] for i in good]) if good else []
        for i, ids, block in zip(good, encoded, blocks):
            placeholders = ids.count(C.IMAGE_PLACEHOLDER_ID)
            if placeholders != int(n_images[cred_index[i]]):
                problems.append(
                    _problem(cred_rows[i], MALFORMED_ROW, f"text has {n_images[cred_index[i]]} <image> but encodes to {placeholders} id 8711", file)
                )
                continue
            row = int(cred_index[i])
            built[row] = build_sequence(ids, block)
            keep[row] = True

    # Both kinds together, in file order, then the length limit.
    rows = np.flatnonzero(keep)
    bounds = offsets.tolist()
    pieces = [built[i] if i in built else values[bounds[i] : bounds[i + 1]] for i in rows.tolist()]
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    kept_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=kept_offsets[1:])
    kept_values = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    cut = truncation_lengths(kept_values, kept_offsets, settings.max_length)
    final = np.ones(len(rows), dtype=bool)
    if settings.overflow == "drop":
        final &= lengths <= settings.max_length
    final &= cut > 1  # nothing left but bos: the first image block does not fit at all
    if not final.all():
        meta_rows = meta_rows or batch.select(["row_id", "line", "source", "task", "credential"]).to_pylist()
        for i, length in zip(rows[~final].tolist(), lengths[~final].tolist()):
            problems.append(_problem(meta_rows[i], TOO_LONG, f"{length} ids > max length {settings.max_length}", file))
        kept_values, kept_offsets = _select_lists(kept_values, kept_offsets, np.flatnonzero(final))
        rows, lengths, cut = rows[final], lengths[final], cut[final]
    kept_values, kept_offsets = take_prefixes(kept_values, kept_offsets, cut)
    truncated = (cut < lengths) | pub_truncated[rows]
    other = [name for name in ROW_SCHEMA.names if name != "tokens"]
    columns = batch.select(other) if len(rows) == n else batch.select(other).take(pa.array(rows))
    arrays = [_list_array(kept_values, kept_offsets) if name == "tokens" else columns.column(name) for name in ROW_SCHEMA.names]
    out = pa.RecordBatch.from_arrays(
        arrays + [pa.array(np.diff(kept_offsets).astype(np.int32)), pa.array(truncated)], schema=DATASET_SCHEMA
    )
    return BatchResult(out, problems)


def _select_lists(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lists `rows` (increasing) of flat `values` / `offsets`: (values, offsets) of the selection.
    Copies runs of consecutive rows as slices: memcpy speed, no index array per value."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)[rows]
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    if len(rows) == 0:
        return values[:0], new_offsets
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    firsts = rows[np.concatenate([[0], breaks])]
    lasts = rows[np.concatenate([breaks - 1, [len(rows) - 1]])]
    bounds = offsets.tolist()
    return np.concatenate([values[bounds[a] : bounds[b + 1]] for a, b in zip(firsts.tolist(), lasts.tolist())]), new_offsets


# ----------------------------------------------------------------------------------------------
# Coverage
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------

OUTPUT_FILES = ("dataset.parquet", "dataset_public.parquet", "dataset_problems.parquet", "coverage.parquet", "coverage_summary.txt")


def _prefetch(iterator: Iterator[Any], depth: int = 2) -> Iterator[Any]:
    """Run `iterator` one step ahead in a thread, so reading overlaps assembly and writing."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def worker() -> None:
        try:
            for item in iterator:
                q.put(item)
        except BaseException as exc:  # handed to the consumer
            q.put(exc)
        q.put(done)

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _default_workers() -> int:
    """One reader per core, up to 4: past that the main process (writing and hashing both
    outputs) is the bottleneck."""
    return max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


@dataclass(frozen=True)
class _WorkerConfig:
    """What a worker process needs to assemble byte ranges of the row file (picklable)."""

    rows: Path
    settings: Settings
    sources: dict[str, CredentialedSource]
    tokenizer_path: Path
    lookup: ImageLookup  # its codes as an empty array: workers map them from codes_path
    codes_path: Path  # the lookup's codes, raw uint16, written once by the parent
    handoff_dir: Path  # where workers leave their batches as Arrow IPC files for the parent


_WORKER: dict[str, Any] = {}  # per worker process: config, tokenizer, image lookup


def _init_worker(config: _WorkerConfig) -> None:
    # Workers are spawned (not forked: the parent runs threads). The image lookup is built once,
    # by the parent: the workers get its keys with the config and map its codes read-only, so
    # its pages are shared instead of loaded and checked again in every worker.
    n_codes = len(config.lookup.index)
    codes = np.memmap(config.codes_path, np.uint16, "r", shape=(n_codes, C.CODES_PER_IMAGE)) if n_codes else config.lookup.codes
    _WORKER["config"] = config
    _WORKER["tokenizer"] = load_tokenizer(config.tokenizer_path)
    _WORKER["lookup"] = ImageLookup(config.lookup.index, codes, config.lookup.unreadable, config.lookup.missing)


def _assemble_rows(
    batch: pa.RecordBatch, row_problems: Sequence[RowProblem], settings: Settings, file: str,
    sources: Mapping[str, CredentialedSource], lookup: ImageLookup, tokenizer: Any,
) -> tuple[pa.RecordBatch, list[dict[str, Any]], int]:
    """One batch of the reader to (dataset rows, problems sorted by line, input rows)."""
    result = assemble_batch(batch, settings, file, sources, lookup, tokenizer)
    problems = [
        {"file": p.file, "line": p.line, "row_id": p.row_id, "source": None, "task": None, "credential": None,
         "category": MALFORMED_ROW, "reason": p.reason}
        for p in row_problems
    ] + result.problems
    problems.sort(key=lambda p: p["line"])
    return result.dataset, problems, batch.num_rows + len(row_problems)


def _assemble_range(task: tuple[int, int, int]) -> tuple[str, list[dict[str, Any]], int]:
    """Worker: read and assemble one batch, given as a byte range of the row file. The dataset
    rows go back as an Arrow IPC file in the handoff folder (named by the range's offset): one
    copy into shared memory and none out of it, where pickling through the pool's pipe made four."""
    config: _WorkerConfig = _WORKER["config"]
    batch, row_problems = read_jsonl_range(config.rows, config.settings.split, *task)
    dataset, problems, n_input = _assemble_rows(
        batch, row_problems, config.settings, str(config.rows), config.sources, _WORKER["lookup"], _WORKER["tokenizer"]
    )
    path = config.handoff_dir / f"{task[0]}.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, DATASET_SCHEMA) as writer:
        writer.write_batch(dataset)
    return str(path), problems, n_input


def _take_handoff(path: str) -> pa.RecordBatch:
    """Map a worker's batch (zero-copy) and remove its file; the mapping lives as long as the batch."""
    with pa.memory_map(path) as source:
        batch = pa.ipc.open_stream(source).read_next_batch()
    os.unlink(path)
    return batch


def _handoff_root() -> str | None:
    """/dev/shm where there is one (tmpfs: the batches never touch a disk), else the temp folder."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _parallel_batches(
    config: _WorkerConfig, batch_size: int, workers: int, rows_input: dict[str, Any]
) -> Iterator[tuple[pa.RecordBatch, list[dict[str, Any]], int]]:
    """Assembled batches of a jsonl row file, in file order, from `workers` processes.

    A thread reads the file once, hashes it (the lineage fingerprint goes into `rows_input` once
    the file is read) and cuts it into the batches of the serial reader (plan_jsonl_batches);
    workers read and assemble those byte ranges; results are taken back in submission order, so
    the outputs are those of the serial path. At most 2 batches per worker are in flight, which
    bounds memory however large the file."""
    tasks: queue.Queue = queue.Queue()
    done = object()
    hasher = new_hash()  # the hash of describe_input (artifacts._hash_file), fed block by block

    def plan() -> None:
        try:
            for task in plan_jsonl_batches(config.rows, batch_size, on_block=hasher.update):
                tasks.put(task)
            rows_input["fingerprint"] = FINGERPRINT_PREFIX + hasher.hexdigest()
            tasks.put(done)
        except BaseException as exc:  # handed to the consumer
            tasks.put(exc)

    threading.Thread(target=plan, daemon=True).start()
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(config,))
    try:
        pending: deque[Future] = deque()
        while True:
            task = tasks.get()
            if isinstance(task, BaseException):
                raise task
            if task is done:
                break
            pending.append(pool.submit(_assemble_range, task))
            if len(pending) > 2 * workers:
                path, problems, n_input = pending.popleft().result()
                yield _take_handoff(path), problems, n_input
        while pending:
            path, problems, n_input = pending.popleft().result()
            yield _take_handoff(path), problems, n_input
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


class _OrderedWriter:
    """An ArtifactWriter fed from its own thread, in submission order. The parquet encoding, zstd
    and hashing release the GIL, so the two dataset outputs are written and fingerprinted side by
    side instead of one after the other in the stage's main thread."""

    def __init__(self, writer: ArtifactWriter, prepare: Callable[[pa.RecordBatch], pa.RecordBatch] | None = None) -> None:
        self.writer = writer
        self.prepare = prepare
        self.thread = ThreadPoolExecutor(1)
        self.pending: deque[Future] = deque()

    def _write(self, batch: pa.RecordBatch) -> None:
        self.writer.write(self.prepare(batch) if self.prepare else batch)

    def submit(self, batch: pa.RecordBatch, max_pending: int = 2) -> None:
        self.pending.append(self.thread.submit(self._write, batch))
        while len(self.pending) > max_pending:  # bounds memory; raises the thread's error here
            self.pending.popleft().result()

    def finish(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.thread.shutdown(wait=True, cancel_futures=True)


def assemble(
    rows: str | Path,
    split: str,
    output_dir: str | Path,
    *,
    tokenizer_path: str | Path,
    image_blocks: str | Path | None = None,
    path_problems: str | Path | None = None,
    token_errors: str | Path | None = None,
    credentialed: Mapping[str, CredentialedSource] | Sequence[str] = (),
    max_length: int = C.DEFAULT_MAX_LENGTH,
    overflow: str = "truncate",
    max_error_fraction: float = 0.01,
    published_max_length: int = PUBLISHED_MAX_LENGTH,
    batch_size: int = 2048,
    workers: int | None = None,
    log: Any = sys.stdout,
) -> Coverage:
    """Run stage 4 for one split; returns the coverage. Raises AssemblyError past the error fraction.

    workers: processes that read and assemble a jsonl row file (default: one per core, up to 4);
    1 (or a parquet row file) assembles in this process. The outputs are the same either way."""
    if overflow not in ("truncate", "drop"):
        raise AssemblyError(f"--overflow {overflow!r}: expected 'truncate' or 'drop'")
    if max_length < 2:
        raise AssemblyError(f"--max-length {max_length}: expected at least 2")
    if batch_size < 1:
        raise AssemblyError(f"--batch-size {batch_size}: expected at least 1")
    workers = _default_workers() if workers is None else workers
    if workers < 1:
        raise AssemblyError(f"--workers {workers}: expected at least 1")
    sources = parse_credentialed(credentialed) if not isinstance(credentialed, Mapping) else dict(credentialed)
    rows = Path(rows)
    output_dir = Path(output_dir)
    if not rows.is_file():
        raise FileNotFoundError(f"dataset file {rows} does not exist")
    tokenizer = load_tokenizer(tokenizer_path)
    if encode_texts(tokenizer, [IMAGE_TAG])[0] != [C.IMAGE_PLACEHOLDER_ID]:
        raise AssemblyError(
            f"{tokenizer_path}: '<image>' does not encode to [{C.IMAGE_PLACEHOLDER_ID}]; pass text_tokenizer_modified.json"
        )
    optional = {k: Path(v) if v is not None else None for k, v in (("image_blocks", image_blocks), ("path_problems", path_problems), ("token_errors", token_errors))}
    settings = Settings(split, max_length, overflow, published_max_length)
    parallel = workers > 1 and rows.suffix != ".parquet"

    # The row file is hashed once for both lineages. Public lineage: the row file only. In
    # parallel, it is hashed while it is read (its fingerprint is filled in before the writers close).
    if parallel:
        rows_input: dict[str, Any] = {"path": str(rows), "artifact": None, "fingerprint": None, "credential": "public"}
        lookup = load_image_lookup(optional["image_blocks"], optional["path_problems"], optional["token_errors"], sources)
        handoff_dir = Path(tempfile.mkdtemp(prefix="medmax-assemble-", dir=_handoff_root()))
        codes_path = handoff_dir / "image_codes.u16"
        try:
            lookup.codes.tofile(codes_path)
        except BaseException:
            shutil.rmtree(handoff_dir, ignore_errors=True)
            raise
        # The workers map the file; this process keeps the keys only (a fresh empty array, so the
        # codes' memory is freed, not held by a view).
        lookup.codes = np.zeros((0, C.CODES_PER_IMAGE), np.uint16)
        config = _WorkerConfig(rows, settings, sources, Path(tokenizer_path), lookup, codes_path, handoff_dir)
        batches = _parallel_batches(config, batch_size, workers, rows_input)
    else:
        rows_input = describe_input(rows)
        lookup = load_image_lookup(optional["image_blocks"], optional["path_problems"], optional["token_errors"], sources)
        batches = (
            _assemble_rows(batch, row_problems, settings, str(rows), sources, lookup, tokenizer)
            for batch, row_problems in _prefetch(read_row_batches(rows, split, batch_size))
        )
    public_params = {"split": split, "max_length": max_length, "overflow": overflow, "published_max_length": published_max_length}
    params = {**public_params, "credentialed_sources": sorted(sources), "max_error_fraction": max_error_fraction}
    private_inputs: list[Any] = [rows_input, describe_input(tokenizer_path)]
    private_inputs += [p for p in optional.values() if p is not None]
    coverage = Coverage(split)
    n_input = n_errors = 0
    first_errors: list[str] = []
    started = time.perf_counter()
    writers = [
        ArtifactWriter(output_dir / "dataset.parquet", DATASET_SCHEMA, artifact="dataset", inputs=private_inputs, params=params),
        ArtifactWriter(output_dir / "dataset_public.parquet", DATASET_SCHEMA, artifact="dataset_public", inputs=[rows_input], params=public_params, credential="public"),
        ArtifactWriter(output_dir / "dataset_problems.parquet", PROBLEM_SCHEMA, artifact="dataset_problems", inputs=private_inputs, params=params),
    ]
    dataset_writer, public_writer, problem_writer = writers
    outputs = [_OrderedWriter(dataset_writer), _OrderedWriter(public_writer, _public_rows)]
    try:
        for dataset, problems, n_batch in batches:
            n_input += n_batch
            for output in outputs:
                output.submit(dataset)
            if problems:
                problem_writer.write(pa.Table.from_pylist(problems, schema=PROBLEM_SCHEMA))
            coverage.add_filled(dataset)
            for problem in problems:
                coverage.add_problem(problem)
                if problem["category"] in ERROR_CATEGORIES:
                    n_errors += 1
                    if len(first_errors) < 20:
                        first_errors.append(f"  {problem['file']}:{problem['line']}: {problem['reason']}")
        for output in outputs:
            output.finish()
        if n_input and n_errors / n_input > max_error_fraction:
            raise AssemblyError(
                f"{rows}: {n_errors} of {n_input} rows are malformed ({n_errors / n_input:.2%} > --max-error-fraction "
                f"{max_error_fraction:.2%}); no outputs written. First problems:\n" + "\n".join(first_errors)
            )
        if rows_input["fingerprint"] is None:
            raise AssemblyError(f"{rows}: the row file was not hashed")  # cannot happen: the planner hashes before its last batch
        for writer in writers:  # the writers copied rows_input while its fingerprint was pending
            for entry in writer.lineage["inputs"]:
                if entry["path"] == str(rows) and entry["artifact"] is None:
                    entry["fingerprint"] = rows_input["fingerprint"]
    except BaseException:
        for output in outputs:
            try:
                output.finish()
            except BaseException:  # noqa: S110 (the first error is the one raised)
                pass
        for writer in writers:
            writer.abort()
        for name in OUTPUT_FILES:  # nothing stale may look like the result of this run
            (output_dir / name).unlink(missing_ok=True)
        raise
    finally:
        batches.close()  # stops the worker pool (if any) before its handoff folder goes
        if parallel:
            shutil.rmtree(handoff_dir, ignore_errors=True)
    for writer in writers:
        writer.close()
    write_artifact(coverage.table(), output_dir / "coverage.parquet", artifact="coverage", inputs=private_inputs, params=params)
    summary = coverage_summary(coverage)
    (output_dir / "coverage_summary.txt").write_text(summary + "\n")
    elapsed = time.perf_counter() - started
    print(summary, file=log)
    print(f"assembled {n_input} rows in {elapsed:.1f} s ({n_input / max(elapsed, 1e-9):.0f} rows/s)", file=log)
    return coverage


def _public_rows(dataset: pa.RecordBatch) -> pa.RecordBatch:
    """The credential = no rows of a dataset batch (what dataset.filter would give, without
    pyarrow's slow copy of the token lists)."""
    public = pc.equal(dataset.column("credential"), "no").to_numpy(zero_copy_only=False)
    if public.all():
        return dataset
    rows = np.flatnonzero(public)
    tokens = dataset.column("tokens")
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    values = tokens.values.to_numpy(zero_copy_only=False)
    values, offsets = _select_lists(values, offsets, rows)
    other = [name for name in DATASET_SCHEMA.names if name != "tokens"]
    columns = dataset.select(other).take(pa.array(rows))
    arrays = [_list_array(values, offsets) if name == "tokens" else columns.column(name) for name in DATASET_SCHEMA.names]
    return pa.RecordBatch.from_arrays(arrays, schema=DATASET_SCHEMA)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", required=True, help="train.jsonl / validation.jsonl (or .parquet) of medmax_data")
    parser.add_argument("--split", required=True, choices=["train", "validation"])
    parser.add_argument("--image-blocks", help="image_blocks.parquet (stage 3)")
    parser.add_argument("--path-problems", help="image_path_problems.parquet (stage 1)")
    parser.add_argument("--token-errors", help="image_token_errors.parquet (stage 2)")
    parser.add_argument("--tokenizer", required=True, help="CKPT/tokenizer/text_tokenizer_modified.json")
    parser.add_argument("--credentialed", action="append", default=[], metavar="SOURCE=ROOT=TEMPLATE")
    parser.add_argument("--max-length", type=int, default=C.DEFAULT_MAX_LENGTH)
    parser.add_argument("--overflow", choices=["truncate", "drop"], default="truncate")
    parser.add_argument("--max-error-fraction", type=float, default=0.01)
    parser.add_argument("--published-max-length", type=int, default=PUBLISHED_MAX_LENGTH,
                        help="length at which the publisher truncated rows (accepted without eos)")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes reading and assembling a jsonl row file (default: one per core, up to 4)")
    parser.add_argument("--output-dir", required=True)


def run(args: argparse.Namespace) -> int:
    try:
        assemble(
            args.rows,
            args.split,
            args.output_dir,
            tokenizer_path=args.tokenizer,
            image_blocks=args.image_blocks,
            path_problems=args.path_problems,
            token_errors=args.token_errors,
            credentialed=args.credentialed,
            max_length=args.max_length,
            overflow=args.overflow,
            max_error_fraction=args.max_error_fraction,
            published_max_length=args.published_max_length,
            batch_size=args.batch_size,
            workers=args.workers,
        )
    except (AssemblyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
