"""Stage 5: LoRA finetuning of an HF Chameleon / Anole model on the assembled `dataset` artifact.

The recipe is MedMax's (MEDMAX-FACTS.md, "Training"): LoRA r=16, alpha=16, dropout 0.05 on
q/k/v/o/gate/up/down projections, AdamW lr 1e-4, cosine schedule with 10 % warmup, 3 epochs,
batch 1 per device, max length 2048, bf16 on GPU with DeepSpeed ZeRO-2 across GPUs, pad id 1.
Where the public code was wrong we do what it meant, and say so:

* Loss mask (`response_labels`): the public code masked only up to the FIRST separator 8710, so
  later user turns of a multi-turn row were trained as if the model had to write them. Here 8710
  ends every turn and turns alternate user, assistant, user, ...: every user turn (from the
  start, or from just after the 8710 that closed the previous response, up to and including its
  own 8710) is masked; every response, with the 8710 that closes it and the final eos, is
  trained. On single-turn rows this equals the public rule.
* Image outputs: HF's Chameleon head masks image-token logits in every forward pass, so image
  labels would give an infinite loss; chameleon.allow_image_logits lifts that, and
  check_image_logits verifies it before any step.
* The data loader loops over the whole file for every epoch, in a seeded order.

The training loop is written out (no HF Trainer) in the flat style of torchtune recipes:
collate -> forward -> token-summed cross entropy / label tokens of the whole optimizer step ->
backward -> clip -> AdamW step -> scheduler step, checkpoints at step boundaries.

Launch: `medmax train ...` runs one process (CPU, or one GPU) with plain torch. With
`--deepspeed workflow/deepspeed/zero2.json` the same loop runs on a DeepSpeed ZeRO-2 engine ("auto"
values in the JSON are filled from the command line), in one process or under
`torchrun --nproc-per-node N -m medmax_pipeline train ...` over N ranks: NCCL on GPUs, gloo on CPU.
The CPU path is what the demo and the tests take, so the engine, its checkpoints and resumption
run everywhere; on CPU it gives the same numbers as the plain loop (tested to ~1e-8).

Resumption: checkpoints are written to OUTPUT/checkpoints/step-K atomically (temporary folder,
then rename) with the adapter, optimizer, scheduler, data position, metrics so far and RNG
states. A restarted run with the same settings resumes from the newest complete checkpoint and
ends exactly where an uninterrupted run ends (bitwise on CPU; GPU kernels are not bitwise
deterministic). A restart with different settings is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.artifacts import ArtifactError, read_meta, check_meta, write_artifact
from medmax_pipeline.core.plots import plot_loss

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
METRICS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.float64()),
        ("loss", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
        ("label_tokens", pa.int64()),
        ("tokens", pa.int64()),
        ("eval_loss", pa.float64()),
        # Wall-clock throughput: the only non-deterministic column. It is part of the artifact's
        # fingerprint, so two identical runs give train_metrics files with different fingerprints;
        # compare runs on the other columns.
        ("tokens_per_s", pa.float64()),
    ]
)


class TrainInputError(ValueError):
    """Bad input found before training starts: one message saying what and where."""


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainConfig:
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
        ]
        for ok, message in checks:
            if not ok:
                raise TrainInputError(message)


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


# ----------------------------------------------------------------------------------------------
# Pure logic: loss mask, collation, batching, schedule sizes
# ----------------------------------------------------------------------------------------------


def response_labels(ids: Sequence[int]) -> list[int]:
    """Labels for one sequence: user turns masked with -100, responses kept (see module doc).

    >>> response_labels([0, 10, 8710, 20, 21, 2])
    [-100, -100, -100, 20, 21, 2]
    >>> response_labels([0, 10, 8710, 20, 8710, 30, 8710, 40, 2])
    [-100, -100, -100, 20, 8710, -100, -100, 40, 2]
    """
    labels: list[int] = []
    in_response = False
    for token in ids:
        labels.append(int(token) if in_response else C.IGNORE_INDEX)
        if token == C.SEPARATOR_ID:
            in_response = not in_response  # the separator belongs to the turn it closes
    return labels


def collate(sequences: Sequence[Sequence[int]], pad_id: int = C.PAD_ID) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids with pad_id, labels with -100, attention_mask 1 on real tokens."""
    if not sequences:
        raise ValueError("collate needs at least one sequence")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), width), C.IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        n = len(seq)
        input_ids[row, :n] = torch.as_tensor(list(seq), dtype=torch.long)
        labels[row, :n] = torch.as_tensor(response_labels(seq), dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def length_grouped_batches(
    lengths: Sequence[int] | np.ndarray, batch_size: int, seed: int, epoch: int, group_size: int = 64
) -> list[list[int]]:
    """Row indices in batches of similar length, in an order fixed by (seed, epoch).

    Rows are shuffled, cut into windows of batch_size * group_size, sorted by length inside each
    window and chunked into batches, and the batches are shuffled again, so padding stays small
    while each epoch still sees a fresh random order. Every row appears exactly once.
    """
    lengths = np.asarray(lengths)
    rng = np.random.default_rng([int(seed), int(epoch)])
    order = rng.permutation(len(lengths))
    window = batch_size * group_size
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = order[start : start + window]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size))
    return [batches[i] for i in rng.permutation(len(batches))]


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's batches; the tail that does not fill every rank is dropped so ranks stay in step."""
    usable = (len(batches) // world_size) * world_size
    return batches[rank:usable:world_size]


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    """Optimizer steps per epoch; a last, shorter accumulation is still a step (as in HF)."""
    return math.ceil(num_batches / grad_accum)


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


@dataclass
class TokenRows:
    """The token sequences of one split, flat in memory (int32 values + int64 offsets)."""

    row_ids: list[str]
    values: np.ndarray
    offsets: np.ndarray
    truncated: int = 0  # rows cut to max_length
    dropped_no_response: int = 0

    def __len__(self) -> int:
        return len(self.row_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> list[int]:
        return self.values[self.offsets[i] : self.offsets[i + 1]].tolist()


def _row_of(offsets: np.ndarray, flat_index: int) -> int:
    return int(np.searchsorted(offsets, flat_index, side="right") - 1)


def load_token_rows(path: str | Path, split: str, max_length: int, vocab_size: int) -> TokenRows:
    """Read one split of a `dataset` artifact and check it; TrainInputError on bad input.

    Checks: artifact name and schema version, required columns, a non-empty split, no row
    without tokens (a credentialed row not tokenized locally), no id outside [0, vocab_size),
    no <image> placeholder 8711 left unexpanded. Rows longer than max_length are cut to it.
    Rows with nothing to train on (no token after their first separator 8710) are dropped and
    counted; if no row is left, that is an error.
    """
    path = Path(path)
    try:
        meta = read_meta(path)
        check_meta(meta, "dataset")
    except ArtifactError as exc:
        raise TrainInputError(f"dataset {path}: {exc}") from exc
    names = pq.read_schema(path).names
    missing = [c for c in ("row_id", "split", "tokens") if c not in names]
    if missing:
        raise TrainInputError(f"dataset {path} lacks column(s) {', '.join(missing)}")
    table = pq.read_table(path, columns=["row_id", "split", "tokens"])
    splits = sorted(set(table.column("split").to_pylist()))
    table = table.filter(pc.equal(table.column("split"), split))
    if table.num_rows == 0:
        raise TrainInputError(f"dataset {path}: split {split!r} has no rows (splits present: {splits or 'none'})")
    tokens = table.column("tokens").combine_chunks()
    if isinstance(tokens, pa.ChunkedArray):  # pyarrow < 15 keeps a ChunkedArray
        tokens = pa.concat_arrays(tokens.chunks)
    row_ids = [str(r) for r in table.column("row_id").to_pylist()]
    lengths = pc.fill_null(pc.list_value_length(tokens), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise TrainInputError(
            f"dataset {path}: {len(empty)} {split} row(s) have no tokens, first {row_ids[empty[0]]!r} "
            "(credentialed rows must be tokenized locally before training)"
        )
    values = tokens.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    bad = np.flatnonzero((values < 0) | (values >= vocab_size))
    if len(bad):
        row = _row_of(offsets, int(bad[0]))
        raise TrainInputError(
            f"dataset {path}: {len(bad)} token id(s) outside the model's vocabulary [0, {vocab_size}), first "
            f"{int(values[bad[0]])} in row {row_ids[row]!r}; the dataset was built for another vocabulary"
        )
    placeholders = np.flatnonzero(values == C.IMAGE_PLACEHOLDER_ID)
    if len(placeholders):
        row = _row_of(offsets, int(placeholders[0]))
        raise TrainInputError(
            f"dataset {path}: row {row_ids[row]!r} still holds the <image> placeholder {C.IMAGE_PLACEHOLDER_ID}; "
            "every placeholder must be replaced by its image block at assembly"
        )
    # Truncate to max_length (the assembly stage already cut at 2048; a smaller --max-length cuts more).
    kept = np.minimum(lengths, max_length)
    truncated = int((lengths > max_length).sum())
    if truncated:
        keep_mask = np.arange(len(values)) - np.repeat(offsets[:-1], lengths) < np.repeat(kept, lengths)
        values = values[keep_mask]
        offsets = np.concatenate([[0], np.cumsum(kept)])
    # A row trains something iff its first separator comes before its last token.
    seps = np.flatnonzero(values == C.SEPARATOR_ID)
    sep_rows = np.searchsorted(offsets, seps, side="right") - 1
    useful = np.zeros(len(row_ids), dtype=bool)
    useful[sep_rows[seps < offsets[sep_rows + 1] - 1]] = True
    dropped = int((~useful).sum())
    if not useful.any():
        raise TrainInputError(
            f"dataset {path}: none of the {len(row_ids)} {split} row(s) has a response after a "
            f"separator {C.SEPARATOR_ID}; there is nothing to train on"
        )
    if dropped:
        keep = np.flatnonzero(useful)
        new_lengths = np.diff(offsets)[keep]
        values = np.concatenate([values[offsets[i] : offsets[i + 1]] for i in keep])
        offsets = np.concatenate([[0], np.cumsum(new_lengths)])
        row_ids = [row_ids[i] for i in keep]
    return TokenRows(row_ids, values, offsets, truncated=truncated, dropped_no_response=dropped)


# ----------------------------------------------------------------------------------------------
# DeepSpeed configuration
# ----------------------------------------------------------------------------------------------


def resolve_deepspeed_config(
    config: str | Path | Mapping[str, Any],
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    bf16: bool,
    max_grad_norm: float,
) -> dict[str, Any]:
    """Fill the "auto" values of a DeepSpeed JSON from the command line and validate it.

    Refused with TrainInputError: an unreadable file, an explicit value contradicting the command
    line, ZeRO stage 3 (adapter saving here assumes unpartitioned parameters), an "optimizer" or
    "scheduler" section (the recipe builds AdamW and the schedule itself, so both are the same
    with and without DeepSpeed), fp16, and anything DeepSpeed's own config parser rejects.
    """
    source = "DeepSpeed config"
    if not isinstance(config, Mapping):
        source = str(config)
        try:
            config = json.loads(Path(config).read_text())
        except FileNotFoundError:
            raise TrainInputError(f"DeepSpeed config {source} does not exist") from None
        except json.JSONDecodeError as exc:
            raise TrainInputError(f"DeepSpeed config {source} is not valid JSON: {exc}") from exc
    resolved: dict[str, Any] = json.loads(json.dumps(config))
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in wanted.items():
        current = resolved.get(key, "auto")
        if current == "auto":
            resolved[key] = value
        elif current != value:
            raise TrainInputError(f"{source}: {key} is {current!r} but the command line implies {value!r}")
    bf16_section = resolved.setdefault("bf16", {})
    if bf16_section.get("enabled", "auto") == "auto":
        bf16_section["enabled"] = bf16
    elif bool(bf16_section["enabled"]) != bf16:
        raise TrainInputError(f"{source}: bf16.enabled is {bf16_section['enabled']} but --precision gives bf16={bf16}")
    fp16 = resolved.get("fp16", {})
    if fp16.get("enabled") not in (None, False, "auto"):
        raise TrainInputError(f"{source}: fp16 is not part of the recipe (bf16 on GPU); remove the fp16 section")
    if "fp16" in resolved:
        resolved["fp16"]["enabled"] = False
    for section in ("optimizer", "scheduler"):
        if section in resolved:
            raise TrainInputError(
                f"{source}: remove the {section!r} section; medmax train builds AdamW and the {section} itself"
            )
    zero = resolved.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2):
        raise TrainInputError(f"{source}: zero_optimization.stage {stage!r} is not supported (use 2, as MedMax did)")
    leftover = [k for k, v in _walk(resolved) if v == "auto"]
    if leftover:
        raise TrainInputError(f"{source}: no value to fill in for 'auto' at {', '.join(leftover)}")
    try:
        from deepspeed.runtime.config import DeepSpeedConfig

        # train_batch_size is left out for the check: DeepSpeed derives it from the world size
        # of an initialised process group, which may not exist yet.
        DeepSpeedConfig({k: v for k, v in resolved.items() if k != "train_batch_size"})
    except ImportError:  # pragma: no cover - deepspeed is a declared dependency
        raise TrainInputError("--deepspeed needs the deepspeed package") from None
    except Exception as exc:
        raise TrainInputError(f"{source}: DeepSpeed rejects it: {exc}") from exc
    return resolved


def _walk(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), obj


# ----------------------------------------------------------------------------------------------
# Process group, RNG, checkpoints
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env() -> "Dist":
        return Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        if self.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()


def init_deepspeed(device: torch.device) -> None:
    """Set up DeepSpeed's process group: NCCL on GPUs, gloo on CPU; a world of one without torchrun."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # also on a host that has CUDA
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != device.type:
        raise TrainInputError(
            f"DeepSpeed's accelerator is {get_accelerator().device_name()!r} but training runs on {device.type!r}; "
            f"set DS_ACCELERATOR={device.type}"
        )
    # A plain `medmax train --deepspeed ...` (no torchrun) is a world of one; without these
    # variables DeepSpeed would try MPI discovery.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())  # two single-process runs on one host must not collide
    if device.type == "cpu":
        # DeepSpeed's CPU accelerator would JIT-compile a shared-memory all-reduce (a C++
        # toolchain and ~40 s on first use); plain gloo is enough for CPU runs, which are checks.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of complete checkpoints, oldest first; temporary folders are not listed."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return sorted(found)


def _file_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def _base_model_identity(folder: Path) -> dict[str, Any]:
    # Cheap identity for the resume check: config.json's hash and the weight files' sizes.
    weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {"config": _file_digest(folder / "config.json"), "weights": [[p.name, p.stat().st_size] for p in weights]}


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def _log(dist: Dist, message: str) -> None:
    if dist.is_main:
        print(f"medmax train: {message}", file=sys.stderr, flush=True)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "bf16" and device.type == "cpu":
        return "bf16"  # allowed (slow, for checking); the recipe's default on CPU is fp32
    return precision


def _token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Next-token cross entropy summed over label tokens, in fp32 whatever the model dtype.
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=C.IGNORE_INDEX, reduction="sum"
    )


def _label_tokens(batch: Mapping[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != C.IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(forward: Any, model: torch.nn.Module, rows: TokenRows, batch_size: int, device: torch.device, dist: Dist) -> float:
    """Mean next-token loss over the response tokens of `rows` (all ranks together)."""
    was_training = model.training
    model.eval()
    order = np.argsort(-rows.lengths, kind="stable")
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    loss_sum, count = 0.0, 0
    for batch_rows in batches[dist.rank :: dist.world_size]:
        batch = collate([rows.sequence(i) for i in batch_rows])
        out = forward(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
        loss_sum += float(_token_loss_sum(out.logits, batch["labels"]))
        count += _label_tokens(batch)
    model.train(was_training)
    loss_sum, count = dist.all_reduce_sum([loss_sum, float(count)], device)
    return loss_sum / max(count, 1.0)


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) LoRA training; see the module docstring. Bad input -> TrainInputError."""
    import transformers
    from peft import LoraConfig, get_peft_model
    from peft.utils import set_peft_model_state_dict

    from medmax_pipeline.models import chameleon

    cfg.validate()
    dist = Dist.from_env()
    device = chameleon.resolve_device(cfg.device)
    if device.type == "cuda" and dist.world_size > 1:
        device = torch.device("cuda", dist.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    precision = resolve_precision(cfg.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    # --- DeepSpeed: NCCL on GPUs, gloo on CPU ------------------------------------------------
    ds_config = None
    if cfg.deepspeed is not None:
        ds_config = resolve_deepspeed_config(
            cfg.deepspeed, micro_batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
            world_size=dist.world_size, bf16=precision == "bf16", max_grad_norm=cfg.max_grad_norm,
        )
        init_deepspeed(device)
    if dist.world_size > 1 and ds_config is None:
        raise TrainInputError(f"{dist.world_size} processes need --deepspeed (workflow/deepspeed/zero2.json)")

    # --- Inputs, all checked before any model is built ----------------------------------------
    try:
        model_config = chameleon.check_base_model_folder(cfg.base_model, cfg.tokenizer)
    except chameleon.ModelLayoutError as exc:
        raise TrainInputError(f"base model: {exc}") from exc
    vocab_size = int(model_config["vocab_size"])
    rows = load_token_rows(cfg.dataset, "train", cfg.max_length, vocab_size)
    eval_rows = load_token_rows(cfg.eval_dataset, "validation", cfg.max_length, vocab_size) if cfg.eval_dataset else None
    _log(dist, f"{len(rows)} training rows ({rows.truncated} cut to {cfg.max_length}, {rows.dropped_no_response} without a response dropped)")

    num_batches = len(shard_batches(length_grouped_batches(rows.lengths, cfg.batch_size, cfg.seed, 0, cfg.group_size), 0, dist.world_size))
    if num_batches == 0:
        raise TrainInputError(f"{len(rows)} training rows do not fill one batch of {cfg.batch_size} on each of {dist.world_size} process(es)")
    per_epoch = steps_per_epoch(num_batches, cfg.grad_accum)
    total_steps = per_epoch * cfg.epochs if cfg.max_steps is None else min(cfg.max_steps, per_epoch * cfg.epochs)
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)

    run_config = {
        "dataset": read_meta(cfg.dataset).fingerprint,
        "eval_dataset": read_meta(cfg.eval_dataset).fingerprint if cfg.eval_dataset else None,
        "base_model": _base_model_identity(Path(cfg.base_model)),
        "engine": "deepspeed" if ds_config else "torch",
        "precision": precision,
        "world_size": dist.world_size,
        "total_steps": total_steps,
        **{k: v for k, v in asdict(cfg).items() if k in (
            "lora_r", "lora_alpha", "lora_dropout", "target_modules", "lr", "weight_decay", "scheduler", "warmup_ratio",
            "epochs", "batch_size", "grad_accum", "max_length", "max_grad_norm", "seed", "group_size", "eval_every",
            "gradient_checkpointing",
        )},
    }
    run_config = json.loads(json.dumps(run_config, default=str))
    output = Path(cfg.output)
    ckpt_root = output / "checkpoints"
    checkpoints = complete_checkpoints(ckpt_root)
    resume_from = checkpoints[-1][1] if checkpoints else None
    if resume_from is not None:
        saved = json.loads((resume_from / "trainer_state.json").read_text())["run_config"]
        diffs = sorted(k for k in set(saved) | set(run_config) if saved.get(k) != run_config.get(k))
        if diffs:
            raise TrainInputError(
                f"{resume_from} was written by a run with other settings ({', '.join(diffs)}); "
                f"use another --output or delete {ckpt_root} to start afresh"
            )

    # --- Model ------------------------------------------------------------------------------
    seed_everything(cfg.seed)
    model = chameleon.load_base_model(cfg.base_model, dtype=dtype, device=device, tokenizer=cfg.tokenizer)
    model.config.use_cache = False
    chameleon.allow_image_logits(model)  # MedMax trains image outputs
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
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    scheduler = transformers.get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)

    engine = None
    if ds_config is not None:
        import deepspeed

        engine, optimizer, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    forward = engine if engine is not None else model

    # --- Resume -----------------------------------------------------------------------------
    global_step, epoch, position = 0, 0, 0
    metrics: list[dict[str, Any]] = []
    resumed_from_step = None
    if resume_from is not None:
        state = json.loads((resume_from / "trainer_state.json").read_text())
        if engine is not None:
            engine.load_checkpoint(str(resume_from), tag="engine", load_module_strict=False)
        else:
            from safetensors.torch import load_file

            set_peft_model_state_dict(model, load_file(str(resume_from / "adapter" / "adapter_model.safetensors"), device=str(device)))
            optimizer.load_state_dict(torch.load(resume_from / "optimizer.pt", map_location=device, weights_only=True))
            scheduler.load_state_dict(torch.load(resume_from / "scheduler.pt", weights_only=True))
        set_rng_state(torch.load(resume_from / f"rng-rank{dist.rank}.pt", weights_only=False))
        global_step, epoch, position = state["global_step"], state["epoch"], state["position"]
        metrics = state["metrics"]
        resumed_from_step = global_step
        _log(dist, f"resumed from {resume_from} (step {global_step} of {total_steps})")

    def save_checkpoint(step: int) -> Path:
        final = ckpt_root / f"step-{step}"
        tmp = ckpt_root / f".tmp-step-{step}"
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        if engine is not None:
            engine.save_checkpoint(str(tmp), tag="engine", exclude_frozen_parameters=True)
        if dist.is_main:
            model.save_pretrained(str(tmp / "adapter"))
            if engine is None:
                torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
                torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            state = {"global_step": step, "epoch": epoch, "position": position, "metrics": metrics, "run_config": run_config}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        torch.save(rng_state(), tmp / f"rng-rank{dist.rank}.pt")
        dist.barrier()
        if dist.is_main:
            if final.exists():  # a rerun after the end rewrites the final checkpoint
                shutil.rmtree(final)
            os.replace(tmp, final)  # the rename is what makes the checkpoint complete
            if cfg.keep_checkpoints:
                for _, old in complete_checkpoints(ckpt_root)[: -cfg.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()
        return final

    if dist.is_main and ckpt_root.is_dir():
        for stale in ckpt_root.glob(".tmp-step-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)

    # --- Training loop ----------------------------------------------------------------------
    from tqdm.auto import tqdm

    model.train()
    bar = tqdm(total=total_steps, initial=global_step, disable=not (cfg.progress and dist.is_main), desc="train", unit="step")
    stopped = False
    while global_step < total_steps and epoch < cfg.epochs:
        batches = shard_batches(length_grouped_batches(rows.lengths, cfg.batch_size, cfg.seed, epoch, cfg.group_size), dist.rank, dist.world_size)
        while position < len(batches) and global_step < total_steps:
            started = time.perf_counter()
            group = [collate([rows.sequence(i) for i in b]) for b in batches[position : position + cfg.grad_accum]]
            # Normalise by the label tokens of the whole optimizer step on all ranks, so every
            # response token weighs the same whatever batch it landed in.
            local_labels = sum(_label_tokens(b) for b in group)
            local_tokens = sum(int(b["attention_mask"].sum()) for b in group)
            global_labels, global_tokens = dist.all_reduce_sum([float(local_labels), float(local_tokens)], device)
            lr = scheduler.get_last_lr()[0]
            loss_sum = 0.0
            for k, batch in enumerate(group):
                if engine is not None:
                    engine.set_gradient_accumulation_boundary(k == len(group) - 1)
                out = forward(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
                summed = _token_loss_sum(out.logits, batch["labels"])
                # DDP / ZeRO average gradients over ranks; * world_size undoes that average.
                scaled = summed * (dist.world_size / global_labels)
                if engine is not None:
                    engine.backward(scaled, scale_wrt_gas=False)
                else:
                    scaled.backward()
                loss_sum += float(summed.detach())
            if engine is not None:
                engine.step()  # clips (gradient_clipping), steps AdamW and the scheduler
                grad_norm = float(engine.get_global_grad_norm() or 0.0)
            else:
                grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            (loss_total,) = dist.all_reduce_sum([loss_sum], device)
            position += len(group)
            global_step += 1
            elapsed = time.perf_counter() - started
            row = {
                "step": global_step, "epoch": epoch + position / len(batches), "loss": loss_total / global_labels,
                "lr": lr, "grad_norm": grad_norm, "label_tokens": int(global_labels), "tokens": int(global_tokens),
                "eval_loss": None, "tokens_per_s": global_tokens / elapsed if elapsed > 0 else 0.0,
            }
            end_of_epoch = position >= len(batches)
            if eval_rows is not None and ((cfg.eval_every and global_step % cfg.eval_every == 0) or end_of_epoch or global_step == total_steps):
                row["eval_loss"] = evaluate(forward, model, eval_rows, cfg.batch_size, device, dist)
            metrics.append(row)
            if end_of_epoch:
                epoch, position = epoch + 1, 0
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
            if cfg.save_every and global_step % cfg.save_every == 0 and global_step < total_steps:
                save_checkpoint(global_step)
            if cfg.stop_after_step is not None and global_step >= cfg.stop_after_step:
                stopped = True
                break
            if end_of_epoch:
                break
        if stopped:
            break
    bar.close()
    result = TrainResult(
        output=output, completed=not stopped, steps=global_step, resumed_from_step=resumed_from_step, metrics=metrics,
        model=model if dist.is_main else None,
    )
    if stopped:
        _log(dist, f"stopped after step {global_step} (stop_after_step)")
        return result

    # --- Outputs ----------------------------------------------------------------------------
    if not complete_checkpoints(ckpt_root) or complete_checkpoints(ckpt_root)[-1][0] != global_step:
        save_checkpoint(global_step)
    if engine is not None:
        from deepspeed.utils import safe_get_full_fp32_param

        # Save the fp32 master weights, not the bf16 copies the engine computes with.
        for p in trainable:
            p.data = safe_get_full_fp32_param(p).to(p.device)
    if dist.is_main:
        result.adapter_dir = _save_adapter(model, output, cfg, run_config)
        result.metrics_path = _write_metrics(metrics, output / "train_metrics.parquet", cfg, run_config)
        result.loss_curve_path = plot_loss(metrics, output / "loss_curve.png")
        if cfg.merge:
            result.merged_dir = merge_adapter(cfg.base_model, result.adapter_dir, output / "merged", dtype=dtype, tokenizer=cfg.tokenizer)
        _log(dist, f"done: {global_step} steps, final loss {metrics[-1]['loss']:.4f}; adapter in {result.adapter_dir}")
    dist.barrier()
    return result


def _save_adapter(model: torch.nn.Module, output: Path, cfg: TrainConfig, run_config: Mapping[str, Any]) -> Path:
    final = output / "adapter"
    tmp = output / ".tmp-adapter"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    dataset_meta = read_meta(cfg.dataset)
    # The adapter was fitted to the dataset's rows: it carries the dataset's credential status.
    provenance = {
        "dataset": str(cfg.dataset), "dataset_fingerprint": dataset_meta.fingerprint,
        "credential": dataset_meta.credential, "base_model": str(cfg.base_model), "run_config": run_config,
    }
    (tmp / "medmax_provenance.json").write_text(json.dumps(provenance, indent=1, default=str))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _write_metrics(metrics: list[dict[str, Any]], path: Path, cfg: TrainConfig, run_config: Mapping[str, Any]) -> Path:
    table = pa.Table.from_pylist(metrics, schema=METRICS_SCHEMA)
    inputs: list[Any] = [cfg.dataset] + ([cfg.eval_dataset] if cfg.eval_dataset else [])
    # The base model enters the lineage by config.json hash and weight sizes: hashing 14 GB of
    # safetensors for a lineage line is not worth it.
    identity = hashlib.blake2b(json.dumps(run_config["base_model"], sort_keys=True).encode(), digest_size=32).hexdigest()
    inputs.append({"path": str(cfg.base_model), "artifact": None, "fingerprint": f"config+sizes:{identity}", "credential": "public"})
    write_artifact(table, path, artifact="train_metrics", inputs=inputs, params=dict(run_config))
    return path


def merge_adapter(
    base_model: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
    tokenizer: str | Path | None = None,
) -> Path:
    """Fold the LoRA adapter into the base weights and save a plain HF Chameleon folder."""
    from peft import PeftModel

    from medmax_pipeline.models import chameleon

    base = chameleon.load_base_model(base_model, dtype=dtype, device="cpu", tokenizer=tokenizer)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp))
    chameleon.copy_tokenizer_files(base_model, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


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
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
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
    )


def run(args: argparse.Namespace) -> int:
    from medmax_pipeline.models.chameleon import ImageLogitsMaskedError, ModelLayoutError

    try:
        train(config_from_args(args))
    except (TrainInputError, ModelLayoutError, ArtifactError, ImageLogitsMaskedError) as exc:
        print(f"medmax train: error: {exc}", file=sys.stderr)
        return 2
    return 0
