"""The training objective: next-token cross entropy over label tokens, normalised one of two ways.

* `row_mean` (default, MedMax's public behaviour at batch 1): each row's mean token loss, averaged
  over the rows of the optimizer step. At batch 1 without accumulation this is HF's mean
  CrossEntropyLoss of the micro-batch; every row weighs the same whatever its length.
* `token_mean`: the loss summed over every label token of the step, divided by their number;
  every label token weighs the same (long responses weigh more).

Both are exact under gradient accumulation and across ranks: a micro-batch contributes its
`loss_numerator` (a sum over its rows) and the recipe divides by the denominator of the whole
optimizer step on all ranks (`loss_denominator` summed), so the gradient is the one of a single
process holding every row of the step in one batch (tested).
"""

from __future__ import annotations

from typing import Mapping

import torch

from medmax_pipeline.core import constants as C


def row_loss_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: next-token cross entropy summed over its label tokens, in fp32 whatever the model dtype."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    per_token = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=C.IGNORE_INDEX, reduction="none"
    )
    return per_token.view(shift_labels.shape).sum(dim=1)


def row_label_counts(labels: torch.Tensor) -> torch.Tensor:
    """Per row: how many label tokens row_loss_sums sums over."""
    return (labels[:, 1:] != C.IGNORE_INDEX).sum(dim=1)


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy summed over every label token of the batch."""
    return row_loss_sums(logits, labels).sum()


def label_token_count(batch: Mapping[str, torch.Tensor]) -> int:
    """How many tokens of a collated batch token_loss_sum sums over."""
    return int(row_label_counts(batch["labels"]).sum())


def loss_numerator(logits: torch.Tensor, labels: torch.Tensor, normalization: str) -> torch.Tensor:
    """A micro-batch's share of the step loss before the step's denominator: summed token losses
    (token_mean) or the sum of its rows' mean token losses (row_mean)."""
    sums = row_loss_sums(logits, labels)
    if normalization == "token_mean":
        return sums.sum()
    if normalization == "row_mean":
        counts = row_label_counts(labels).to(sums.device)
        return (sums / counts.clamp(min=1)).sum()  # rows without labels were dropped on loading
    raise ValueError(f"loss normalization {normalization!r}: expected row_mean or token_mean")


def loss_denominator(batch: Mapping[str, torch.Tensor], normalization: str) -> int:
    """A micro-batch's share of the step denominator: its label tokens (token_mean) or its rows
    that have a label (row_mean)."""
    counts = row_label_counts(batch["labels"])
    if normalization == "token_mean":
        return int(counts.sum())
    if normalization == "row_mean":
        return int((counts > 0).sum())
    raise ValueError(f"loss normalization {normalization!r}: expected row_mean or token_mean")
