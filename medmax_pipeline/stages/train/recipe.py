"""The LoRA finetuning recipe, top to bottom: setup -> loop (steps, evaluation, checkpoints) -> save.

Each step: collate -> forward -> token-summed cross entropy / label tokens of the whole optimizer
step on all ranks -> backward -> engine step (clip, AdamW, schedule). The engine (plain torch or
DeepSpeed ZeRO-2, see engines.py) is chosen once in `setup`; nothing below it asks which one runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medmax_pipeline.core.plots import plot_loss
from medmax_pipeline.models import chameleon

from .checkpoints import (
    Progress,
    build_run_config,
    checkpoint_to_resume,
    complete_checkpoints,
    load_checkpoint,
    remove_unfinished_checkpoints,
    save_checkpoint,
    seed_everything,
)
from .config import TrainConfig, TrainInputError
from .data import TokenRows, collate, count_total_steps, epoch_batches, load_token_rows
from .distributed import Dist, training_device
from .engines import Engine, plan_engine
from .loss import label_token_count, token_loss_sum
from .outputs import merge_adapter, save_adapter, write_metrics


@dataclass
class TrainResult:
    output: Path
    completed: bool  # False when stopped early by stop_after_step
    steps: int
    resumed_from_step: int | None
    adapter_dir: Path | None = None
    metrics_path: Path | None = None
    loss_curve_path: Path | None = None
    merged_dir: Path | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None  # the trained PeftModel (main process), for in-process callers and tests


@dataclass
class Run:
    """Everything the loop and the outputs need, built once by `setup`."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    dtype: torch.dtype
    rows: TokenRows
    eval_rows: TokenRows | None
    total_steps: int
    run_config: dict[str, Any]
    checkpoint_root: Path
    engine: Engine
    progress: Progress
    resumed_from_step: int | None


@dataclass(frozen=True)
class StepStats:
    loss: float  # mean next-token loss over the step's label tokens on all ranks
    lr: float  # the rate this step used
    grad_norm: float
    label_tokens: int
    tokens: int
    seconds: float


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) LoRA training; see the package docstring. Bad input -> TrainInputError."""
    run = setup(cfg)
    stopped = train_epochs(run)
    result = TrainResult(
        output=Path(cfg.output), completed=not stopped, steps=run.progress.global_step, resumed_from_step=run.resumed_from_step,
        metrics=run.progress.metrics, model=run.engine.model if run.dist.is_main else None,
    )
    if stopped:
        run.dist.log(f"stopped after step {run.progress.global_step} (stop_after_step)")
        return result
    save_outputs(run, result)
    return result


# ----------------------------------------------------------------------------------------------
# Setup
# ----------------------------------------------------------------------------------------------


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cpu":
        return "bf16"  # allowed (slow, for checking); the recipe's default on CPU is fp32
    return precision


def setup(cfg: TrainConfig) -> Run:
    """Check every input, build the LoRA model on its engine and resume from a checkpoint if one matches."""
    cfg.validate()
    dist = Dist.from_env()
    device = training_device(cfg.device, dist)
    precision = resolve_precision(cfg.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    plan = plan_engine(cfg, dist, device, precision)  # DeepSpeed's process group starts here
    rows, eval_rows = read_rows(cfg, dist)
    total_steps = count_total_steps(rows.lengths, cfg, dist.world_size)
    run_config = build_run_config(cfg, engine=plan.name, precision=precision, world_size=dist.world_size, total_steps=total_steps)
    checkpoint_root = Path(cfg.output) / "checkpoints"
    resume_from = checkpoint_to_resume(checkpoint_root, run_config)

    seed_everything(cfg.seed)
    engine = plan.build(build_lora_model(cfg, dtype, device), cfg, total_steps, device)
    progress, resumed_from_step = Progress(), None
    if resume_from is not None:
        progress = load_checkpoint(resume_from, engine, dist)
        resumed_from_step = progress.global_step
        dist.log(f"resumed from {resume_from} (step {progress.global_step} of {total_steps})")
    if dist.is_main:
        remove_unfinished_checkpoints(checkpoint_root)
    return Run(cfg, dist, device, dtype, rows, eval_rows, total_steps, run_config, checkpoint_root, engine, progress, resumed_from_step)


def read_rows(cfg: TrainConfig, dist: Dist) -> tuple[TokenRows, TokenRows | None]:
    """Train (and validation) rows, checked against the base model's vocabulary before any model is built."""
    try:
        model_config = chameleon.check_base_model_folder(cfg.base_model, cfg.tokenizer)
    except chameleon.ModelLayoutError as exc:
        raise TrainInputError(f"base model: {exc}") from exc
    vocab_size = int(model_config["vocab_size"])
    rows = load_token_rows(cfg.dataset, "train", cfg.max_length, vocab_size)
    eval_rows = load_token_rows(cfg.eval_dataset, "validation", cfg.max_length, vocab_size) if cfg.eval_dataset else None
    dist.log(f"{len(rows)} training rows ({rows.truncated} cut to {cfg.max_length}, {rows.dropped_no_response} without a response dropped)")
    return rows, eval_rows


def build_lora_model(cfg: TrainConfig, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The base model with image logits allowed (MedMax trains image outputs) and LoRA adapters (fp32)."""
    from peft import LoraConfig, get_peft_model

    model = chameleon.load_base_model(cfg.base_model, dtype=dtype, device=device, tokenizer=cfg.tokenizer)
    model.config.use_cache = False
    chameleon.allow_image_logits(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(model, lora)  # adapters in fp32 even on a bf16 base
    except ValueError as exc:
        raise TrainInputError(f"LoRA: {exc}") from exc
    chameleon.check_image_logits(model)
    return model


# ----------------------------------------------------------------------------------------------
# Loop
# ----------------------------------------------------------------------------------------------


def train_epochs(run: Run) -> bool:
    """Train from run.progress to the last step; True when stopped early (stop_after_step)."""
    from tqdm.auto import tqdm

    cfg, progress = run.cfg, run.progress
    run.engine.model.train()
    bar = tqdm(
        total=run.total_steps, initial=progress.global_step, disable=not (cfg.progress and run.dist.is_main), desc="train", unit="step"
    )
    stopped = False
    while not stopped and progress.global_step < run.total_steps and progress.epoch < cfg.epochs:
        batches = epoch_batches(run.rows.lengths, cfg, progress.epoch, run.dist.rank, run.dist.world_size)
        stopped = train_epoch(run, batches, bar)
    bar.close()
    return stopped


def train_epoch(run: Run, batches: list[list[int]], bar: Any) -> bool:
    """Train the rest of one epoch (from progress.position); True when stopped early."""
    cfg, progress = run.cfg, run.progress
    while progress.position < len(batches) and progress.global_step < run.total_steps:
        group = batches[progress.position : progress.position + cfg.grad_accum]
        stats = optimizer_step(run, group)
        progress.position += len(group)
        progress.global_step += 1
        end_of_epoch = progress.position >= len(batches)
        row = metrics_row(stats, progress.global_step, progress.epoch + progress.position / len(batches))
        if run.eval_rows is not None and evaluation_due(progress.global_step, end_of_epoch, run.total_steps, cfg.eval_every):
            row["eval_loss"] = evaluate(run.engine, run.eval_rows, cfg.batch_size, run.dist, run.device)
        progress.metrics.append(row)
        if end_of_epoch:
            progress.epoch, progress.position = progress.epoch + 1, 0
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{stats.lr:.2e}")
        if cfg.save_every and progress.global_step % cfg.save_every == 0 and progress.global_step < run.total_steps:
            checkpoint(run)
        if cfg.stop_after_step is not None and progress.global_step >= cfg.stop_after_step:
            return True
        if end_of_epoch:
            break
    return False


def optimizer_step(run: Run, index_batches: list[list[int]]) -> StepStats:
    """One optimizer step over up to grad_accum micro-batches of row indices."""
    started = time.perf_counter()
    engine, dist, device = run.engine, run.dist, run.device
    micro_batches = [collate([run.rows.sequence(i) for i in rows]) for rows in index_batches]
    # Normalise by the label tokens of the whole optimizer step on all ranks, so every
    # response token weighs the same whatever batch it landed in.
    local_labels = sum(label_token_count(b) for b in micro_batches)
    local_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
    global_labels, global_tokens = dist.all_reduce_sum([float(local_labels), float(local_tokens)], device)
    lr = engine.lr()
    loss_sum = 0.0
    for k, batch in enumerate(micro_batches):
        summed = token_loss_sum(engine.forward(batch), batch["labels"])
        # DDP / ZeRO average gradients over ranks; * world_size undoes that average.
        engine.backward(summed * (dist.world_size / global_labels), last_micro_batch=k == len(micro_batches) - 1)
        loss_sum += float(summed.detach())
    grad_norm = engine.step()
    (loss_total,) = dist.all_reduce_sum([loss_sum], device)
    seconds = time.perf_counter() - started
    return StepStats(loss_total / global_labels, lr, grad_norm, int(global_labels), int(global_tokens), seconds)


def metrics_row(stats: StepStats, step: int, epoch: float) -> dict[str, Any]:
    """One train_metrics row (eval_loss filled in when the step evaluates); the key order is kept in checkpoints."""
    return {
        "step": step, "epoch": epoch, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
        "label_tokens": stats.label_tokens, "tokens": stats.tokens, "eval_loss": None,
        "tokens_per_s": stats.tokens / stats.seconds if stats.seconds > 0 else 0.0,
    }


def evaluation_due(step: int, end_of_epoch: bool, total_steps: int, eval_every: int) -> bool:
    """Every eval_every steps (when set), at each epoch end and after the last step."""
    return bool(eval_every and step % eval_every == 0) or end_of_epoch or step == total_steps


@torch.no_grad()
def evaluate(engine: Engine, rows: TokenRows, batch_size: int, dist: Dist, device: torch.device) -> float:
    """Mean next-token loss over the response tokens of `rows` (all ranks together)."""
    was_training = engine.model.training
    engine.model.eval()
    order = np.argsort(-rows.lengths, kind="stable")
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    loss_sum, count = 0.0, 0
    for batch_rows in batches[dist.rank :: dist.world_size]:
        batch = collate([rows.sequence(i) for i in batch_rows])
        loss_sum += float(token_loss_sum(engine.forward(batch), batch["labels"]))
        count += label_token_count(batch)
    engine.model.train(was_training)
    loss_sum, count = dist.all_reduce_sum([loss_sum, float(count)], device)
    return loss_sum / max(count, 1.0)


def checkpoint(run: Run) -> Path:
    return save_checkpoint(run.checkpoint_root, run.progress, run.run_config, run.engine, run.dist, run.cfg.keep_checkpoints)


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------


def save_outputs(run: Run, result: TrainResult) -> None:
    """The final checkpoint (unless the last step wrote it), then adapter, metrics and loss curve (main rank)."""
    cfg, progress, output = run.cfg, run.progress, Path(run.cfg.output)
    checkpoints = complete_checkpoints(run.checkpoint_root)
    if not checkpoints or checkpoints[-1][0] != progress.global_step:
        checkpoint(run)
    run.engine.copy_master_weights_to_model()
    if run.dist.is_main:
        result.adapter_dir = save_adapter(run.engine.model, output, cfg, run.run_config)
        result.metrics_path = write_metrics(progress.metrics, output / "train_metrics.parquet", cfg, run.run_config)
        result.loss_curve_path = plot_loss(progress.metrics, output / "loss_curve.png")
        if cfg.merge:
            result.merged_dir = merge_adapter(cfg.base_model, result.adapter_dir, output / "merged", dtype=run.dtype, tokenizer=cfg.tokenizer)
        run.dist.log(f"done: {progress.global_step} steps, final loss {progress.metrics[-1]['loss']:.4f}; adapter in {result.adapter_dir}")
    run.dist.barrier()
