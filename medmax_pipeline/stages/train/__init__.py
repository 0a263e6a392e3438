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
import importlib
from typing import Any

from .config import DEFAULT_TARGET_MODULES, TrainConfig, TrainInputError, add_arguments, config_from_args

# The rest imports torch: loaded on first use, so that reading TrainConfig's settings (what the
# workflow does at every planning, also on each cluster node) does not import torch.
_LAZY = {
    "TokenRows": "data", "collate": "data", "label_profile": "data", "length_grouped_batches": "data",
    "load_token_rows": "data", "response_labels": "data", "shard_batches": "data", "steps_per_epoch": "data",
    "free_port": "distributed", "init_deepspeed": "distributed", "resolve_deepspeed_config": "deepspeed_config",
    "label_token_count": "loss", "loss_denominator": "loss", "loss_numerator": "loss", "token_loss_sum": "loss",
    "merge_adapter": "outputs", "TrainResult": "recipe", "train": "recipe",
}

__all__ = sorted(["DEFAULT_TARGET_MODULES", "TrainConfig", "TrainInputError", "add_arguments", "config_from_args", "run", *_LAZY])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def run(args: argparse.Namespace) -> int:
    from .recipe import train

    train(config_from_args(args))
    return 0
