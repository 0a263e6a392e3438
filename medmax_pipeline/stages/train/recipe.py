"""The LoRA finetuning recipe, top to bottom: setup -> loop (steps, evaluation, checkpoints) -> save.

Each step: collate (loss mask) -> forward -> loss numerator / the denominator of the whole
optimizer step on all ranks (loss.py: row_mean or token_mean) -> backward -> engine step (clip,
AdamW, schedule). The engine (plain torch or DeepSpeed ZeRO-2, see engines.py) is chosen once in
`setup`; nothing below it asks which one runs. Progress (core/progress, the line every stage
writes): a tqdm bar on a terminal, else (and with --no-progress, as under Snakemake) one line
every --log-interval seconds in the log.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from medmax_pipeline.core.artifacts import read_meta
from medmax_pipeline.core.plots import plot_loss
from medmax_pipeline.core.progress import Progress as StepProgress  # checkpoints.Progress is the run's state
from medmax_pipeline.models import chameleon

from .checkpoints import (
    Progress,
    build_run_config,
    checkpoint_to_resume,
    complete_checkpoints,
    load_checkpoint,
    prepare_run_folder,
    remove_other_runs,
    run_id,
    save_checkpoint,
    seed_everything,
)
from .config import TrainConfig, TrainInputError
from .data import (
    TokenRows,
    check_dropped,
    check_eos_masked,
    collate,
    count_total_steps,
    eos_masked_from_separator_stats,
    epoch_batches,
    load_token_rows,
    rows_left_over_by_ranks,
)
from .distributed import Dist, training_device
from .engines import Engine, plan_engine
from .loss import loss_denominator, loss_numerator
from .outputs import check_output_folders, merge_adapter, save_adapter, save_adapter_weights, write_metrics


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
    run_id: str
    credential: str  # the dataset's: what the adapter and checkpoints were fitted to
    rows_summary: dict[str, Any]  # what happened to the rows read, for train_metrics' lineage
    checkpoint_root: Path  # OUTPUT/checkpoints/<run id>
    engine: Engine
    progress: Progress
    resumed_from_step: int | None


class TrainingDivergedError(ValueError):
    """Training diverged (a learning rate far too large, ...): the run stops with the step and
    what diverged named; the checkpoints of earlier steps are kept."""


# A loss this many times the run's first loss (at least 1) has exploded: a sane finetuning never
# climbs that far above where it started (~ln(vocabulary) at most, ~11 for Chameleon).
EXPLODING_LOSS_FACTOR = 10.0
# An adapter weight this large has exploded. LoRA starts near 0 (B = 0, A ~ 1/sqrt(width)) and
# AdamW moves a weight by about the learning rate per step, so MedMax's 1e-4 stays far below 1
# (even the schema's largest rate, 1, leaves the tiny test model's weights near 14 after 20 steps).
# It is checked because a loss can stay finite while the weights blow up: at learning rate 1e10
# the logits saturate to a uniform guess (loss ln(vocabulary), gradient 0) after one step.
MAX_ADAPTER_WEIGHT = 1.0e3


def divergence(loss: float, first_loss: float, grad_norm: float, max_weight: float) -> str | None:
    """What says training diverged at a step, or None: a non-finite or exploded loss or gradient
    norm, or trained weights that are non-finite or exploded. `first_loss`: the run's first step's."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if math.isfinite(first_loss) and loss > EXPLODING_LOSS_FACTOR * max(first_loss, 1.0):
        return f"the loss {loss:.6g} exploded (more than {EXPLODING_LOSS_FACTOR:g} x the first step's {first_loss:.6g})"
    if not math.isfinite(grad_norm):
        return f"the loss is {loss:.6g} but the gradient norm is {grad_norm}"
    if not math.isfinite(max_weight) or max_weight > MAX_ADAPTER_WEIGHT:
        return f"the loss is {loss:.6g} but an adapter weight reached {max_weight:.6g} (more than {MAX_ADAPTER_WEIGHT:g})"
    return None


def max_trained_weight(model: torch.nn.Module) -> float:
    """The largest |weight| of the trained (adapter) parameters, in one device sync."""
    peaks = [p.detach().abs().max().float() for p in model.parameters() if p.requires_grad and p.numel()]
    return float(torch.stack(peaks).max()) if peaks else 0.0


@dataclass(frozen=True)
class StepStats:
    loss: float  # the step's loss on all ranks (row_mean or token_mean)
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
    check_output_folders(Path(cfg.output), cfg.merge)  # a folder it may not replace: refused now, not after training
    dist = Dist.from_env()
    device = training_device(cfg.device, dist)
    precision = resolve_precision(cfg.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    plan = plan_engine(cfg, dist, device, precision)  # DeepSpeed's process group starts here
    rows, eval_rows = read_rows(cfg, dist)
    total_steps = count_total_steps(rows.lengths, cfg, dist.world_size)
    rows_summary = check_rows(cfg, rows, eval_rows, dist)
    run_config = build_run_config(cfg, engine=plan.name, precision=precision, world_size=dist.world_size, total_steps=total_steps)
    # Checkpoints are keyed by the run config: other settings never meet this run's checkpoints.
    checkpoint_root = Path(cfg.output) / "checkpoints" / run_id(run_config)
    resume_from = checkpoint_to_resume(checkpoint_root, run_config)
    credential = read_meta(cfg.dataset).credential

    seed_everything(cfg.seed)
    engine = plan.build(build_lora_model(cfg, dtype, device), cfg, total_steps, device)
    progress, resumed_from_step = Progress(), None
    if resume_from is not None:
        progress = load_checkpoint(resume_from, engine, dist)
        resumed_from_step = progress.global_step
        dist.log(f"resumed from {resume_from} (step {progress.global_step} of {total_steps})")
    if dist.is_main:
        prepare_run_folder(checkpoint_root, run_config, credential)
    return Run(
        cfg, dist, device, dtype, rows, eval_rows, total_steps, run_config, checkpoint_root.name, credential, rows_summary,
        checkpoint_root, engine, progress, resumed_from_step,
    )


def read_rows(cfg: TrainConfig, dist: Dist) -> tuple[TokenRows, TokenRows | None]:
    """Train (and validation) rows, checked against the base model's vocabulary before any model is built."""
    try:
        model_config = chameleon.check_base_model_folder(cfg.base_model, cfg.tokenizer)
    except chameleon.ModelLayoutError as exc:
        raise TrainInputError(f"base model: {exc}") from exc
    vocab_size = int(model_config["vocab_size"])
    rows = load_token_rows(cfg.dataset, "train", cfg.max_length, vocab_size, cfg.loss_mask)
    eval_rows = load_token_rows(cfg.eval_dataset, "validation", cfg.max_length, vocab_size, cfg.loss_mask) if cfg.eval_dataset else None
    dist.log(
        f"{len(rows)} of {rows.rows_read} training rows ({rows.truncated} cut to {cfg.max_length}, "
        f"{rows.dropped_no_labels} with nothing to train on under the {cfg.loss_mask!r} loss mask dropped)"
    )
    return rows, eval_rows


def check_rows(cfg: TrainConfig, rows: TokenRows, eval_rows: TokenRows | None, dist: Dist) -> dict[str, Any]:
    """Refuse a loss mask that masks too many final eos, or too many untrained rows; return the
    row counts train_metrics records."""
    if cfg.separator_stats is not None:
        eos_by_task = eos_masked_from_separator_stats(cfg.separator_stats, cfg.loss_mask, rows.rows_read)
        source = f"measured by assembly in {cfg.separator_stats}"
    else:
        eos_by_task, source = rows.eos_masked_by_task, f"measured on the rows of {cfg.dataset}"
    check_eos_masked(eos_by_task, cfg.loss_mask, cfg.max_masked_fraction, source)
    left_over = rows_left_over_by_ranks(rows.lengths, cfg, dist.world_size)
    check_dropped(rows, left_over, cfg.max_dropped_fraction, cfg.dataset, "train")
    summary: dict[str, Any] = {
        "loss_mask": cfg.loss_mask, "train_rows_read": rows.rows_read, "train_rows_trained": len(rows),
        "train_rows_truncated": rows.truncated, "train_rows_dropped_no_labels": rows.dropped_no_labels,
        "train_rows_left_over_by_ranks_per_epoch": left_over,
        "final_eos_masked_by_task": {task: {"rows": n, "masked": m} for task, (n, m) in eos_by_task.items()},
    }
    if eval_rows is not None:
        check_dropped(eval_rows, 0, cfg.max_dropped_fraction, cfg.eval_dataset, "validation")
        summary.update({"eval_rows_read": eval_rows.rows_read, "eval_rows_used": len(eval_rows),
                        "eval_rows_dropped_no_labels": eval_rows.dropped_no_labels})
    return summary


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
    cfg, progress = run.cfg, run.progress
    run.engine.model.train()
    reporter = step_reporter(run.total_steps, progress.global_step, cfg, run.dist)
    stopped = False
    while not stopped and progress.global_step < run.total_steps and progress.epoch < cfg.epochs:
        batches = epoch_batches(run.rows.lengths, cfg, progress.epoch, run.dist.rank, run.dist.world_size)
        stopped = train_epoch(run, batches, reporter)
    reporter.close()
    return stopped


def train_epoch(run: Run, batches: list[list[int]], reporter: StepProgress) -> bool:
    """Train the rest of one epoch (from progress.position); True when stopped early."""
    cfg, progress = run.cfg, run.progress
    while progress.position < len(batches) and progress.global_step < run.total_steps:
        group = batches[progress.position : progress.position + cfg.grad_accum]
        stats = optimizer_step(run, group)
        check_divergence(run, stats, progress.global_step + 1)
        progress.position += len(group)
        progress.global_step += 1
        end_of_epoch = progress.position >= len(batches)
        row = metrics_row(stats, progress.global_step, progress.epoch + progress.position / len(batches))
        if run.eval_rows is not None and evaluation_due(progress.global_step, end_of_epoch, run.total_steps, cfg.eval_every):
            row["eval_loss"] = evaluate(run.engine, run.eval_rows, cfg, run.dist, run.device)
        progress.metrics.append(row)
        if end_of_epoch:
            progress.epoch, progress.position = progress.epoch + 1, 0
        reporter.update(1, stats.tokens, step_details(row["loss"], stats.lr))
        if cfg.save_every and progress.global_step % cfg.save_every == 0 and progress.global_step < run.total_steps:
            checkpoint(run)
        if cfg.stop_after_step is not None and progress.global_step >= cfg.stop_after_step:
            return True
        if end_of_epoch:
            break
    return False


def check_divergence(run: Run, stats: StepStats, step: int) -> None:
    """Stop (every rank: loss and gradient norm are all-reduced, the adapter weights replicated)
    before a diverged step is recorded or checkpointed: a run that trains to weights of 1e10 must
    not end with exit 0 and an adapter."""
    metrics = run.progress.metrics
    problem = divergence(stats.loss, metrics[0]["loss"] if metrics else stats.loss, stats.grad_norm, max_trained_weight(run.engine.model))
    if problem is not None:
        kept = complete_checkpoints(run.checkpoint_root)
        where = f"the checkpoint of step {kept[-1][0]} is kept ({kept[-1][1]})" if kept else "no checkpoint was written"
        raise TrainingDivergedError(
            f"training diverged at step {step} of {run.total_steps}: {problem}, at learning rate {stats.lr:g} "
            f"(--lr {run.cfg.lr:g}); no adapter written, {where}. Lower train.learning_rate"
        )


def step_reporter(total: int, done: int, cfg: TrainConfig, dist: Dist, clock: Callable[[], float] = time.monotonic) -> StepProgress:
    """Training's progress through core/progress (the line every stage writes): optimizer steps and
    tokens/s, with loss and lr as details; tqdm on the main rank's terminal unless --no-progress,
    else a line for the first step, then at most every cfg.log_interval seconds, and for the last."""
    return StepProgress(total, done, interval_s=cfg.log_interval, stream=sys.stderr, clock=clock, label="medmax train",
                        items="steps", unit="tokens", bar=cfg.progress, first_line=True, show=dist.is_main)


def step_details(loss: float, lr: float) -> dict[str, str]:
    """What a step's progress line (or the bar's postfix) shows after the ETA."""
    return {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}


def optimizer_step(run: Run, index_batches: list[list[int]]) -> StepStats:
    """One optimizer step over up to grad_accum micro-batches of row indices."""
    started = time.perf_counter()
    engine, dist, device, cfg = run.engine, run.dist, run.device, run.cfg
    micro_batches = [collate([run.rows.sequence(i) for i in rows], cfg.loss_mask) for rows in index_batches]
    # The denominator is the whole optimizer step's on all ranks (label tokens, or rows), so the
    # gradient is the one of one process holding every row of the step (loss.py).
    local_denominator = sum(loss_denominator(b, cfg.loss_normalization) for b in micro_batches)
    local_labels = sum(loss_denominator(b, "token_mean") for b in micro_batches)
    local_tokens = sum(int(b["attention_mask"].sum()) for b in micro_batches)
    global_denominator, global_labels, global_tokens = dist.all_reduce_sum(
        [float(local_denominator), float(local_labels), float(local_tokens)], device
    )
    lr = engine.lr()
    loss_sum = 0.0
    for k, batch in enumerate(micro_batches):
        numerator = loss_numerator(engine.forward(batch), batch["labels"], cfg.loss_normalization)
        # DDP / ZeRO average gradients over ranks; * world_size undoes that average.
        engine.backward(numerator * (dist.world_size / global_denominator), last_micro_batch=k == len(micro_batches) - 1)
        loss_sum += float(numerator.detach())
    grad_norm = engine.step()
    (loss_total,) = dist.all_reduce_sum([loss_sum], device)
    seconds = time.perf_counter() - started
    return StepStats(loss_total / global_denominator, lr, grad_norm, int(global_labels), int(global_tokens), seconds)


def metrics_row(stats: StepStats, step: int, epoch: float) -> dict[str, Any]:
    """One train_metrics row (eval_loss filled in when the step evaluates); the key order is kept in checkpoints."""
    return {
        "step": step, "epoch": epoch, "loss": stats.loss, "lr": stats.lr, "grad_norm": stats.grad_norm,
        "label_tokens": stats.label_tokens, "tokens": stats.tokens, "eval_loss": None,
    }


def evaluation_due(step: int, end_of_epoch: bool, total_steps: int, eval_every: int) -> bool:
    """Every eval_every steps (when set), at each epoch end and after the last step."""
    return bool(eval_every and step % eval_every == 0) or end_of_epoch or step == total_steps


@torch.no_grad()
def evaluate(engine: Engine, rows: TokenRows, cfg: TrainConfig, dist: Dist, device: torch.device) -> float:
    """The loss over `rows` (all ranks together), normalised as in training."""
    was_training = engine.model.training
    engine.model.eval()
    order = np.argsort(-rows.lengths, kind="stable")
    batches = [order[i : i + cfg.batch_size].tolist() for i in range(0, len(order), cfg.batch_size)]
    loss_sum, count = 0.0, 0
    for batch_rows in batches[dist.rank :: dist.world_size]:
        batch = collate([rows.sequence(i) for i in batch_rows], cfg.loss_mask)
        loss_sum += float(loss_numerator(engine.forward(batch), batch["labels"], cfg.loss_normalization))
        count += loss_denominator(batch, cfg.loss_normalization)
    engine.model.train(was_training)
    loss_sum, count = dist.all_reduce_sum([loss_sum, float(count)], device)
    return loss_sum / max(count, 1.0)


def checkpoint(run: Run) -> Path:
    return save_checkpoint(
        run.checkpoint_root, run.progress, run.run_config, run.engine, run.dist, run.cfg.keep_checkpoints,
        save_adapter_weights, run.credential,
    )


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
        result.adapter_dir = save_adapter(run.engine.model, output, cfg, run.run_config, run.run_id)
        result.metrics_path = write_metrics(progress.metrics, output / "train_metrics.parquet", cfg, run.run_config, run.rows_summary)
        result.loss_curve_path = plot_loss(progress.metrics, output / "loss_curve.png")
        if cfg.merge:
            result.merged_dir = merge_adapter(cfg.base_model, result.adapter_dir, output / "merged", dtype=run.dtype, tokenizer=cfg.tokenizer)
        for removed in remove_other_runs(run.checkpoint_root.parent, run.run_id):
            run.dist.log(f"removed {removed}: checkpoints of a run with other settings")
        run.dist.log(f"done: {progress.global_step} steps, final loss {progress.metrics[-1]['loss']:.4f}; adapter in {result.adapter_dir}")
    run.dist.barrier()
