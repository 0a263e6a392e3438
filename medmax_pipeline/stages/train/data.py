"""The rows a run trains on: reading and checking a `dataset` split, the loss mask, collation,
and the seeded, length-grouped order of batches over ranks and epochs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.artifacts import ArtifactError, check_meta, read_artifact, read_meta

from .config import LOSS_MASKS, TrainConfig, TrainInputError


def response_labels(ids: Sequence[int], loss_mask: str = "first_separator") -> list[int]:
    """Labels for one sequence under a loss-mask policy (see the package doc), masked ids -100.

    first_separator (MedMax's public rule): everything up to and including the first 8710 is
    masked, everything after it trained; a row without 8710 is trained whole.
    alternating: every user turn (up to and including the 8710 that closes it) is masked, every
    response (with the 8710 that closes it and the final eos) trained.

    >>> response_labels([0, 10, 8710, 20, 8710, 30, 8710, 40, 2])
    [-100, -100, -100, 20, 8710, 30, 8710, 40, 2]
    >>> response_labels([0, 10, 8710, 20, 8710, 30, 8710, 40, 2], "alternating")
    [-100, -100, -100, 20, 8710, -100, -100, 40, 2]
    >>> response_labels([0, 10, 11, 2])
    [0, 10, 11, 2]
    """
    if loss_mask == "first_separator":
        ids = [int(t) for t in ids]
        if C.SEPARATOR_ID not in ids:
            return ids
        first = ids.index(C.SEPARATOR_ID)
        return [C.IGNORE_INDEX] * (first + 1) + ids[first + 1 :]
    if loss_mask == "alternating":
        labels: list[int] = []
        in_response = False
        for token in ids:
            labels.append(int(token) if in_response else C.IGNORE_INDEX)
            if token == C.SEPARATOR_ID:
                in_response = not in_response  # the separator belongs to the turn it closes
        return labels
    raise ValueError(f"loss mask {loss_mask!r}: expected one of {', '.join(LOSS_MASKS)}")


def label_profile(values: np.ndarray, offsets: np.ndarray, loss_mask: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row of flat values/offsets, vectorised over the separators only: (label tokens the loss
    sums over, i.e. trained positions after the first, and whether the row's final eos is masked).
    Equal to counting response_labels row by row (tested)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    seps = np.flatnonzero(np.asarray(values) == C.SEPARATOR_ID)
    sep_rows = np.searchsorted(offsets, seps, side="right") - 1
    local = seps - offsets[sep_rows]  # separator positions inside their rows, rows in order
    n_seps = np.bincount(sep_rows, minlength=n)
    ends_with_eos = (lengths > 0) & (np.asarray(values)[np.maximum(offsets[1:] - 1, 0)] == C.EOS_ID) if len(values) else np.zeros(n, bool)
    if loss_mask == "first_separator":
        first = np.full(n, -1, dtype=np.int64)  # -1: no separator, every position trained
        has = n_seps > 0
        first[has] = local[np.cumsum(n_seps)[has] - n_seps[has]]
        # Trained positions first+1 .. len-1 (position 0 has no previous token to predict it from).
        labels = np.maximum(lengths - 1 - np.maximum(first, 0), 0)
        return labels, ends_with_eos & has & (first >= lengths - 1)
    if loss_mask == "alternating":
        # Trained: (s1, s2], (s3, s4], ... and (s_last, end) when the row has an odd number of separators.
        index_in_row = np.arange(len(seps)) - np.repeat(np.cumsum(n_seps) - n_seps, n_seps)
        signed = np.where(index_in_row % 2 == 0, -local, local)  # - opening separators, + closing ones
        labels = np.bincount(sep_rows, weights=signed, minlength=n).astype(np.int64)
        odd = n_seps % 2 == 1
        labels[odd] += lengths[odd] - 1
        return labels, ends_with_eos & ~odd
    raise ValueError(f"loss mask {loss_mask!r}: expected one of {', '.join(LOSS_MASKS)}")


def collate(sequences: Sequence[Sequence[int]], loss_mask: str = "first_separator", pad_id: int = C.PAD_ID) -> dict[str, torch.Tensor]:
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
        labels[row, :n] = torch.as_tensor(response_labels(seq, loss_mask), dtype=torch.long)
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


def rows_left_over_by_ranks(lengths: np.ndarray, cfg: TrainConfig, world_size: int) -> int:
    """The most rows an epoch leaves out so that every rank takes the same number of batches."""
    if world_size == 1:
        return 0
    left_over = 0
    for epoch in range(cfg.epochs):
        batches = length_grouped_batches(lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_size)
        usable = (len(batches) // world_size) * world_size
        left_over = max(left_over, sum(len(b) for b in batches[usable:]))
    return left_over


def count_total_steps(lengths: np.ndarray, cfg: TrainConfig, world_size: int) -> int:
    """Optimizer steps of the whole run: every epoch, or the --max-steps cap when smaller."""
    num_batches = len(epoch_batches(lengths, cfg, 0, 0, world_size))
    if num_batches == 0:
        raise TrainInputError(f"{len(lengths)} training rows do not fill one batch of {cfg.batch_size} on each of {world_size} process(es)")
    per_epoch = steps_per_epoch(num_batches, cfg.grad_accum)
    return per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)


@dataclass
class TokenRows:
    """The token sequences of one split, flat in memory (int32 values + int64 offsets), and what
    happened to the rows read: cut, dropped, final eos masked (per task)."""

    row_ids: list[str]
    values: np.ndarray
    offsets: np.ndarray
    rows_read: int = 0
    truncated: int = 0  # rows cut to max_length
    dropped_no_labels: int = 0  # rows the loss mask leaves nothing to train on
    eos_masked_by_task: dict[str, tuple[int, int]] = field(default_factory=dict)  # task -> (rows, final eos masked)

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> list[int]:
        return self.values[self.offsets[i] : self.offsets[i + 1]].tolist()


def _row_of(offsets: np.ndarray, flat_index: int) -> int:
    return int(np.searchsorted(offsets, flat_index, side="right") - 1)


def load_token_rows(path: str | Path, split: str, max_length: int, vocab_size: int, loss_mask: str = "first_separator") -> TokenRows:
    """Read one split of a `dataset` artifact and check it; TrainInputError on bad input.

    Checks: artifact name and schema version, required columns, a non-empty split, no row
    without tokens (a credentialed row not tokenized locally), no id outside [0, vocab_size),
    no <image> placeholder 8711 left unexpanded. Rows longer than max_length are cut to it.
    Rows the loss mask leaves nothing to train on are dropped and counted (the recipe bounds
    them with --max-dropped-fraction); if no row is left, that is an error.
    """
    path = Path(path)
    row_ids, tokens, tasks = _read_split(path, split)
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
    label_tokens, eos_masked = label_profile(values, offsets, loss_mask)
    names, task_index = np.unique(np.asarray(tasks, dtype=object).astype(str), return_inverse=True)
    task_rows = np.bincount(task_index, minlength=len(names))
    task_masked = np.bincount(task_index, weights=eos_masked, minlength=len(names)).astype(np.int64)
    eos_by_task = {str(t): (int(r), int(m)) for t, r, m in zip(names, task_rows, task_masked)}
    useful = label_tokens > 0
    if not useful.any():
        raise TrainInputError(
            f"dataset {path}: none of the {len(row_ids)} {split} row(s) has a token to train on under the "
            f"{loss_mask!r} loss mask; there is nothing to train on"
        )
    rows = TokenRows(row_ids, values, offsets, rows_read=len(row_ids), truncated=truncated, eos_masked_by_task=eos_by_task)
    return _keep_rows(rows, useful)


def _keep_rows(rows: TokenRows, keep_mask: np.ndarray) -> TokenRows:
    """`rows` without the rows keep_mask is False for, those counted as dropped."""
    dropped = int((~keep_mask).sum())
    if not dropped:
        return rows
    keep = np.flatnonzero(keep_mask)
    new_lengths = np.diff(rows.offsets)[keep]
    values = np.concatenate([rows.values[rows.offsets[i] : rows.offsets[i + 1]] for i in keep])
    offsets = np.concatenate([[0], np.cumsum(new_lengths)])
    return TokenRows(
        [rows.row_ids[i] for i in keep], values, offsets, rows_read=rows.rows_read, truncated=rows.truncated,
        dropped_no_labels=dropped, eos_masked_by_task=rows.eos_masked_by_task,
    )


def _read_split(path: Path, split: str) -> tuple[list[str], pa.ListArray, list[str]]:
    """Row ids, token lists and tasks of one split of a checked `dataset` artifact."""
    try:
        meta = read_meta(path)
        check_meta(meta, "dataset")
    except ArtifactError as exc:
        raise TrainInputError(f"dataset {path}: {exc}") from exc
    names = pq.read_schema(path).names
    missing = [c for c in ("row_id", "split", "tokens", "task") if c not in names]
    if missing:
        raise TrainInputError(f"dataset {path} lacks column(s) {', '.join(missing)}")
    try:
        table = read_artifact(path, "dataset", columns=["row_id", "split", "tokens", "task"])  # content verified
    except ArtifactError as exc:
        raise TrainInputError(f"dataset {path}: {exc}") from exc
    splits = sorted(set(table.column("split").to_pylist()))
    table = table.filter(pc.equal(table.column("split"), split))
    if table.num_rows == 0:
        raise TrainInputError(f"dataset {path}: split {split!r} has no rows (splits present: {splits or 'none'})")
    tokens = table.column("tokens").combine_chunks()
    if isinstance(tokens, pa.ChunkedArray):  # pyarrow < 15 keeps a ChunkedArray
        tokens = pa.concat_arrays(tokens.chunks)
    tasks = ["" if t is None else str(t) for t in table.column("task").to_pylist()]
    return [str(r) for r in table.column("row_id").to_pylist()], tokens, tasks


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


# ----------------------------------------------------------------------------------------------
# Guards on what the loss mask does to the rows
# ----------------------------------------------------------------------------------------------


def eos_masked_from_separator_stats(path: str | Path, loss_mask: str, expected_rows: int) -> dict[str, tuple[int, int]]:
    """task -> (rows, rows whose final eos `loss_mask` masks), from assembly's separator_stats
    artifact of the training split; refused when it does not count the dataset's rows."""
    path = Path(path)
    column = f"eos_masked_{loss_mask}"
    try:
        meta = read_meta(path)
        check_meta(meta, "separator_stats")
    except ArtifactError as exc:
        raise TrainInputError(f"separator stats {path}: {exc}") from exc
    try:
        table = read_artifact(path, "separator_stats", columns=["task", "rows", column]).to_pylist()  # content verified
    except ArtifactError as exc:
        raise TrainInputError(f"separator stats {path}: {exc}") from exc
    by_task: dict[str, list[int]] = {}
    for row in table:
        counts = by_task.setdefault("" if row["task"] is None else str(row["task"]), [0, 0])
        counts[0] += int(row["rows"])
        counts[1] += int(row[column])
    total = sum(rows for rows, _ in by_task.values())
    if total != expected_rows:
        raise TrainInputError(
            f"separator stats {path} count {total} rows but the dataset's training split has {expected_rows}; "
            "they come from different assembly runs"
        )
    return {task: (rows, masked) for task, (rows, masked) in sorted(by_task.items())}


def check_eos_masked(eos_by_task: dict[str, tuple[int, int]], loss_mask: str, max_fraction: float, source: str) -> None:
    """Refuse a loss mask that masks the final eos of more than max_fraction of some task's rows
    (a model that never learns to stop), naming those tasks."""
    over = [
        f"{task or '(no task)'}: {masked} of {rows} ({masked / rows:.1%})"
        for task, (rows, masked) in eos_by_task.items() if rows and masked / rows > max_fraction
    ]
    if over:
        raise TrainInputError(
            f"loss mask {loss_mask!r} would mask the final eos of more than {max_fraction:.1%} (--max-masked-fraction) of "
            f"the rows of {len(over)} task(s) ({source}): {'; '.join(over)}; choose the other --loss-mask or check the separators"
        )


def check_dropped(rows: TokenRows, dropped_for_ranks: int, max_fraction: float, path: str | Path, split: str) -> None:
    """Refuse when the rows dropped for any reason exceed max_fraction of the rows read."""
    dropped = rows.dropped_no_labels + dropped_for_ranks
    if rows.rows_read and dropped / rows.rows_read > max_fraction:
        raise TrainInputError(
            f"dataset {path}: {dropped} of {rows.rows_read} {split} rows would not be trained "
            f"({rows.dropped_no_labels} with nothing to train on under the loss mask, {dropped_for_ranks} per epoch left "
            f"over when the batches are shared between ranks), more than {max_fraction:.1%} (--max-dropped-fraction)"
        )
