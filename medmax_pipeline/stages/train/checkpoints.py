"""Checkpoints, resumption and the RNG: what makes a killed run end where an uninterrupted one ends.

Layout: OUTPUT/checkpoints/<run id>/step-K, where <run id> is a hash of the run config (every
setting that decides what the run computes, the inputs' identities and the training code's
hash). A run with changed settings therefore starts its own checkpoints next to the old ones
and never meets them; a killed run with the same settings finds its own and resumes. When a run
completes, the checkpoint folders of other settings that this pipeline wrote (recognised by
their record file) are removed; nothing else under checkpoints/ is touched.

A checkpoint is written as .tmp-step-K and renamed when complete. It holds adapter/ (PEFT:
safetensors + json), the engine's state (optimizer.pt + scheduler.pt of the plain engine, or
DeepSpeed's engine/ folder), trainer_state.json (step, epoch, data position, metrics so far, run
config), one rng-rank{R}.safetensors per rank (torch generator states as tensors, Python's and
NumPy's as JSON in its metadata), and medmax_provenance.json, the record: run id, step, and the
size and hash of every other file. The run folder has a record too (kind train_checkpoints).

Resuming never unpickles arbitrary code. A checkpoint is used only if its record names this run
and every file matches its size and hash and no other file is there; otherwise the run stops
with an error naming the folder. Files this pipeline writes are safetensors or JSON, except the
plain engine's optimizer.pt / scheduler.pt, which hold only tensors and numbers and are loaded
with torch.load(weights_only=True). DeepSpeed's own files (engine/mp_rank_*_model_states.pt,
engine/*zero_pp_rank_*_optim_states.pt) are pickles that DeepSpeed saves and loads itself with
torch.load(weights_only=False); the engine runs that load with TORCH_FORCE_WEIGHTS_ONLY_LOAD=1
and only DeepSpeed's plain data classes (ZeroStageEnum, LossScaler, DynamicLossScaler,
fragment_address) allowed, so a tampered pickle is refused instead of run (engines.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from medmax_pipeline.core import termination
from medmax_pipeline.core.artifacts import PROVENANCE_FILE, ArtifactError, read_meta, read_provenance
from medmax_pipeline.core.file_modes import honour_umask

from .config import IDENTITY_FIELDS, TrainConfig, TrainInputError
from .distributed import Dist
from .engines import Engine

CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
RUN_ID_RE = re.compile(r"^[0-9a-f]{16}$")
RUN_RECORD_KIND = "train_checkpoints"
CHECKPOINT_RECORD_KIND = "train_checkpoint"
# TrainConfig fields that change what a run computes (their Setting says so: config.py); with the
# inputs' identities and the code's they make the run config (and its hash, the run id).
RUN_CONFIG_FIELDS = IDENTITY_FIELDS


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


def save_rng_state(path: Path) -> None:
    """This process's RNG states as safetensors: torch generators as tensors, Python's and NumPy's
    (lists of integers) as JSON in the metadata. No pickle."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    metadata = {
        "python": json.dumps([python_state[0], list(python_state[1]), python_state[2]]),
        "numpy": json.dumps([numpy_state[0], numpy_state[1].tolist(), *(v.item() if hasattr(v, "item") else v for v in numpy_state[2:])]),
    }
    save_file(tensors, str(path), metadata=metadata)


def load_rng_state(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    version, internal, gauss = json.loads(metadata["python"])
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = json.loads(metadata["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------------------------
# Run config: the settings a checkpoint is resumed with
# ----------------------------------------------------------------------------------------------


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_model_identity(folder: Path) -> dict[str, Any]:
    """Cheap identity for the resume check: config.json's hash and the weight files' sizes."""
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"config": _file_digest(folder / "config.json"), "weights": [[p.name, p.stat().st_size] for p in weights]}


def training_code_identity() -> str:
    """Identity of the training code (the import closure of this package, core/code_identity.py):
    a checkpoint written by code that computes differently is not resumed, so a fix to training
    never finishes from a stale checkpoint; a comment, docstring or log line changes nothing."""
    from medmax_pipeline.core.code_identity import code_identity, stage_modules

    return code_identity(stage_modules("stages/train"))


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
        "code": training_code_identity(),
        **{k: v for k, v in asdict(cfg).items() if k in RUN_CONFIG_FIELDS},
    }
    return json.loads(json.dumps(run_config, default=str))


def run_id(run_config: Mapping[str, Any]) -> str:
    """The run config's hash: the name of the run's checkpoint folder."""
    return hashlib.blake2b(json.dumps(run_config, sort_keys=True).encode(), digest_size=8).hexdigest()


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of complete checkpoints, oldest first; temporary folders are not listed."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def _record(folder: Path) -> dict[str, Any] | None:
    try:
        return read_provenance(folder)
    except ArtifactError as exc:
        raise TrainInputError(f"{folder} was not written by this pipeline: {exc}") from None


def _listed_files(folder: Path) -> Iterator[Path]:
    for path in sorted(folder.rglob("*")):
        if path.is_file() or path.is_symlink():
            if path.relative_to(folder).as_posix() != PROVENANCE_FILE:
                yield path


def file_manifest(folder: Path) -> dict[str, list[Any]]:
    """Relative path -> [size, hash] of every file of a checkpoint but its record."""
    return {p.relative_to(folder).as_posix(): [p.stat().st_size, _file_digest(p)] for p in _listed_files(folder)}


def verify_checkpoint(folder: Path, expected_run_id: str) -> None:
    """Refuse (TrainInputError) a checkpoint folder that this run did not write or that changed since."""
    record = _record(folder)
    if record is None or record.get("kind") != CHECKPOINT_RECORD_KIND:
        raise TrainInputError(f"{folder} was not written by this pipeline (no {PROVENANCE_FILE} record of a training checkpoint); refusing to load it")
    if record.get("run_id") != expected_run_id:
        raise TrainInputError(f"{folder}: its record names run {record.get('run_id')!r}, not this run {expected_run_id!r}; refusing to load it")
    expected = record.get("files") or {}
    for path in _listed_files(folder):
        name = path.relative_to(folder).as_posix()
        if name not in expected:
            raise TrainInputError(f"{folder}: {name} is not in the checkpoint's record; refusing to load it")
        if path.is_symlink() or [path.stat().st_size, _file_digest(path)] != list(expected[name]):
            raise TrainInputError(f"{folder}: {name} changed since the checkpoint was written; refusing to load it")
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise TrainInputError(f"{folder}: {', '.join(missing)} listed in the record but missing")


def checkpoint_to_resume(root: Path, run_config: Mapping[str, Any]) -> Path | None:
    """The newest complete checkpoint of this run (root = OUTPUT/checkpoints/<run id>), verified, or None."""
    checkpoints = complete_checkpoints(root)
    if not checkpoints:
        return None
    record = _record(root)
    if record is None or record.get("kind") != RUN_RECORD_KIND or record.get("run_id") != root.name:
        raise TrainInputError(f"{root} holds checkpoints but no record of this pipeline's run {root.name}; refusing to load them")
    newest = checkpoints[-1][1]
    verify_checkpoint(newest, root.name)
    saved = json.loads((newest / "trainer_state.json").read_text())["run_config"]
    diffs = sorted(k for k in set(saved) | set(run_config) if saved.get(k) != run_config.get(k))
    if diffs:  # cannot happen unless the hash collides: the folder is named by the run config's hash
        raise TrainInputError(f"{newest} was written by a run with other settings ({', '.join(diffs)})")
    return newest


def prepare_run_folder(root: Path, run_config: Mapping[str, Any], credential: str) -> None:
    """Create OUTPUT/checkpoints/<run id> with its record (main rank), and drop temporary
    folders a run killed while saving left in it."""
    root.mkdir(parents=True, exist_ok=True)
    if read_provenance(root) is None:
        record = {"kind": RUN_RECORD_KIND, "credential": credential, "run_id": root.name, "run_config": dict(run_config)}
        _write_json(root / PROVENANCE_FILE, record)
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)


def remove_other_runs(checkpoints_dir: Path, keep_run_id: str) -> list[Path]:
    """Remove the run folders of other settings that this pipeline wrote (a record of kind
    train_checkpoints naming the folder); anything else is left alone. Main rank, after a run completes."""
    removed = []
    if not checkpoints_dir.is_dir():
        return removed
    for folder in sorted(checkpoints_dir.iterdir()):
        if folder.name == keep_run_id or not RUN_ID_RE.match(folder.name) or not folder.is_dir() or folder.is_symlink():
            continue
        try:
            record = read_provenance(folder)
        except ArtifactError:
            continue
        if record is not None and record.get("kind") == RUN_RECORD_KIND and record.get("run_id") == folder.name:
            shutil.rmtree(folder)
            removed.append(folder)
    return removed


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=1, default=str) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Save and load
# ----------------------------------------------------------------------------------------------


def save_checkpoint(
    root: Path, progress: Progress, run_config: Mapping[str, Any], engine: Engine, dist: Dist, keep: int,
    save_adapter_folder: Any, credential: str,
) -> Path:
    """Write step-{global_step} atomically on every rank together; keep the newest `keep` (0: all).
    save_adapter_folder(model, folder) writes the PEFT adapter (outputs.save_adapter_weights)."""
    step = progress.global_step
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    # The main rank's temporary folder goes if the run stops (SIGTERM included) before the rename.
    with termination.temporary_path(tmp) if dist.is_main else nullcontext():
        dist.barrier()
        engine.save_checkpoint(tmp)
        if dist.is_main:
            save_adapter_folder(engine.model, tmp / "adapter")
            state = {"global_step": step, "epoch": progress.epoch, "position": progress.position, "metrics": progress.metrics, "run_config": run_config}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        save_rng_state(tmp / f"rng-rank{dist.rank}.safetensors")
        dist.barrier()
        if dist.is_main:
            record = {"kind": CHECKPOINT_RECORD_KIND, "credential": credential, "run_id": root.name, "step": step, "files": file_manifest(tmp)}
            _write_json(tmp / PROVENANCE_FILE, record)
            honour_umask(tmp)  # safetensors writes 0600
            if final.exists():  # a rerun after the end rewrites the final checkpoint
                shutil.rmtree(final)
            os.replace(tmp, final)  # the rename is what makes the checkpoint complete
    if dist.is_main and keep:
        for _, old in complete_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(folder: Path, engine: Engine, dist: Dist) -> Progress:
    """Restore the engine, this rank's RNG and the run's progress from a verified checkpoint."""
    state = json.loads((folder / "trainer_state.json").read_text())
    try:
        engine.load_checkpoint(folder)
    except pickle.UnpicklingError as exc:
        raise TrainInputError(f"{folder}: a file holds more than tensors and plain data; refusing to unpickle it ({str(exc).splitlines()[0]})") from None
    load_rng_state(folder / f"rng-rank{dist.rank}.safetensors")
    return Progress(state["global_step"], state["epoch"], state["position"], state["metrics"])
