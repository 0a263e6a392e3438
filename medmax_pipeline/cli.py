"""The `medmax` command: one subcommand per stage.

Each stage module defines `add_arguments(parser)` and `run(args) -> int`; this file only maps
subcommand names to modules, imported when used so that one stage's heavy imports (torch,
transformers) do not slow down the others.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from medmax_pipeline import __version__

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("medmax_pipeline.demo", "generate the embedded demo (checkpoint, base model, rows, images, eval set)"),
    "convert-checkpoint": ("medmax_pipeline.stages.convert_checkpoint", "original Chameleon checkpoint (consolidated.pth) -> HF folder, checked"),
    "collect": ("medmax_pipeline.stages.collect", "stage 1: resolve dataset rows to image paths inside the configured roots"),
    "tokenize": ("medmax_pipeline.stages.tokenize_images", "stage 2: VQGAN-tokenize one shard of images"),
    "gather-tokens": ("medmax_pipeline.stages.tokenize_images", "stage 2: merge tokenized shards into one artifact"),
    "map-vocab": ("medmax_pipeline.stages.vocab", "stage 3: map VQGAN codes to vocabulary image blocks"),
    "assemble": ("medmax_pipeline.stages.assemble", "stage 4: credential-aware dataset assembly"),
    "train": ("medmax_pipeline.stages.train", "stage 5: LoRA training"),
    "train-node": ("medmax_pipeline.stages.train.multinode", "stage 5: one node's torchrun of a multi-node training job (run by srun)"),
    "export": ("medmax_pipeline.stages.export", "trained adapter merged into the base: original-format checkpoint + HF folder"),
    "generate": ("medmax_pipeline.stages.evaluate.generate", "stage 6: generate predictions on the evaluation set"),
    "clip-scores": ("medmax_pipeline.stages.evaluate.clip_scores", "stage 6: decode generated images and compute CLIP similarities, once per model"),
    "judge": ("medmax_pipeline.stages.evaluate.judge_replies", "stage 6: LLM judge replies (open VQA, visual chat, mm_out text), once per model"),
    "score": ("medmax_pipeline.stages.evaluate.score", "stage 6: score predictions with a named rule set"),
    "report": ("medmax_pipeline.stages.evaluate.report", "stage 6: figures and tables for the Snakemake report"),
    "inspect": ("medmax_pipeline.core.inspection", "print an artifact's metadata and walk its lineage"),
    "validate-config": ("medmax_pipeline.core.config", "validate a config file against the schema"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medmax", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"medmax-pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    if not argv or argv[0] not in SUBCOMMANDS:
        top.parse_args(argv)  # prints usage or version and exits
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"medmax {name}", description=SUBCOMMANDS[name][1])
    # A module serving several subcommands names its functions after them: add_<name>_arguments / run_<name>.
    suffix = name.replace("-", "_")
    add_arguments = getattr(module, f"add_{suffix}_arguments", None) or module.add_arguments
    run = getattr(module, f"run_{suffix}", None) or module.run
    add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        return int(run(args) or 0)
    except Exception as exc:
        # An ordinary error (bad input, a file problem, or an error class the package defines on
        # purpose) is one `error:` line; anything else (TypeError, KeyError, ...) is a bug and keeps
        # its traceback, as does any error under MEDMAX_TRACEBACK=1 (debugging the pipeline itself).
        ordinary = isinstance(exc, (ValueError, OSError)) or type(exc).__module__.startswith("medmax_pipeline.")
        if not ordinary or os.environ.get("MEDMAX_TRACEBACK") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
