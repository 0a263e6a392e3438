"""Stage 5: LoRA finetuning of an HF Chameleon / Anole model on the assembled `dataset` artifact.

The recipe is MedMax's (MEDMAX-FACTS.md, "Training"): LoRA r=16, alpha=16, dropout 0.05 on
q/k/v/o/gate/up/down projections, AdamW lr 1e-4, cosine schedule with 10 % warmup, 3 epochs,
batch 1 per device, max length 2048, bf16 on GPU with DeepSpeed ZeRO-2 across GPUs, pad id 1.
Where the public code was wrong we do what it meant, and say so:

* Loss mask (`--loss-mask`, data.response_labels): `first_separator` (default, MedMax's public
  rule: everything up to and including the first separator 8710 is masked, everything after it
  trained; a row without 8710 is trained whole) or `alternating` (8710 ends every turn and turns
  alternate user, assistant, ...: every user turn is masked, every response with the 8710 that
  closes it and the final eos trained; the public rule trains later user turns of multi-turn
  rows). The row conventions are inferred, so training measures them instead of trusting them:
  it reads assembly's separator_stats artifact (`--separator-stats`; without it the same counts
  are taken on the rows read) and refuses a mask that would mask the final eos of more than
  `--max-masked-fraction` of some task's rows, naming the tasks. Rows left with nothing to train
  on, and rows an epoch leaves out so that ranks take equal steps, are refused past
  `--max-dropped-fraction` and counted in train_metrics' lineage (params.rows).
* Loss normalisation (`--loss-normalization`, loss.py): `row_mean` (default: each row's mean token
  loss averaged over the rows of the optimizer step; at batch 1 HF's mean cross entropy per
  micro-batch, as MedMax trained) or `token_mean` (every label token of the step weighs the
  same). Both are exact under gradient accumulation and across ranks.
* Image outputs: HF's Chameleon head masks image-token logits in every forward pass, so image
  labels would give an infinite loss; chameleon.allow_image_logits lifts that, and
  check_image_logits verifies it before any step.
* The data loader loops over the whole file for every epoch, in a seeded order.

The training loop is written out (no HF Trainer) as a recipe in the style of torchtune
(recipe.py): setup -> loop -> evaluate -> checkpoint -> save, each step collate -> forward ->
loss numerator / the step's denominator on all ranks -> backward -> clip -> AdamW step ->
scheduler step, checkpoints at step boundaries. Progress: tqdm on a terminal; with no terminal or
`--no-progress` (Snakemake) a line (step, loss, lr, tokens/s, ETA) every `--log-interval` seconds.

Launch: `medmax train ...` runs one process (CPU, or one GPU) with plain torch. With
`--deepspeed workflow/deepspeed/zero2.json` the same loop runs on a DeepSpeed ZeRO-2 engine ("auto"
values in the JSON are filled from the command line), in one process or under
`torchrun --nproc-per-node N -m medmax_pipeline train ...` over N ranks: NCCL on GPUs, gloo on CPU.
The CPU path is what the demo and the tests take, so the engine, its checkpoints and resumption
run everywhere; on CPU it gives the same numbers as the plain loop (tested to ~1e-8).

Resumption (checkpoints.py): checkpoints go to OUTPUT/checkpoints/<run id>/step-K, the run id
being a hash of every setting that decides what the run computes (inputs' identities and the
training code's hash included). A run with changed settings starts its own checkpoints; a
restarted run with the same settings resumes from its newest complete checkpoint and ends exactly
where an uninterrupted run ends (bitwise on CPU; GPU kernels are not bitwise deterministic). A
completed run removes the run folders of other settings this pipeline wrote (nothing else).
Resuming unpickles no code: RNG states are safetensors + JSON, the adapter safetensors, the plain
engine's optimizer/scheduler are loaded with weights_only=True, and DeepSpeed's own pickles
(engine/*_model_states.pt, engine/*_optim_states.pt) are loaded by DeepSpeed under a forced
weights_only=True with only its plain data classes allowed. A checkpoint whose record file
(medmax_provenance.json: run id, size and hash of every file) does not match is refused.

Modules: config (TrainConfig, TrainInputError), data (rows, loss mask, collation, batching),
loss, distributed (ranks, DeepSpeed's process group), engines (plain torch and DeepSpeed
behind one interface), deepspeed_config (the DeepSpeed JSON), checkpoints (save and resume,
RNG, run config), outputs (adapter, train_metrics, merged model), recipe (`train`), and here
the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medmax_pipeline.core.artifacts import ArtifactError

from .config import DEFAULT_TARGET_MODULES, LOSS_MASKS, LOSS_NORMALIZATIONS, SCHEDULERS, TrainConfig, TrainInputError
from .data import TokenRows, collate, label_profile, length_grouped_batches, load_token_rows, response_labels, shard_batches, steps_per_epoch
from .distributed import free_port, init_deepspeed
from .deepspeed_config import resolve_deepspeed_config
from .loss import label_token_count, loss_denominator, loss_numerator, token_loss_sum
from .outputs import merge_adapter
from .recipe import TrainResult, train

__all__ = [
    "DEFAULT_TARGET_MODULES", "TokenRows", "TrainConfig", "TrainInputError", "TrainResult", "add_arguments", "collate",
    "config_from_args", "free_port", "init_deepspeed", "label_profile", "label_token_count", "length_grouped_batches", "load_token_rows",
    "loss_denominator", "loss_numerator",
    "merge_adapter", "resolve_deepspeed_config", "response_labels", "run", "shard_batches", "steps_per_epoch",
    "token_loss_sum", "train",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig(dataset=Path(), base_model=Path(), output=Path())
    parser.add_argument("--dataset", type=Path, required=True, help="dataset artifact (stage 4); its 'train' rows are used")
    parser.add_argument("--base-model", type=Path, required=True, help="HF ChameleonForConditionalGeneration folder")
    parser.add_argument("--output", type=Path, required=True, help="folder for adapter/, checkpoints/, train_metrics.parquet, loss_curve.png")
    parser.add_argument("--eval-dataset", type=Path, help="dataset artifact whose 'validation' rows give an eval loss")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer JSON the model's vocabulary_map must agree with (default: BASE/tokenizer.json if present)")
    parser.add_argument("--lora-r", type=int, default=d.lora_r)
    parser.add_argument("--lora-alpha", type=int, default=d.lora_alpha)
    parser.add_argument("--lora-dropout", type=float, default=d.lora_dropout)
    parser.add_argument("--target-modules", default=",".join(d.target_modules), help="comma-separated module names")
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--scheduler", choices=SCHEDULERS, default=d.scheduler)
    parser.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per device per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum)
    parser.add_argument("--max-length", type=int, default=d.max_length)
    parser.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=d.precision, help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--save-every", type=int, default=d.save_every, help="optimizer steps between checkpoints (0: final only)")
    parser.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="newest checkpoints kept (0: all)")
    parser.add_argument("--eval-every", type=int, default=d.eval_every, help="steps between eval losses (0: each epoch end)")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--deepspeed", type=Path, help="train on a DeepSpeed engine with this JSON (workflow/deepspeed/zero2.json); NCCL on GPUs, gloo on CPU")
    parser.add_argument("--merge", action="store_true", help="also save OUTPUT/merged, the base model with the adapter folded in")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (the schedule is fitted to it)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--group-size", type=int, default=d.group_size, help=argparse.SUPPRESS)
    parser.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--separator-stats", type=Path, help="assembly's separator_stats artifact of the training split (the final-eos check reads it)")
    parser.add_argument("--loss-mask", choices=LOSS_MASKS, default=d.loss_mask, help="first_separator: train after the first 8710 (a row without one whole); alternating: mask every user turn")
    parser.add_argument("--loss-normalization", choices=LOSS_NORMALIZATIONS, default=d.loss_normalization, help="row_mean: rows weigh the same; token_mean: label tokens weigh the same")
    parser.add_argument("--max-masked-fraction", type=float, default=d.max_masked_fraction, help="refuse a loss mask that masks the final eos of more of some task's rows")
    parser.add_argument("--max-dropped-fraction", type=float, default=d.max_dropped_fraction, help="refuse when more of the rows read would not be trained")
    parser.add_argument("--log-interval", type=float, default=d.log_interval, help="seconds between progress lines in the log when there is no progress bar")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar: progress lines instead")
    parser.add_argument("--stop-after-step", type=int, help=argparse.SUPPRESS)  # simulates preemption in tests


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        dataset=args.dataset, base_model=args.base_model, output=args.output, eval_dataset=args.eval_dataset,
        tokenizer=args.tokenizer, lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()), lr=args.lr,
        weight_decay=args.weight_decay, scheduler=args.scheduler, warmup_ratio=args.warmup_ratio, epochs=args.epochs,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_length=args.max_length,
        max_grad_norm=args.max_grad_norm, precision=args.precision, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, eval_every=args.eval_every, seed=args.seed, deepspeed=args.deepspeed,
        merge=args.merge, max_steps=args.max_steps, gradient_checkpointing=args.gradient_checkpointing,
        group_size=args.group_size, device=args.device, progress=not args.no_progress, stop_after_step=args.stop_after_step,
        loss_mask=args.loss_mask, loss_normalization=args.loss_normalization, separator_stats=args.separator_stats,
        max_masked_fraction=args.max_masked_fraction, max_dropped_fraction=args.max_dropped_fraction, log_interval=args.log_interval,
    )


def run(args: argparse.Namespace) -> int:
    from medmax_pipeline.models.chameleon import ImageLogitsMaskedError, ModelLayoutError

    try:
        train(config_from_args(args))
    except (TrainInputError, ModelLayoutError, ArtifactError, ImageLogitsMaskedError) as exc:
        print(f"medmax train: error: {exc}", file=sys.stderr)
        return 2
    return 0
