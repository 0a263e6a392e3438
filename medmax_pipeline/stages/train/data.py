"""The rows a run trains on: reading and checking a `dataset` split, the loss mask, collation,
and the seeded, length-grouped order of batches over ranks and epochs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.artifacts import ArtifactError, check_meta, read_meta

from .config import TrainConfig, TrainInputError


def response_labels(ids: Sequence[int]) -> list[int]:
    """Labels for one sequence: user turns masked with -100, responses kept (see the package doc).

    >>> response_labels([0, 10, 8710, 20, 21, 2])
    [-100, -100, -100, 20, 21, 2]
    >>> response_labels([0, 10, 8710, 20, 8710, 30, 8710, 40, 2])
    [-100, -100, -100, 20, 8710, -100, -100, 40, 2]
    """
    labels: list[int] = []
    in_response = False
    for token in ids:
        labels.append(int(token) if in_response else C.IGNORE_INDEX)
        if token == C.SEPARATOR_ID:
            in_response = not in_response  # the separator belongs to the turn it closes
    return labels


def collate(sequences: Sequence[Sequence[int]], pad_id: int = C.PAD_ID) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids with pad_id, labels with -100, attention_mask 1 on real tokens."""
    if not sequences:
        raise ValueError("collate needs at least one sequence")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), C.IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        input_ids[row, :n] = torch.as_tensor(list(seq), dtype=torch.long)
        labels[row, :n] = torch.as_tensor(response_labels(seq), dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def length_grouped_batches(
    lengths: Sequence[int] | np.ndarray, batch_size: int, seed: int, epoch: int, group_size: int = 64
) -> list[list[int]]:
    """Row indices in batches of similar length, in an order fixed by (seed, epoch).

    Rows are shuffled, cut into windows of batch_size * group_size, sorted by length inside each
    window and chunked into batches, and the batches are shuffled again, so padding stays small
    while each epoch still sees a fresh random order. Every row appears exactly once.
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(len(lengths))
    window = batch_size * group_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches; the tail that does not fill every rank is dropped so ranks stay in step."""
    usable = (len(batches) // world_size) * world_size
    return batches[rank:usable:world_size]


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    """Optimizer steps per epoch; a last, shorter accumulation is still a step (as in HF)."""
    return math.ceil(num_batches / grad_accum)


def epoch_batches(lengths: np.ndarray, cfg: TrainConfig, epoch: int, rank: int, world_size: int) -> list[list[int]]:
    """One rank's batches (row indices) for one epoch."""
    return shard_batches(length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_size), rank, world_size)


def count_total_steps(lengths: np.ndarray, cfg: TrainConfig, world_size: int) -> int:
    """Optimizer steps of the whole run: every epoch, or the --max-steps cap when smaller."""
    num_batches = len(epoch_batches(lengths, cfg, 0, 0, world_size))
    if num_batches == 0:
        raise TrainInputError(f"{len(lengths)} training rows do not fill one batch of {cfg.batch_size} on each of {world_size} process(es)")
    per_epoch = steps_per_epoch(num_batches, cfg.grad_accum)
    return per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)


@dataclass
class TokenRows:
    """The token sequences of one split, flat in memory (int32 values + int64 offsets)."""

    row_ids: list[str]
    values: np.ndarray
    offsets: np.ndarray
    truncated: int = 0  # rows cut to max_length
    dropped_no_response: int = 0

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> list[int]:
        return self.values[self.offsets[i] : self.offsets[i + 1]].tolist()


def _row_of(offsets: np.ndarray, flat_index: int) -> int:
    return int(np.searchsorted(offsets, flat_index, side="right") - 1)


def load_token_rows(path: str | Path, split: str, max_length: int, vocab_size: int) -> TokenRows:
    """Read one split of a `dataset` artifact and check it; TrainInputError on bad input.

    Checks: artifact name and schema version, required columns, a non-empty split, no row
    without tokens (a credentialed row not tokenized locally), no id outside [0, vocab_size),
    no <image> placeholder 8711 left unexpanded. Rows longer than max_length are cut to it.
    Rows with nothing to train on (no token after their first separator 8710) are dropped and
    counted; if no row is left, that is an error.
    """
    path = Path(path)
    row_ids, tokens = _read_split(path, split)
    lengths = pc.fill_null(pc.list_value_length(tokens), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise TrainInputError(
            f"dataset {path}: {len(empty)} {split} row(s) have no tokens, first {row_ids[empty[0]]!r} "
            "(credentialed rows must be tokenized locally before training)"
        )
    values = tokens.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    _check_token_ids(path, row_ids, values, offsets, vocab_size)
    # Truncate to max_length (the assembly stage already cut at 2048; a smaller --max-length cuts more).
    kept = np.minimum(lengths, max_length)
    truncated = int((lengths > max_length).sum())
    if truncated:
        keep_mask = np.arange(len(values)) - np.repeat(offsets[:-1], lengths) < np.repeat(kept, lengths)
        values = values[keep_mask]
        offsets = np.concatenate([[0], np.cumsum(kept)])
    return _drop_rows_without_response(path, split, TokenRows(row_ids, values, offsets, truncated=truncated))


def _read_split(path: Path, split: str) -> tuple[list[str], pa.ListArray]:
    """Row ids and token lists of one split of a checked `dataset` artifact."""
    try:
        meta = read_meta(path)
        check_meta(meta, "dataset")
    except ArtifactError as exc:
        raise TrainInputError(f"dataset {path}: {exc}") from exc
    names = pq.read_schema(path).names
    missing = [c for c in ("row_id", "split", "tokens") if c not in names]
    if missing:
        raise TrainInputError(f"dataset {path} lacks column(s) {', '.join(missing)}")
    table = pq.read_table(path, columns=["row_id", "split", "tokens"])
    splits = sorted(set(table.column("split").to_pylist()))
    table = table.filter(pc.equal(table.column("split"), split))
    if table.num_rows == 0:
        raise TrainInputError(f"dataset {path}: split {split!r} has no rows (splits present: {splits or 'none'})")
    tokens = table.column("tokens").combine_chunks()
    if isinstance(tokens, pa.ChunkedArray):  # pyarrow < 15 keeps a ChunkedArray
        tokens = pa.concat_arrays(tokens.chunks)
    return [str(r) for r in table.column("row_id").to_pylist()], tokens


def _check_token_ids(path: Path, row_ids: list[str], values: np.ndarray, offsets: np.ndarray, vocab_size: int) -> None:
    bad = np.flatnonzero((values < 0) | (values >= vocab_size))
    if len(bad):
        row = _row_of(offsets, int(bad[0]))
        raise TrainInputError(
            f"dataset {path}: {len(bad)} token id(s) outside the model's vocabulary [0, {vocab_size}), first "
            f"{int(values[bad[0]])} in row {row_ids[row]!r}; the dataset was built for another vocabulary"
        )
    placeholders = np.flatnonzero(values == C.IMAGE_PLACEHOLDER_ID)
    if len(placeholders):
        row = _row_of(offsets, int(placeholders[0]))
        raise TrainInputError(
            f"dataset {path}: row {row_ids[row]!r} still holds the <image> placeholder {C.IMAGE_PLACEHOLDER_ID}; "
            "every placeholder must be replaced by its image block at assembly"
        )


def _drop_rows_without_response(path: Path, split: str, rows: TokenRows) -> TokenRows:
    """The rows that train something (their first separator comes before their last token), the others counted."""
    values, offsets, row_ids = rows.values, rows.offsets, rows.row_ids
    seps = np.flatnonzero(values == C.SEPARATOR_ID)
    sep_rows = np.searchsorted(offsets, seps, side="right") - 1
    useful = np.zeros(len(row_ids), dtype=bool)
    useful[sep_rows[seps < offsets[sep_rows + 1] - 1]] = True
    dropped = int((~useful).sum())
    if not useful.any():
        raise TrainInputError(
            f"dataset {path}: none of the {len(row_ids)} {split} row(s) has a response after a "
            f"separator {C.SEPARATOR_ID}; there is nothing to train on"
        )
    if dropped:
        keep = np.flatnonzero(useful)
        new_lengths = np.diff(offsets)[keep]
        values = np.concatenate([values[offsets[i] : offsets[i + 1]] for i in keep])
        offsets = np.concatenate([[0], np.cumsum(new_lengths)])
        row_ids = [row_ids[i] for i in keep]
    return TokenRows(row_ids, values, offsets, truncated=rows.truncated, dropped_no_response=dropped)
