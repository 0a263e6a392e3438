"""Checkpoints, resumption and the RNG: what makes a killed run end where an uninterrupted one ends.

A checkpoint is OUTPUT/checkpoints/step-K, written as .tmp-step-K and renamed when complete:
adapter/ (PEFT), the engine's state (optimizer.pt + scheduler.pt, or DeepSpeed's engine/),
trainer_state.json (step, epoch, data position, metrics so far, run config) and one
rng-rank{R}.pt per rank. A run resumes from the newest complete one, and only if it was written
with the same settings (the run config).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from medmax_pipeline.core.artifacts import read_meta

from .config import TrainConfig, TrainInputError
from .distributed import Dist
from .engines import Engine

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
# TrainConfig fields that change what a run computes; with the inputs' identities they make the
# run config a checkpoint must match to be resumed.
RUN_CONFIG_FIELDS = (
    "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr", "weight_decay", "scheduler", "warmup_ratio",
    "epochs", "batch_size", "grad_accum", "max_length", "max_grad_norm", "seed", "group_size", "eval_every",
    "gradient_checkpointing",
)


@dataclass
class Progress:
    """Where a run stands: the part of trainer_state.json that moves."""

    global_step: int = 0
    epoch: int = 0
    position: int = 0  # batches of the current epoch already trained
    metrics: list[dict[str, Any]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
# Run config: the settings a checkpoint is resumed with
# ----------------------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def base_model_identity(folder: Path) -> dict[str, Any]:
    """Cheap identity for the resume check: config.json's hash and the weight files' sizes."""
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"config": _file_digest(folder / "config.json"), "weights": [[p.name, p.stat().st_size] for p in weights]}


def build_run_config(cfg: TrainConfig, *, engine: str, precision: str, world_size: int, total_steps: int) -> dict[str, Any]:
    """Everything that decides what the run computes, as JSON values (the key order is kept in files)."""
    run_config = {
        "dataset": read_meta(cfg.dataset).fingerprint,
        "eval_dataset": read_meta(cfg.eval_dataset).fingerprint if cfg.eval_dataset else None,
        "base_model": base_model_identity(Path(cfg.base_model)),
        "engine": engine,
        "precision": precision,
        "world_size": world_size,
        "total_steps": total_steps,
        **{k: v for k, v in asdict(cfg).items() if k in RUN_CONFIG_FIELDS},
    }
    return json.loads(json.dumps(run_config, default=str))


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of complete checkpoints, oldest first; temporary folders are not listed."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def checkpoint_to_resume(root: Path, run_config: Mapping[str, Any]) -> Path | None:
    """The newest complete checkpoint, or None; TrainInputError if other settings wrote it."""
    checkpoints = complete_checkpoints(root)
    if not checkpoints:
        return None
    newest = checkpoints[-1][1]
    saved = json.loads((newest / "trainer_state.json").read_text())["run_config"]
    diffs = sorted(k for k in set(saved) | set(run_config) if saved.get(k) != run_config.get(k))
    if diffs:
        raise TrainInputError(
            f"{newest} was written by a run with other settings ({', '.join(diffs)}); "
            f"use another --output or delete {root} to start afresh"
        )
    return newest


def remove_unfinished_checkpoints(root: Path) -> None:
    """Temporary folders left by a run killed while saving (main rank only)."""
    if root.is_dir():
        for stale in root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Save and load
# ----------------------------------------------------------------------------------------------


def save_checkpoint(
    root: Path, progress: Progress, run_config: Mapping[str, Any], engine: Engine, dist: Dist, keep: int
) -> Path:
    """Write step-{global_step} atomically on every rank together; keep the newest `keep` (0: all)."""
    step = progress.global_step
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    engine.save_checkpoint(tmp)
    if dist.is_main:
        engine.model.save_pretrained(str(tmp / "adapter"))
        state = {"global_step": step, "epoch": progress.epoch, "position": progress.position, "metrics": progress.metrics, "run_config": run_config}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
    torch.save(rng_state(), tmp / f"rng-rank{dist.rank}.pt")
    dist.barrier()
    if dist.is_main:
        if final.exists():  # a rerun after the end rewrites the final checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)  # the rename is what makes the checkpoint complete
        if keep:
            for _, old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(folder: Path, engine: Engine, dist: Dist) -> Progress:
    """Restore the engine, this rank's RNG and the run's progress from a complete checkpoint."""
    state = json.loads((folder / "trainer_state.json").read_text())
    engine.load_checkpoint(folder)
    set_rng_state(torch.load(folder / f"rng-rank{dist.rank}.pt", weights_only=False))
    return Progress(state["global_step"], state["epoch"], state["position"], state["metrics"])
