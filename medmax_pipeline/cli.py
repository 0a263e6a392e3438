"""The `medmax` command: one subcommand per stage.

Each stage module defines `add_arguments(parser)` and `run(args) -> int`; this file only maps
subcommand names to modules, imported when used so that one stage's heavy imports (torch,
transformers) do not slow down the others.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
from typing import Sequence

from medmax_pipeline import __version__
from medmax_pipeline.core import termination
from medmax_pipeline.core.output_lock import run_holding_output_locks

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
    "validate-config": ("medmax_pipeline.core.config", "validate a config (with --configfile files merged over it, as the workflow merges them)"),
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
    # SIGTERM (SLURM's time limit, scancel) and SIGINT become termination.Terminated, so that every
    # cleanup of the stage runs on the way out; the handlers are restored when main returns (main
    # also runs inside other programs, tests).
    previous = {signum: signal.getsignal(signum) for signum in termination.HANDLED_SIGNALS}
    termination.install()
    try:
        termination.sweep_stale_scratch()  # /dev/shm folders of runs that were SIGKILLed
        return _run_subcommand(argv[0], argv[1:])
    except termination.Terminated as exc:
        return termination.report(exc)
    except BaseException:
        # Stopped while something else failed (a worker killed by the same signal, a broken pool):
        # the signal is the reason.
        signum = termination.received()
        if signum is None:
            raise
        return termination.report(termination.Terminated(signum))
    finally:
        if threading.current_thread() is threading.main_thread():
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def _run_subcommand(name: str, rest: list[str]) -> int:
    module = importlib.import_module(SUBCOMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"medmax {name}", description=SUBCOMMANDS[name][1])
    # A module serving several subcommands names its functions after them: add_<name>_arguments / run_<name>.
    suffix = name.replace("-", "_")
    add_arguments = getattr(module, f"add_{suffix}_arguments", None) or module.add_arguments
    run = getattr(module, f"run_{suffix}", None) or module.run
    add_arguments(parser)
    args = parser.parse_args(rest)
    try:
        code = int(run_holding_output_locks(name, run, args) or 0)  # one writer per output: core/output_lock
    except Exception as exc:
        # An ordinary error (bad input, a file problem, or an error class the package defines on
        # purpose) is one `error:` line; anything else (TypeError, KeyError, ...) is a bug and keeps
        # its traceback, as does any error under MEDMAX_TRACEBACK=1 (debugging the pipeline itself).
        if termination.received() is not None:
            raise  # the error came from stopping: main reports the signal
        ordinary = isinstance(exc, (ValueError, OSError)) or type(exc).__module__.startswith("medmax_pipeline.")
        if not ordinary or os.environ.get("MEDMAX_TRACEBACK") == "1":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    signum = termination.received()
    if signum is not None:
        # A stage that turned the consequence of the signal into its own error line and exit code
        # was still stopped by it: the exit code says so (Snakemake retries on any non-zero code).
        raise termination.Terminated(signum)
    return code

if __name__ == "__main__":
    raise SystemExit(main())
