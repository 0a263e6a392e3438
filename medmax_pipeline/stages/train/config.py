"""The training settings (one frozen dataclass, checked before anything runs) and the input error."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medmax_pipeline.core import constants as C

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
LOSS_MASKS = ("first_separator", "alternating")  # see data.response_labels
LOSS_NORMALIZATIONS = ("row_mean", "token_mean")  # see loss.py


class TrainInputError(ValueError):
    """Bad input found before training starts: one message saying what and where."""


@dataclass(frozen=True)
class TrainConfig:
    # The field order is the key order of the run config written into checkpoints and the adapter.
    dataset: Path
    base_model: Path
    output: Path
    eval_dataset: Path | None = None
    tokenizer: Path | None = None  # tokenizer JSON to compare the model's vocabulary_map with
    lora_r: int = 16
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    lr: float = 1e-4
    weight_decay: float = 0.0
    scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    epochs: int = 3
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int = C.DEFAULT_MAX_LENGTH
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    save_every: int = 1000  # optimizer steps between checkpoints; 0: only the final one
    keep_checkpoints: int = 2  # newest complete checkpoints kept; 0: keep all
    eval_every: int = 0  # optimizer steps between evaluations; 0: at the end of each epoch only
    seed: int = 0
    deepspeed: Path | None = None
    merge: bool = False
    max_steps: int | None = None  # caps the optimizer steps; the schedule is fitted to the cap
    gradient_checkpointing: bool = False
    group_size: int = 64  # length grouping: rows are sorted by length in windows of batch_size * group_size
    device: str = "auto"
    progress: bool = True
    stop_after_step: int | None = None  # test hook: stop (as if killed) right after this step
    loss_mask: str = "first_separator"  # MedMax's public rule; "alternating" masks every user turn
    loss_normalization: str = "row_mean"  # each row's mean token loss averaged over rows (HF's mean CE at batch 1)
    separator_stats: Path | None = None  # assembly's separator_stats artifact of the training split
    max_masked_fraction: float = 0.01  # most rows of a task whose final eos the loss mask may mask
    max_dropped_fraction: float = 0.01  # most rows read that may go untrained (nothing to train on, rank balance)
    log_interval: float = 30.0  # seconds between progress lines when there is no progress bar

    def validate(self) -> None:
        checks = [
            (self.lora_r > 0, f"--lora-r must be positive, got {self.lora_r}"),
            (self.lora_alpha > 0, f"--lora-alpha must be positive, got {self.lora_alpha}"),
            (0 <= self.lora_dropout < 1, f"--lora-dropout must be in [0, 1), got {self.lora_dropout}"),
            (len(self.target_modules) > 0, "--target-modules is empty"),
            (self.lr > 0, f"--lr must be positive, got {self.lr}"),
            (self.scheduler in SCHEDULERS, f"--scheduler must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"),
            (0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.epochs > 0, f"--epochs must be positive, got {self.epochs}"),
            (self.batch_size > 0, f"--batch-size must be positive, got {self.batch_size}"),
            (self.grad_accum > 0, f"--grad-accum must be positive, got {self.grad_accum}"),
            (self.max_length >= 2, f"--max-length must be at least 2, got {self.max_length}"),
            (self.precision in ("auto", "fp32", "bf16"), f"--precision must be auto, fp32 or bf16, got {self.precision!r}"),
            (self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every}"),
            (self.keep_checkpoints >= 0, f"--keep-checkpoints must be >= 0, got {self.keep_checkpoints}"),
            (self.eval_every >= 0, f"--eval-every must be >= 0, got {self.eval_every}"),
            (self.max_steps is None or self.max_steps > 0, f"--max-steps must be positive, got {self.max_steps}"),
            (self.group_size > 0, f"--group-size must be positive, got {self.group_size}"),
            (self.loss_mask in LOSS_MASKS, f"--loss-mask must be one of {', '.join(LOSS_MASKS)}, got {self.loss_mask!r}"),
            (self.loss_normalization in LOSS_NORMALIZATIONS,
             f"--loss-normalization must be one of {', '.join(LOSS_NORMALIZATIONS)}, got {self.loss_normalization!r}"),
            (0 <= self.max_masked_fraction <= 1, f"--max-masked-fraction must be in [0, 1], got {self.max_masked_fraction}"),
            (0 <= self.max_dropped_fraction <= 1, f"--max-dropped-fraction must be in [0, 1], got {self.max_dropped_fraction}"),
            (self.log_interval >= 0, f"--log-interval must be >= 0, got {self.log_interval}"),
        ]
        for ok, message in checks:
            if not ok:
                raise TrainInputError(message)
