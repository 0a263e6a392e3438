"""How many prompt/response separators (8710) the assembled rows hold, and whether each row's final
eos would be trained under each loss-mask policy. Training reads the artifact (separator_stats)
to refuse a policy that would mask the final eos of too many rows (a model that never learns to
stop). The policies, on a row's ids (labels = ids with the masked positions set to -100):

  first_separator  MedMax's public recipe: everything up to and including the first 8710 is
                   masked, everything after it trained; a row without 8710 is trained whole.
  alternating      the train stage's response_labels: user turns are masked up to and including
                   the 8710 that closes them, responses trained, the separator after a response
                   belongs to the response (trained) and opens the next (masked) user turn.

Under first_separator a row ending with eos never has it masked (the eos comes after the first
8710, or the row is trained whole), so its column is 0 unless the policy changes: it is counted
anyway, so that training reads both policies the same way. Under alternating the eos is masked
when the row holds an even number of 8710 (0 included). Rows that do not end with eos (cut by
truncation) have no final eos to mask: they are counted in no_final_eos.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pyarrow as pa

from medmax_pipeline.core import constants as C

POLICIES = ("first_separator", "alternating")

SEPARATOR_STATS_KEYS = ("split", "task", "source", "credential")
SEPARATOR_STATS_COUNTS = (
    "rows", "sep_0", "sep_1", "sep_2_plus", "eos_masked_first_separator", "eos_masked_alternating", "no_final_eos",
)
SEPARATOR_STATS_SCHEMA = pa.schema([(k, pa.string()) for k in SEPARATOR_STATS_KEYS] + [(c, pa.int64()) for c in SEPARATOR_STATS_COUNTS])


def masked_positions(ids: Sequence[int], policy: str) -> list[bool]:
    """Per position of one row: is its label masked (-100) under `policy`? The reference, one
    token at a time; separator_profile is its vectorised form."""
    if policy == "first_separator":
        ids = list(ids)
        if C.SEPARATOR_ID not in ids:
            return [False] * len(ids)
        first = ids.index(C.SEPARATOR_ID)
        return [i <= first for i in range(len(ids))]
    if policy == "alternating":
        masked, in_response = [], False
        for token in ids:
            masked.append(not in_response)
            if token == C.SEPARATOR_ID:
                in_response = not in_response  # the separator belongs to the turn it closes
        return masked
    raise ValueError(f"loss-mask policy {policy!r}: expected one of {', '.join(POLICIES)}")


def final_eos_masked(ids: Sequence[int], policy: str) -> bool | None:
    """Whether the row's final eos is masked under `policy`; None when the row does not end with eos."""
    if len(ids) == 0 or ids[-1] != C.EOS_ID:
        return None
    return masked_positions(ids, policy)[-1]


def separator_profile(values: np.ndarray, offsets: np.ndarray) -> dict[str, np.ndarray]:
    """For each list of flat `values` / `offsets`: its number of 8710 (n_separators), whether it
    ends with eos, and whether that eos is masked under each policy (False when there is none)."""
    values = np.asarray(values)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    separators = np.flatnonzero(values == C.SEPARATOR_ID)
    sep_rows = np.searchsorted(offsets, separators, side="right") - 1
    n_separators = np.bincount(sep_rows, minlength=n)
    last = values[np.maximum(offsets[1:] - 1, 0)] if len(values) else np.zeros(n, values.dtype)
    ends_with_eos = (lengths > 0) & (last == C.EOS_ID)
    first_sep = np.full(n, np.iinfo(np.int64).max)
    np.minimum.at(first_sep, sep_rows, separators - offsets[:-1][sep_rows])
    last_position = lengths - 1
    return {
        "n_separators": n_separators,
        "ends_with_eos": ends_with_eos,
        # Masked up to and including the first separator: the eos only if it were at or before it.
        "eos_masked_first_separator": ends_with_eos & (n_separators > 0) & (first_sep >= last_position),
        # The eos is not a separator, so all n_separators come before it: masked when even.
        "eos_masked_alternating": ends_with_eos & (n_separators % 2 == 0),
    }


class SeparatorStats:
    """separator_profile counts per (split, task, source, credential)."""

    def __init__(self, split: str) -> None:
        self.split = split
        self.counts: dict[tuple[Any, ...], np.ndarray] = {}

    def add(self, dataset: pa.RecordBatch) -> None:
        if dataset.num_rows == 0:
            return
        tokens = dataset.column("tokens")
        offsets = tokens.offsets.to_numpy().astype(np.int64)
        values = tokens.values.to_numpy(zero_copy_only=False)
        profile = separator_profile(values[offsets[0] : offsets[-1]], offsets - offsets[0])
        n_sep = profile["n_separators"]
        per_row = np.stack(
            [
                np.ones_like(n_sep), n_sep == 0, n_sep == 1, n_sep >= 2,
                profile["eos_masked_first_separator"], profile["eos_masked_alternating"], ~profile["ends_with_eos"],
            ],
            axis=1,
        ).astype(np.int64)
        groups: dict[tuple[Any, ...], list[int]] = {}
        keys = zip(*(dataset.column(k).to_pylist() for k in ("task", "source", "credential")))
        for i, key in enumerate(keys):
            groups.setdefault(key, []).append(i)
        for key, rows in groups.items():
            total = per_row[rows].sum(axis=0)
            if key in self.counts:
                self.counts[key] += total
            else:
                self.counts[key] = total

    def table(self) -> pa.Table:
        rows = []
        for key in sorted(self.counts, key=lambda k: tuple("" if v is None else str(v) for v in k)):
            rows.append({"split": self.split, **dict(zip(("task", "source", "credential"), key)),
                         **dict(zip(SEPARATOR_STATS_COUNTS, self.counts[key].tolist()))})
        return pa.Table.from_pylist(rows, schema=SEPARATOR_STATS_SCHEMA)
