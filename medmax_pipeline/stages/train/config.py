"""The training settings: one frozen dataclass, the one source of every setting.

Each field carries a `Setting` (core/settings.py) (help, bounds or choices, its config.yaml key, whether it changes what
the run computes). From it come the command line (`add_arguments`, `config_from_args`), the checks
(`TrainConfig.validate`), the run id's fields (`IDENTITY_FIELDS`) and the workflow rule's options
(`workflow_arguments`); tests/test_train_settings.py checks the config schema against it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.settings import (
    Setting,
    add_setting_arguments,
    first_problem,
    identity_fields,
    setting,
    settings_of,
    values_from_args,
    workflow_arguments_for,
)

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
LOSS_MASKS = ("first_separator", "alternating")  # see data.response_labels
LOSS_NORMALIZATIONS = ("row_mean", "token_mean")  # see loss.py


class TrainInputError(ValueError):
    """Bad input found before training starts: one message saying what and where."""


@dataclass(frozen=True)
class TrainConfig:
    # The field order is the key order of the run config written into checkpoints and the adapter.
    dataset: Path = setting(help="dataset artifact (stage 4); its 'train' rows are used")
    base_model: Path = setting(help="HF ChameleonForConditionalGeneration folder")
    output: Path = setting(help="folder for adapter/, checkpoints/, train_metrics.parquet, loss_curve.png")
    eval_dataset: Path | None = setting(None, help="dataset artifact whose 'validation' rows give an eval loss")
    tokenizer: Path | None = setting(None, help="tokenizer JSON the model's vocabulary_map must agree with (default: BASE/tokenizer.json if present)")
    lora_r: int = setting(16, help="LoRA rank", key="lora_r", identity=True, minimum=1)
    lora_alpha: int = setting(16, help="LoRA alpha (the update is scaled by alpha / r)", key="lora_alpha", identity=True, minimum=1)
    lora_dropout: float = setting(0.05, help="dropout on the LoRA input", key="lora_dropout", identity=True, minimum=0, maximum=1, exclusive_maximum=True)
    target_modules: tuple[str, ...] = setting(DEFAULT_TARGET_MODULES, help="comma-separated module names LoRA adapts", key="target_modules", identity=True)
    lr: float = setting(1e-4, help="peak learning rate (AdamW)", key="learning_rate", identity=True, minimum=0, maximum=1, exclusive_minimum=True)
    weight_decay: float = setting(0.0, help="AdamW weight decay", key="weight_decay", identity=True, minimum=0, maximum=1)
    scheduler: str = setting("cosine", help="learning-rate schedule after the warmup", key="scheduler", identity=True, choices=SCHEDULERS)
    warmup_ratio: float = setting(0.1, help="fraction of the steps spent warming up", key="warmup_ratio", identity=True, minimum=0, maximum=1, exclusive_maximum=True)
    epochs: int = setting(3, help="passes over the training rows", key="epochs", identity=True, minimum=1)
    batch_size: int = setting(1, help="rows per device per micro-batch", key="batch_size", identity=True, minimum=1)
    grad_accum: int = setting(1, help="micro-batches per optimizer step", key="grad_accum", identity=True, minimum=1)
    max_length: int = setting(C.DEFAULT_MAX_LENGTH, help="longest training sequence in tokens", key="max_length", identity=True, minimum=2)
    max_grad_norm: float = setting(1.0, help="gradient clipping norm", key="max_grad_norm", identity=True, minimum=0, exclusive_minimum=True)
    precision: str = setting("auto", help="auto: bf16 on GPU, fp32 on CPU", key="precision", choices=("auto", "fp32", "bf16"))
    save_every: int = setting(1000, help="optimizer steps between checkpoints (0: final only)", key="save_every", minimum=0)
    keep_checkpoints: int = setting(2, help="newest checkpoints kept (0: all)", key="keep_checkpoints", minimum=0)
    eval_every: int = setting(0, help="steps between eval losses (0: each epoch end)", key="eval_every", identity=True, minimum=0)
    seed: int = setting(0, help="seed of the LoRA init, dropout and row order", key="seed", identity=True, minimum=0)
    deepspeed: Path | None = setting(None, help="train on a DeepSpeed engine with this JSON (workflow/deepspeed/zero2.json); NCCL on GPUs, gloo on CPU", key="deepspeed")
    merge: bool = setting(False, help="also save OUTPUT/merged, the base model with the adapter folded in", key="merge")
    max_steps: int | None = setting(None, help="stop after this many optimizer steps (the schedule is fitted to it)", key="max_steps", minimum=1)
    gradient_checkpointing: bool = setting(False, help="recompute activations in the backward pass (less memory, more time)", key="gradient_checkpointing", identity=True)
    group_size: int = setting(64, help="length grouping: rows are sorted by length in windows of batch_size * group_size", key="group_size", identity=True, minimum=1)
    device: str = setting("auto", help="auto, cpu, cuda, cuda:N")
    progress: bool = setting(True, help="a tqdm progress bar (--no-progress: progress lines instead)")
    stop_after_step: int | None = setting(None, help="stop (as if killed) right after this step", hidden=True, minimum=1)
    loss_mask: str = setting("first_separator", help="first_separator: train after the first 8710 (a row without one whole); alternating: mask every user turn", key="loss_mask", identity=True, choices=LOSS_MASKS)
    loss_normalization: str = setting("row_mean", help="row_mean: rows weigh the same; token_mean: label tokens weigh the same", key="loss_normalization", identity=True, choices=LOSS_NORMALIZATIONS)
    separator_stats: Path | None = setting(None, help="assembly's separator_stats artifact of the training split (the final-eos check reads it)")
    max_masked_fraction: float = setting(0.01, help="refuse a loss mask that masks the final eos of more of some task's rows", key="max_masked_fraction", minimum=0, maximum=1)
    max_dropped_fraction: float = setting(0.01, help="refuse when more of the rows read would not be trained", key="max_dropped_fraction", minimum=0, maximum=1)
    log_interval: float = setting(30.0, help="seconds between progress lines in the log when there is no progress bar", key="log_interval", minimum=0)

    def validate(self) -> None:
        if len(self.target_modules) == 0:
            raise TrainInputError("--target-modules is empty")
        problem = first_problem(self)
        if problem:
            raise TrainInputError(problem)


SETTINGS: dict[str, Setting] = settings_of(TrainConfig)
# Fields that change what a run computes; with the inputs' identities and the code's they make the
# run config (and its hash, the run id).
IDENTITY_FIELDS: tuple[str, ...] = identity_fields(TrainConfig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per TrainConfig field, from its Setting: type, default, choices and help."""
    add_setting_arguments(parser, TrainConfig)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**values_from_args(TrainConfig, args))


def workflow_arguments(section: Mapping[str, Any]) -> list[str]:
    """The command-line options for the config.yaml `train:` SECTION (the train rule passes these)."""
    return workflow_arguments_for(TrainConfig, section)
