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
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medmax_pipeline import constants as C
from medmax_pipeline.artifacts import ArtifactWriter, describe_input, iter_artifact_batches, read_artifact, write_artifact
from medmax_pipeline.image_keys import CredentialedSource, image_key_for_row
from medmax_pipeline.rows import ROW_SCHEMA, read_row_batches
from medmax_pipeline.text_tokenizer import encode_texts, load_tokenizer

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


def check_image_block(block: Sequence[int] | np.ndarray) -> str | None:
    """None if `block` is 8197, 1024 ids in 4..8195, 8196; else why not."""
    ids = np.asarray(block)
    if ids.shape != (C.IMAGE_BLOCK_LEN,):
        return f"image block has {ids.size} ids, expected {C.IMAGE_BLOCK_LEN}"
    if ids[0] != C.BEGIN_IMAGE_ID or ids[-1] != C.END_IMAGE_ID:
        return f"image block is not framed by {C.BEGIN_IMAGE_ID} ... {C.END_IMAGE_ID}"
    codes = ids[1:-1]
    if codes.min() < C.FIRST_IMAGE_TOKEN_ID or codes.max() > C.LAST_IMAGE_TOKEN_ID:
        return f"image block has a code id outside {C.FIRST_IMAGE_TOKEN_ID}..{C.LAST_IMAGE_TOKEN_ID}"
    return None


def build_sequence(text_ids: Sequence[int], block: Sequence[int] | np.ndarray | None) -> np.ndarray:
    """[0] + text ids with every 8711 replaced by `block` + [2] (int32)."""
    ids = np.asarray(text_ids, dtype=np.int32)
    places = np.flatnonzero(ids == C.IMAGE_PLACEHOLDER_ID)
    if places.size and block is None:
        raise ValueError("text has <image> but the row has no image block")
    pieces: list[np.ndarray] = [np.array([C.BOS_ID], np.int32)]
    start = 0
    for place in places.tolist():
        pieces.append(ids[start:place])
        pieces.append(np.asarray(block, dtype=np.int32))
        start = place + 1
    pieces.append(ids[start:])
    pieces.append(np.array([C.EOS_ID], np.int32))
    return np.concatenate(pieces)


def _row_index(offsets: np.ndarray) -> np.ndarray:
    """Row of every flat value, for list offsets."""
    return np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))


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

    row_of = _row_index(offsets)
    nonempty = lengths > 0
    first = np.where(nonempty, values[np.minimum(offsets[:-1], max(len(values) - 1, 0))] if len(values) else -1, -1)
    last = np.where(nonempty, values[np.maximum(offsets[1:] - 1, 0)] if len(values) else -1, -1)
    pub_truncated = nonempty & (last != C.EOS_ID) & (lengths == published_max_length)

    flag(~nonempty, "published tokens are empty")
    out_of_range = (values < 0) | (values >= C.VOCAB_SIZE)
    flag(np.bincount(row_of[out_of_range], minlength=n) > 0, f"published tokens have an id outside [0, {C.VOCAB_SIZE})")
    flag(nonempty & (first != C.BOS_ID), f"published tokens do not start with bos {C.BOS_ID}")
    flag(nonempty & (last != C.EOS_ID) & ~pub_truncated, f"published tokens do not end with eos {C.EOS_ID}")
    flag(np.bincount(row_of[values == C.IMAGE_PLACEHOLDER_ID], minlength=n) > 0, "published tokens hold an unreplaced <image> (8711)")

    # Image blocks: mark the inside of every block opened by 8197 with a difference array.
    begins = np.flatnonzero(values == C.BEGIN_IMAGE_ID)
    begin_rows = row_of[begins]
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
    bad_block = np.bincount(row_of[bad_position], minlength=n) > 0
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
        rows = _row_index(offsets)[begins]
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
    """Image blocks and image problems of the credentialed sources, by image key."""

    index: dict[str, int] = field(default_factory=dict)
    blocks: np.ndarray = field(default_factory=lambda: np.zeros((0, C.IMAGE_BLOCK_LEN), np.int32))
    unreadable: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)


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
        chunks: list[np.ndarray] = []
        position = 0  # row of the next block in the concatenated array
        for batch in iter_artifact_batches(image_blocks, "image_blocks", columns=["image_key", "block"]):
            batch = batch.filter(wanted(batch.column(0)))
            if batch.num_rows == 0:
                continue
            lengths = pc.fill_null(pc.list_value_length(batch.column(1)), 0).to_numpy(zero_copy_only=False)
            good = lengths == C.IMAGE_BLOCK_LEN
            keys = batch.column(0).to_pylist()
            flat = batch.column(1).filter(pa.array(good)).flatten().to_numpy(zero_copy_only=False)
            array = flat.astype(np.int32).reshape(-1, C.IMAGE_BLOCK_LEN)
            chunks.append(array)
            blocks = iter(array)
            for key, ok in zip(keys, good.tolist()):
                if not ok:
                    lookup.unreadable.setdefault(key, f"image block has the wrong length (expected {C.IMAGE_BLOCK_LEN} ids)")
                    continue
                reason = check_image_block(next(blocks))
                if reason is not None:
                    lookup.unreadable.setdefault(key, reason)
                elif key not in lookup.index:  # first one wins: deterministic
                    lookup.index[key] = position
                position += 1
        if chunks:
            lookup.blocks = np.concatenate(chunks)
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
    n_images = pc.fill_null(pc.count_substring(batch.column("text"), IMAGE_TAG), 0).to_numpy(zero_copy_only=False)
    credential = batch.column("credential")
    public_mask = pc.equal(credential, "no").to_numpy(zero_copy_only=False)
    parts: list[tuple[np.ndarray, pa.ListArray, np.ndarray]] = []  # (row indices, tokens, publisher truncated)

    # Public rows: published tokens, checked, all vectorized.
    public_index = np.flatnonzero(public_mask)
    if public_index.size:
        public = batch.take(pa.array(public_index))
        has_path = pc.fill_null(pc.greater(pc.utf8_length(public.column("image_path")), 0), False).to_numpy(zero_copy_only=False)
        images = n_images[public_index]
        tokens = public.column("tokens")
        offsets = tokens.offsets.to_numpy() - tokens.offsets[0].as_py()
        values = tokens.values.slice(tokens.offsets[0].as_py(), int(offsets[-1])).to_numpy(zero_copy_only=False)
        reasons, pub_truncated = check_published_tokens(values, offsets, images, settings.published_max_length)
        keep = np.ones(len(public_index), dtype=bool)
        rows = None
        for i in range(len(public_index)):
            category = None
            if images[i] > 0 and not has_path[i]:
                category, reason = MALFORMED_ROW, f"text has {images[i]} <image> but the row has no image_path"
            elif images[i] == 0 and has_path[i]:
                category, reason = MALFORMED_ROW, "row has an image_path but its text has no <image>"
            elif reasons[i] is not None:
                category, reason = INVALID_TOKENS, reasons[i]  # type: ignore[assignment]
            if category is not None:
                rows = rows or public.select(["row_id", "line", "source", "task", "credential"]).to_pylist()
                problems.append(_problem(rows[i], category, reason, file))
                keep[i] = False
        kept = np.flatnonzero(keep)
        if kept.size < len(public_index):
            values, offsets = _select_lists(values, offsets, kept)
        parts.append((public_index[kept], _list_array(values, offsets), pub_truncated[kept]))

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
                blocks.append(lookup.blocks[lookup.index[key.key]])
            elif key.key in lookup.unreadable:
                problems.append(_problem(row, IMAGE_UNREADABLE, f"{key.key}: {lookup.unreadable[key.key]}", file))
            elif key.key in lookup.missing:
                problems.append(_problem(row, IMAGE_MISSING, f"{key.key}: {lookup.missing[key.key]}", file))
            else:
                problems.append(_problem(row, IMAGE_MISSING, f"{key.key}: no image block (not collected or not tokenized)", file))
        encoded = encode_texts(tokenizer, [cred_rows[i]["text"] for i in good]) if good else []
        sequences: list[np.ndarray] = []
        kept_cred: list[int] = []
        for i, ids, block in zip(good, encoded, blocks):
            placeholders = ids.count(C.IMAGE_PLACEHOLDER_ID)
            if placeholders != int(n_images[cred_index[i]]):
                problems.append(
                    _problem(cred_rows[i], MALFORMED_ROW, f"text has {n_images[cred_index[i]]} <image> but encodes to {placeholders} id 8711", file)
                )
                continue
            sequences.append(build_sequence(ids, block))
            kept_cred.append(i)
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.concatenate(sequences) if sequences else np.zeros(0, np.int32)
        parts.append((cred_index[np.array(kept_cred, dtype=np.int64)], _list_array(values, offsets), np.zeros(len(kept_cred), bool)))

    # Both kinds together, back in file order, then the length limit.
    row_index = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int64)
    order = np.argsort(row_index, kind="stable")
    row_index = row_index[order]
    tokens = pa.concat_arrays([p[1] for p in parts]).take(pa.array(order)) if parts else _list_array(np.zeros(0), np.zeros(1))
    pub_truncated = np.concatenate([p[2] for p in parts])[order] if parts else np.zeros(0, bool)
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    values = tokens.values.slice(tokens.offsets[0].as_py(), int(offsets[-1])).to_numpy(zero_copy_only=False)
    lengths = np.diff(offsets)
    cut = truncation_lengths(values, offsets, settings.max_length)
    keep = np.ones(len(row_index), dtype=bool)
    too_long = lengths > settings.max_length
    if settings.overflow == "drop":
        keep &= ~too_long
    keep &= cut > 1  # nothing left but bos: the first image block does not fit at all
    if not keep.all():
        dropped = batch.take(pa.array(row_index[~keep])).select(["row_id", "line", "source", "task", "credential"]).to_pylist()
        for row, length in zip(dropped, lengths[~keep].tolist()):
            problems.append(_problem(row, TOO_LONG, f"{length} ids > max length {settings.max_length}", file))
    values, offsets = take_prefixes(values, offsets, cut)
    out = batch.take(pa.array(row_index)).set_column(ROW_SCHEMA.get_field_index("tokens"), "tokens", _list_array(values, offsets))
    truncated = (cut < lengths) | pub_truncated
    out = pa.RecordBatch.from_arrays(
        list(out.columns) + [pa.array(np.diff(offsets).astype(np.int32)), pa.array(truncated)], schema=DATASET_SCHEMA
    )
    if not keep.all():
        out = out.filter(pa.array(keep))
    return BatchResult(out, problems)


def _select_lists(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.diff(offsets)[rows]
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    index = np.arange(new_offsets[-1]) + np.repeat(offsets[:-1][rows] - new_offsets[:-1], lengths)
    return values[index], new_offsets


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
    log: Any = sys.stdout,
) -> Coverage:
    """Run stage 4 for one split; returns the coverage. Raises AssemblyError past the error fraction."""
    if overflow not in ("truncate", "drop"):
        raise AssemblyError(f"--overflow {overflow!r}: expected 'truncate' or 'drop'")
    if max_length < 2:
        raise AssemblyError(f"--max-length {max_length}: expected at least 2")
    sources = parse_credentialed(credentialed) if not isinstance(credentialed, Mapping) else dict(credentialed)
    rows = Path(rows)
    output_dir = Path(output_dir)
    tokenizer = load_tokenizer(tokenizer_path)
    if encode_texts(tokenizer, [IMAGE_TAG])[0] != [C.IMAGE_PLACEHOLDER_ID]:
        raise AssemblyError(
            f"{tokenizer_path}: '<image>' does not encode to [{C.IMAGE_PLACEHOLDER_ID}]; pass text_tokenizer_modified.json"
        )
    optional = {k: Path(v) if v is not None else None for k, v in (("image_blocks", image_blocks), ("path_problems", path_problems), ("token_errors", token_errors))}
    lookup = load_image_lookup(optional["image_blocks"], optional["path_problems"], optional["token_errors"], sources)
    settings = Settings(split, max_length, overflow, published_max_length)

    # The row file is hashed once for both lineages. Public lineage: the row file only.
    rows_input = describe_input(rows)
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
    try:
        for batch, row_problems in _prefetch(read_row_batches(rows, split, batch_size)):
            result = assemble_batch(batch, settings, str(rows), sources, lookup, tokenizer)
            problems = [
                {"file": p.file, "line": p.line, "row_id": p.row_id, "source": None, "task": None, "credential": None,
                 "category": MALFORMED_ROW, "reason": p.reason}
                for p in row_problems
            ] + result.problems
            problems.sort(key=lambda p: p["line"])
            n_input += batch.num_rows + len(row_problems)
            dataset_writer.write(result.dataset)
            public_rows = result.dataset.filter(pc.equal(result.dataset.column("credential"), "no"))
            public_writer.write(public_rows)
            if problems:
                problem_writer.write(pa.Table.from_pylist(problems, schema=PROBLEM_SCHEMA))
            coverage.add_filled(result.dataset)
            for problem in problems:
                coverage.add_problem(problem)
                if problem["category"] in ERROR_CATEGORIES:
                    n_errors += 1
                    if len(first_errors) < 20:
                        first_errors.append(f"  {problem['file']}:{problem['line']}: {problem['reason']}")
        if n_input and n_errors / n_input > max_error_fraction:
            raise AssemblyError(
                f"{rows}: {n_errors} of {n_input} rows are malformed ({n_errors / n_input:.2%} > --max-error-fraction "
                f"{max_error_fraction:.2%}); no outputs written. First problems:\n" + "\n".join(first_errors)
            )
    except BaseException:
        for writer in writers:
            writer.abort()
        for name in OUTPUT_FILES:  # nothing stale may look like the result of this run
            (output_dir / name).unlink(missing_ok=True)
        raise
    for writer in writers:
        writer.close()
    write_artifact(coverage.table(), output_dir / "coverage.parquet", artifact="coverage", inputs=private_inputs, params=params)
    summary = coverage_summary(coverage)
    (output_dir / "coverage_summary.txt").write_text(summary + "\n")
    elapsed = time.perf_counter() - started
    print(summary, file=log)
    print(f"assembled {n_input} rows in {elapsed:.1f} s ({n_input / max(elapsed, 1e-9):.0f} rows/s)", file=log)
    return coverage


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
        )
    except (AssemblyError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
