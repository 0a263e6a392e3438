"""The training objective: next-token cross entropy summed over label tokens, and its denominator."""

from __future__ import annotations

from typing import Mapping

import torch

from medmax_pipeline.core import constants as C


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy summed over label tokens, in fp32 whatever the model dtype."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=C.IGNORE_INDEX, reduction="sum"
    )


def label_token_count(batch: Mapping[str, torch.Tensor]) -> int:
    """How many tokens of a collated batch token_loss_sum sums over."""
    return int((batch["labels"][:, 1:] != C.IGNORE_INDEX).sum())
