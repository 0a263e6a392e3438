"""Stage 2: VQGAN-tokenize the images of one shard, resumably; then gather the shards.

Input: a CSV with an `img_path` column (the public script's input); optional `image_key` and
`credential` ('yes'/'no', default 'no') columns are carried through. Relative paths are read
relative to the working directory and written out exactly as given. One file may carry several
image keys (collect lists './a.jpg', 'a.jpg/' and a symlink alias as their own keys with one
resolved img_path): the file is decoded and encoded once and every key gets its row. An image
whose file lies under a credentialed root (--credentialed-root, symlinks followed) is credential
= yes whatever the CSV says, so a CSV with only img_path cannot publish credentialed tokens.

One run per shard: a run holds DIR/.shard-I-of-N.lock while it works (rank 0 under torchrun;
core/output_lock: flock, or exclusive creation where the filesystem has no flock), so a second
run on the same shard stops at once naming the lock file, its pid and host.

Sharding: an image belongs to shard blake2b-64(img_path as UTF-8) mod N, so each distinct path
lands in exactly one shard for any N, with no padding rows, and an image's shard does not depend
on which other images are in the list. Inside a shard, images are processed in sorted img_path
order (rows sorted by img_path, then image_key), in chunks of `chunk_size` distinct files;
under torchrun (RANK / WORLD_SIZE set) rank r takes the chunks c with c % WORLD_SIZE == r, and
rank 0 merges once every rank is done.

Resume (core/resume.UnitFiles): each finished chunk is written atomically to
DIR/shard-I-of-N.chunks/chunk-NNNNNN.parquet (artifact image_tokens_chunk) with the chunk's
identity (paths, VQGAN fingerprint, precision, device type, batch size) in its lineage params; a
restarted job skips chunks whose file matches and redoes the rest, so its final artifacts equal
those of an uninterrupted run. The chunk folder is removed once the shard is written.

Outputs: DIR/shard-I-of-N.parquet (image_tokens: img_path, image_key, credential, img_tokens
list<int16> of 1024 codes in 0..8191, row-major 32x32, orig_width, orig_height, orig_mode) and
DIR/shard-I-of-N.errors.parquet (image_token_errors: img_path, image_key, credential, reason).
An image that cannot be read goes to the errors file with its reason, never into the tokens.

Precision: fp32 (default; TF32 explicitly disabled on CUDA so codes are reproducible), tf32
(CUDA only) or bf16 (encoder in bfloat16, nearest-code search in float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import heapq
import json
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medmax_pipeline.core.artifacts import (
    ArtifactError,
    ArtifactGroup,
    check_meta,
    describe_input,
    iter_artifact_batches,
    read_artifact,
    read_meta,
)
from medmax_pipeline.core.constants import CODES_PER_IMAGE, NUM_IMAGE_CODES
from medmax_pipeline.core.output_lock import hold_lock
from medmax_pipeline.core.ranks import ranks_from_env
from medmax_pipeline.core.resume import UnitFiles
from medmax_pipeline.core.paths import MissingRootError, is_under_roots, resolve_roots
from medmax_pipeline.core.settings import add_setting_arguments, checked_settings, setting, values_from_args, workflow_arguments_for
from medmax_pipeline.models.image_preprocess import DEFAULT_MAX_PIXELS, HIGH_BIT_DEPTH_MODES

TOKENS_ARTIFACT = "image_tokens"
CHUNK_ARTIFACT = "image_tokens_chunk"
ERRORS_ARTIFACT = "image_token_errors"
SHARDING_RULE = "blake2b-64(img_path utf-8) mod num_shards"
PRECISIONS = ("fp32", "bf16", "tf32")
DEVICES = ("cpu", "cuda")

TOKENS_SCHEMA = pa.schema(
    [
        pa.field("img_path", pa.string(), nullable=False),
        pa.field("image_key", pa.string()),
        pa.field("credential", pa.string(), nullable=False),
        pa.field("img_tokens", pa.list_(pa.int16())),
        pa.field("orig_width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("orig_mode", pa.string()),
    ]
)
ERRORS_SCHEMA = pa.schema(
    [
        pa.field("img_path", pa.string(), nullable=False),
        pa.field("image_key", pa.string()),
        pa.field("credential", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)
# A chunk holds both outcomes: reason is null for tokenized images, img_tokens null for errors.
CHUNK_SCHEMA = pa.schema([*TOKENS_SCHEMA, pa.field("reason", pa.string())])


class TokenizeInputError(ValueError):
    """The image list or an argument is unusable (missing column, empty path, bad credential, bad count)."""


class DeviceUnavailableError(RuntimeError):
    """The requested device does not exist here (--device cuda without a usable GPU)."""


# What run_tokenize / run_gather_tokens report as one `error:` line rather than a traceback.


@dataclass(frozen=True)
class ImageRow:
    img_path: str
    image_key: str | None
    credential: str  # 'yes' or 'no'


@dataclass(frozen=True)
class ShardResult:
    tokens_path: Path
    errors_path: Path | None  # None on ranks other than 0
    num_tokens: int
    num_errors: int
    chunks_done: int  # chunks computed by this process (not reused)
    chunks_reused: int


# ----------------------------------------------------------------------------------------------
# Image list and sharding (pure)
# ----------------------------------------------------------------------------------------------


def resolve_credentialed_roots(roots: Sequence[str | Path]) -> list[Path]:
    """The credentialed roots, each resolved (symlinks followed); a missing root is an input error."""
    try:
        return resolve_roots(roots)
    except MissingRootError as exc:
        raise TokenizeInputError(str(exc)) from None


def read_image_list(csv_path: str | Path, credentialed_roots: Sequence[str | Path] = ()) -> list[ImageRow]:
    """Distinct (img_path, image_key) rows of the CSV, in file order.

    One img_path may carry several image keys (aliases of one file); its rows must agree on the
    credential. A file under one of `credentialed_roots` is credential = yes whatever the CSV says.
    """
    import polars as pl

    csv_path = Path(csv_path)
    try:
        table = pl.read_csv(csv_path, infer_schema=False)  # every column as text
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise TokenizeInputError(f"{csv_path}: cannot read the image list CSV: {exc}") from None
    if "img_path" not in table.columns:
        raise TokenizeInputError(f"{csv_path}: no img_path column (found {table.columns})")

    def column(name: str) -> list[Any] | None:
        return table.get_column(name).to_list() if name in table.columns else None

    roots = resolve_credentialed_roots(credentialed_roots)
    paths, keys, credentials = column("img_path"), column("image_key"), column("credential")
    rows: dict[tuple[str, str | None], ImageRow] = {}
    first_seen: dict[str, tuple[int, str]] = {}  # img_path -> (data row, credential) of its first row
    for i, path in enumerate(paths):
        where = f"{csv_path}: data row {i + 1}"
        if path is None or not path.strip():
            raise TokenizeInputError(f"{where}: empty img_path")
        key = keys[i] if keys is not None else None
        key = key if key else None
        credential = (credentials[i] or "no").strip().lower() if credentials is not None else "no"
        if credential not in ("yes", "no"):
            raise TokenizeInputError(f"{where}: credential must be 'yes' or 'no', got {credentials[i]!r}")
        first_row, first_credential = first_seen.setdefault(path, (i, credential))
        if credential != first_credential:
            raise TokenizeInputError(
                f"{where}: img_path {path!r} repeats data row {first_row + 1} with a different "
                f"credential ({first_credential!r} vs {credential!r})"
            )
        rows.setdefault((path, key), ImageRow(path, key, credential))
    under_roots = {path: is_under_roots(path, roots) for path in first_seen}
    return [ImageRow(r.img_path, r.image_key, "yes") if under_roots[r.img_path] else r for r in rows.values()]


def shard_of(img_path: str, num_shards: int) -> int:
    """The shard of an image: blake2b-64 of its path (UTF-8, big-endian) mod num_shards."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    digest = hashlib.blake2b(img_path.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % num_shards


def row_order(row: ImageRow) -> tuple[str, str]:
    """Rows sort by img_path, then image_key (several keys of one file stay together)."""
    return row.img_path, row.image_key or ""


def shard_rows(rows: Sequence[ImageRow], shard: int, num_shards: int) -> list[ImageRow]:
    """The rows of one shard, sorted by img_path, then image_key."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard must be in 0..{num_shards - 1}, got {shard}")
    return sorted((r for r in rows if shard_of(r.img_path, num_shards) == shard), key=row_order)


def group_by_file(rows: Sequence[ImageRow]) -> list[list[ImageRow]]:
    """Consecutive rows of one img_path as one group: the unit that is decoded and encoded once."""
    groups: list[list[ImageRow]] = []
    for row in rows:
        if groups and groups[-1][0].img_path == row.img_path:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def check_shard_arguments(shard: int, num_shards: int, batch_size: int = 1, workers: int = 0, chunk_size: int = 1) -> None:
    """Refuse counts that make no sense, naming the command-line option."""
    if num_shards < 1:
        raise TokenizeInputError(f"--num-shards must be at least 1, got {num_shards}")
    if not 0 <= shard < num_shards:
        raise TokenizeInputError(f"--shard {shard} is outside 0..{num_shards - 1} (--num-shards {num_shards})")
    if batch_size < 1:
        raise TokenizeInputError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise TokenizeInputError(f"--workers must be at least 0, got {workers}")
    if chunk_size < 1:
        raise TokenizeInputError(f"--chunk-size must be at least 1, got {chunk_size}")


def chunk_ranges(num_rows: int, chunk_size: int) -> list[range]:
    """Consecutive row ranges of at most chunk_size rows."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [range(start, min(start + chunk_size, num_rows)) for start in range(0, num_rows, chunk_size)]


def rank_chunks(num_chunks: int, rank: int, world_size: int) -> list[int]:
    """The chunks rank `rank` of `world_size` computes: c % world_size == rank."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    return list(range(rank, num_chunks, world_size))


def shard_stem(shard: int, num_shards: int) -> str:
    return f"shard-{shard}-of-{num_shards}"


def shard_lock_path(output_dir: str | Path, shard: int, num_shards: int) -> Path:
    return Path(output_dir) / f".{shard_stem(shard, num_shards)}.lock"


def shard_paths(output_dir: str | Path, shard: int, num_shards: int) -> tuple[Path, Path, Path]:
    """(tokens file, errors file, chunk folder) of a shard."""
    output_dir = Path(output_dir)
    stem = shard_stem(shard, num_shards)
    return output_dir / f"{stem}.parquet", output_dir / f"{stem}.errors.parquet", output_dir / f"{stem}.chunks"


def rows_digest(rows: Sequence[ImageRow]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for r in rows:
        h.update(json.dumps([r.img_path, r.image_key, r.credential]).encode() + b"\n")
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Decoding in DataLoader workers
# ----------------------------------------------------------------------------------------------


class ImageFileDataset:
    """Item i: (i, pixels or None, orig_width, orig_height, orig_mode, error reason or None).

    Any failure of one image becomes its reason; it never becomes pixels.
    """

    def __init__(self, rows: Sequence[ImageRow], max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.rows = list(rows)
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[int, Any, int, int, str, str | None]:
        from medmax_pipeline.models.image_preprocess import ImageDecodeError, load_image_pixels

        path = self.rows[index].img_path
        try:
            image = load_image_pixels(path, max_pixels=self.max_pixels)
        except ImageDecodeError as exc:
            return index, None, 0, 0, "", exc.reason
        except Exception as exc:  # a decoder bug must not stop a 1.5M-image job; it is reported
            return index, None, 0, 0, "", f"unexpected {type(exc).__name__} while decoding: {exc}"
        return index, image.pixels, image.orig_width, image.orig_height, image.orig_mode, None


def collate_decoded(items: list[tuple[int, Any, int, int, str, str | None]]) -> dict[str, Any]:
    import torch

    good = [it for it in items if it[1] is not None]
    return {
        "indices": [it[0] for it in items],
        "good": [it[0] for it in good],
        "pixels": torch.stack([it[1] for it in good]) if good else None,
        "sizes": {it[0]: (it[2], it[3], it[4]) for it in good},
        "reasons": {it[0]: it[5] for it in items if it[1] is None},
    }


# ----------------------------------------------------------------------------------------------
# Device, precision, distributed
# ----------------------------------------------------------------------------------------------


def set_cuda_precision(precision: str) -> None:
    """fp32 and bf16 get IEEE fp32 convs/matmuls (PyTorch lets cuDNN use TF32 by default); tf32 allows TF32."""
    import torch

    allow = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def prepare_vqgan(ckpt_dir: str | Path, device: str, precision: str, local_rank: int = 0) -> Any:
    import torch

    from medmax_pipeline.models.vqgan import load_vqgan

    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError("--device cuda but torch.cuda.is_available() is False")
        torch.cuda.set_device(local_rank)
        set_cuda_precision(precision)
        target = torch.device("cuda", local_rank)
    else:
        if precision == "tf32":
            raise ValueError("--precision tf32 only exists on CUDA; use fp32 (identical on CPU) or bf16")
        target = torch.device("cpu")
    model = load_vqgan(ckpt_dir, device="cpu")
    if precision == "bf16":
        model = model.to_bf16_encoder()
    return model.to(target).eval()


# ----------------------------------------------------------------------------------------------
# Chunks
# ----------------------------------------------------------------------------------------------


def chunk_units(chunk_dir: Path) -> UnitFiles:
    """A shard's finished chunks (core/resume): chunk-NNNNNN.parquet image_tokens_chunk artifacts
    whose lineage params are the chunk's identity (ShardPlan.chunk_params); one counts only if
    it was made with the same plan and model."""
    return UnitFiles(chunk_dir, CHUNK_ARTIFACT, prefix="chunk")


def chunk_table(groups: Sequence[Sequence[ImageRow]], codes: dict[int, np.ndarray], sizes: dict[int, tuple[int, int, str]], reasons: dict[int, str], start: int) -> pa.Table:
    """The rows of one chunk with their outcome: files start..start+len(groups)-1 of the shard,
    one row per image key of each file (a file's codes repeated for each of its keys)."""
    rows = [row for group in groups for row in group]
    file_index = [start + offset for offset, group in enumerate(groups) for _ in group]
    img_tokens, widths, heights, modes, reason_column = [], [], [], [], []
    for index in file_index:
        if index in codes:
            img_tokens.append(codes[index])
            width, height, mode = sizes[index]
            widths.append(width)
            heights.append(height)
            modes.append(mode)
            reason_column.append(None)
        else:
            img_tokens.append(None)
            widths.append(None)
            heights.append(None)
            modes.append(None)
            reason_column.append(reasons[index])
    flat = [c for c in img_tokens if c is not None]
    values = pa.array(np.concatenate(flat).astype(np.int16) if flat else np.zeros(0, np.int16), pa.int16())
    offsets, position, validity = [0], 0, []
    for c in img_tokens:
        position += 0 if c is None else len(c)
        offsets.append(position)
        validity.append(c is not None)
    mask = pa.array([not v for v in validity], pa.bool_())
    token_lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values, mask=mask)
    return pa.table(
        {
            "img_path": pa.array([r.img_path for r in rows], pa.string()),
            "image_key": pa.array([r.image_key for r in rows], pa.string()),
            "credential": pa.array([r.credential for r in rows], pa.string()),
            "img_tokens": token_lists.cast(pa.list_(pa.int16())),
            "orig_width": pa.array(widths, pa.int32()),
            "orig_height": pa.array(heights, pa.int32()),
            "orig_mode": pa.array(modes, pa.string()),
            "reason": pa.array(reason_column, pa.string()),
        },
        schema=CHUNK_SCHEMA,
    )


# ----------------------------------------------------------------------------------------------
# The shard job
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSettings:
    """How one shard is tokenized (the command-line options of `medmax tokenize`)."""

    shard: int = 0
    num_shards: int = 1
    batch_size: int = 8
    workers: int = 1
    device: str = "cpu"
    precision: str = "fp32"
    chunk_size: int = 64
    max_pixels: int = DEFAULT_MAX_PIXELS
    keep_chunks: bool = False
    progress: bool = True
    credentialed_roots: tuple[str | Path, ...] = ()


@dataclass(frozen=True)
class ShardPlan:
    """What a shard's job is made of: its files, its chunks, which of them this rank computes and
    which of those are still to do (the others are reused from an earlier run)."""

    tokens_path: Path
    errors_path: Path
    chunk_dir: Path
    files: list[list[ImageRow]]  # the unit of work: one file, whatever number of keys it carries
    ranges: list[range]  # chunk c covers files ranges[c]
    base_params: dict[str, Any]
    mine: list[int]  # the chunks this rank computes
    pending: list[int]  # the chunks of `mine` without a complete chunk file
    credentialed_csv: bool  # some row of the whole CSV is credential = yes
    rank: int
    world_size: int

    def chunk_params(self, chunk: int) -> dict[str, Any]:
        """A chunk's identity, stored in its lineage params and compared on resume."""
        r = self.ranges[chunk]
        chunk_rows = [row for group in self.files[r.start : r.stop] for row in group]
        return {**self.base_params, "chunk": chunk, "chunk_rows": [r.start, r.stop], "rows_digest": rows_digest(chunk_rows)}

    @property
    def chunks(self) -> UnitFiles:
        return chunk_units(self.chunk_dir)

    @property
    def reused(self) -> int:
        return len(self.mine) - len(self.pending)


# Called with a chunk's number once its file is written (tests stop a run there, as a kill would).
AfterChunk = Callable[[int], None]


def tokenize_shard(
    input_csv: str | Path,
    output_dir: str | Path,
    ckpt_dir: str | Path,
    shard: int = 0,
    num_shards: int = 1,
    batch_size: int = 8,
    workers: int = 1,
    device: str = "cpu",
    precision: str = "fp32",
    chunk_size: int = 64,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    keep_chunks: bool = False,
    progress: bool = True,
    credentialed_roots: Sequence[str | Path] = (),
    after_chunk: AfterChunk | None = None,
) -> ShardResult:
    """Tokenize one shard of the CSV's images into DIR/shard-I-of-N.parquet and .errors.parquet.

    Under torchrun every rank calls this with the same arguments; rank 0 writes the outputs.
    Images under one of `credentialed_roots` are credential = yes whatever the CSV says.
    Raises OutputLockedError when another run holds this shard's lock.
    """
    settings = ShardSettings(
        shard=shard, num_shards=num_shards, batch_size=batch_size, workers=workers, device=device, precision=precision,
        chunk_size=chunk_size, max_pixels=max_pixels, keep_chunks=keep_chunks, progress=progress,
        credentialed_roots=tuple(credentialed_roots),
    )
    check_shard_arguments(shard, num_shards, batch_size, workers, chunk_size)
    ranks = ranks_from_env()  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK, core/ranks
    rank, world_size, local_rank = ranks.rank, ranks.world_size, ranks.local_rank
    # Rank 0 speaks for a torchrun job: the other ranks of the same job must not be refused.
    lock = hold_lock(shard_lock_path(output_dir, shard, num_shards), "medmax tokenize") if rank == 0 else nullcontext()
    with lock:
        all_rows = read_image_list(input_csv, settings.credentialed_roots)
        model = prepare_vqgan(ckpt_dir, device, precision, local_rank)
        plan = plan_shard(all_rows, output_dir, settings, model.encoder_fingerprint(), rank, world_size)
        written = encode_chunks(plan, model, settings, after_chunk)
        return finish_shard(plan, settings, input_csv, ckpt_dir, written)


def plan_shard(
    all_rows: Sequence[ImageRow], output_dir: str | Path, settings: ShardSettings, vqgan_fingerprint: str, rank: int, world_size: int,
) -> ShardPlan:
    """The shard's files and chunks, and which of this rank's chunks already have a complete file."""
    tokens_path, errors_path, chunk_dir = shard_paths(output_dir, settings.shard, settings.num_shards)
    files = group_by_file(shard_rows(all_rows, settings.shard, settings.num_shards))
    ranges = chunk_ranges(len(files), settings.chunk_size)
    base_params = {
        "shard": settings.shard,
        "num_shards": settings.num_shards,
        "sharding": SHARDING_RULE,
        "vqgan_fingerprint": vqgan_fingerprint,
        "precision": settings.precision,
        "device": settings.device,
        "batch_size": settings.batch_size,
        "max_pixels": settings.max_pixels,
    }
    # The credentialed roots are not params: what they change (a row's credential) is in each
    # chunk's rows_digest and in the data, and the roots' spelling alone should not re-encode.
    mine = rank_chunks(len(ranges), rank, world_size)
    plan = ShardPlan(
        tokens_path, errors_path, chunk_dir, files, ranges, base_params, mine, pending=[],
        credentialed_csv=any(r.credential == "yes" for r in all_rows), rank=rank, world_size=world_size,
    )
    pending = [c for c in mine if not plan.chunks.is_finished(c, plan.chunk_params(c))]
    return dataclasses.replace(plan, pending=pending)


def encode_chunks(plan: ShardPlan, model: Any, settings: ShardSettings, after_chunk: AfterChunk | None = None) -> int:
    """Encode the plan's pending chunks, writing each chunk file as soon as its files are done.

    Returns the number of chunk files written."""
    import torch
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    ranges, files = plan.ranges, plan.files
    dataset = ImageFileDataset([group[0] for group in files], max_pixels=settings.max_pixels)
    batches = [
        list(range(start, min(start + settings.batch_size, ranges[c].stop)))
        for c in plan.pending
        for start in range(ranges[c].start, ranges[c].stop, settings.batch_size)
    ]
    loader = DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=settings.workers,
        collate_fn=collate_decoded,
        pin_memory=settings.device == "cuda",
    )
    total = sum(len(ranges[c]) for c in plan.mine)
    done_rows = total - sum(len(ranges[c]) for c in plan.pending)
    bar = tqdm(
        total=total, initial=done_rows, unit="img", file=sys.stderr, disable=not settings.progress,
        desc=f"{shard_stem(settings.shard, settings.num_shards)}" + (f" rank {plan.rank}/{plan.world_size}" if plan.world_size > 1 else ""),
    )
    codes: dict[int, np.ndarray] = {}
    sizes: dict[int, tuple[int, int, str]] = {}
    reasons: dict[int, str] = {}
    pending_iter = iter(plan.pending)
    current = next(pending_iter, None)
    written = 0
    with torch.inference_mode():
        for batch in loader:
            if batch["pixels"] is not None:
                pixels = batch["pixels"].to(model.device, non_blocking=True)
                batch_codes = model.encode_codes(pixels).to("cpu").numpy()
                for index, c in zip(batch["good"], batch_codes):
                    codes[index] = c
                sizes.update(batch["sizes"])
            reasons.update(batch["reasons"])
            bar.update(len(batch["indices"]))
            # Chunks finish in order, since batches never straddle two chunks and arrive in order.
            while current is not None and all(i in codes or i in reasons for i in ranges[current]):
                r = ranges[current]
                table = chunk_table(files[r.start : r.stop], codes, sizes, reasons, r.start)
                plan.chunks.write(current, table, plan.chunk_params(current))
                for i in r:
                    codes.pop(i, None)
                    sizes.pop(i, None)
                    reasons.pop(i, None)
                written += 1
                if after_chunk is not None:
                    after_chunk(current)
                current = next(pending_iter, None)
    bar.close()
    if current is not None:
        raise RuntimeError(f"{plan.tokens_path}: chunk {current} did not complete (internal error)")
    return written


def finish_shard(plan: ShardPlan, settings: ShardSettings, input_csv: str | Path, ckpt_dir: str | Path, written: int) -> ShardResult:
    """Once every rank is done, rank 0 merges the chunk files into the shard's two artifacts and
    (without --keep-chunks) removes the chunk folder."""
    if plan.world_size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo", timeout=timedelta(hours=24))
        dist.barrier()
        if plan.rank != 0:
            dist.destroy_process_group()
            return ShardResult(plan.tokens_path, None, 0, 0, written, plan.reused)

    num_tokens, num_errors = merge_chunks(
        plan.chunks, len(plan.ranges), plan.chunk_params, plan.tokens_path, plan.errors_path, input_csv,
        [ckpt_dir, *settings.credentialed_roots], plan.base_params, credentialed_csv=plan.credentialed_csv,
    )
    if plan.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if not settings.keep_chunks:
        plan.chunks.remove()
    return ShardResult(plan.tokens_path, plan.errors_path, num_tokens, num_errors, written, plan.reused)


def merge_chunks(
    chunks: UnitFiles, num_chunks: int, params_of: Callable[[int], dict[str, Any]], tokens_path: Path, errors_path: Path, input_csv: str | Path,
    folder_inputs: Sequence[str | Path], params: dict[str, Any], credentialed_csv: bool,
) -> tuple[int, int]:
    """Write the shard's tokens and errors artifacts from its complete chunk files, in order."""
    missing = [c for c in range(num_chunks) if not chunks.is_finished(c, params_of(c))]
    if missing:
        raise ArtifactError(f"{chunks.folder}: chunks {missing[:10]} are missing or stale; cannot merge the shard (run it again)")
    # The checkpoint and the credentialed image roots, as folder identities (inspect recomputes them the same way).
    folders = [describe_input(folder) for folder in folder_inputs]
    csv_inputs = {"inputs": [], "credentialed_inputs": [input_csv]} if credentialed_csv else {"inputs": [input_csv], "credentialed_inputs": []}
    num_tokens = num_errors = 0
    # The tokens and the errors of a shard appear together or not at all.
    with ArtifactGroup() as outputs, outputs.writer(
        tokens_path, TOKENS_SCHEMA, artifact=TOKENS_ARTIFACT, inputs=[*csv_inputs["inputs"], *folders],
        credentialed_inputs=csv_inputs["credentialed_inputs"], params=params,
    ) as tokens_writer, outputs.writer(
        errors_path, ERRORS_SCHEMA, artifact=ERRORS_ARTIFACT, inputs=[*csv_inputs["inputs"], *folders],
        credentialed_inputs=csv_inputs["credentialed_inputs"], params=params,
    ) as errors_writer:
        for c in range(num_chunks):
            table = chunks.read(c)
            ok = pc.is_null(table.column("reason"))
            good = table.filter(ok).select(TOKENS_SCHEMA.names).cast(TOKENS_SCHEMA)
            bad = table.filter(pc.invert(ok)).select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA)
            check_token_values(good, chunks.path(c))
            tokens_writer.write(good)
            errors_writer.write(bad)
            num_tokens += good.num_rows
            num_errors += bad.num_rows
    return num_tokens, num_errors


def check_token_values(table: pa.Table, source: str | Path) -> None:
    """Every row has exactly 1024 codes in 0..8191."""
    if table.num_rows == 0:
        return
    lengths = pc.list_value_length(table.column("img_tokens")).to_numpy(zero_copy_only=False)
    bad_rows = np.flatnonzero(lengths != CODES_PER_IMAGE)
    if len(bad_rows):
        raise ArtifactError(f"{source}: row {int(bad_rows[0])} has {int(lengths[bad_rows[0]])} codes, expected {CODES_PER_IMAGE}")
    flat = pc.list_flatten(table.column("img_tokens")).to_numpy(zero_copy_only=False)
    if flat.size and (flat.min() < 0 or flat.max() >= NUM_IMAGE_CODES):
        raise ArtifactError(f"{source}: codes outside 0..{NUM_IMAGE_CODES - 1}")


# ----------------------------------------------------------------------------------------------
# Gather
# ----------------------------------------------------------------------------------------------


def _merge_sorted(sources: list[Iterator[pa.RecordBatch]], schema: pa.Schema, block_rows: int = 8192) -> Iterator[pa.Table]:
    """k-way merge of batch streams each sorted by img_path, as tables of about block_rows rows."""

    def keyed(stream_index: int, stream: Iterator[pa.RecordBatch]) -> Iterator[tuple[str, int, int, pa.RecordBatch]]:
        for batch in stream:
            paths = batch.column(batch.schema.get_field_index("img_path")).to_pylist()
            for row, path in enumerate(paths):
                yield path, stream_index, row, batch

    pieces: list[pa.RecordBatch] = []
    run: tuple[pa.RecordBatch, int, int] | None = None  # (batch, start, stop)
    count = 0
    for _, _, row, batch in heapq.merge(*(keyed(i, s) for i, s in enumerate(sources)), key=lambda t: (t[0], t[1])):
        if run is not None and run[0] is batch and run[2] == row:
            run = (batch, run[1], row + 1)
        else:
            if run is not None:
                pieces.append(run[0].slice(run[1], run[2] - run[1]))
            run = (batch, row, row + 1)
        count += 1
        if count >= block_rows:
            pieces.append(run[0].slice(run[1], run[2] - run[1]))
            run = None
            yield pa.Table.from_batches(pieces, schema=schema)
            pieces, count = [], 0
    if run is not None:
        pieces.append(run[0].slice(run[1], run[2] - run[1]))
    if pieces:
        yield pa.Table.from_batches(pieces, schema=schema)


def gather_tokens(shards_dir: str | Path, num_shards: int, output: str | Path, errors_output: str | Path) -> tuple[int, int]:
    """Merge DIR/shard-I-of-N{.parquet,.errors.parquet} for I in 0..N-1, sorted by img_path.

    Checks each shard is present, of the right artifact and shard number, made with one VQGAN
    and precision, and holds only images that hash to it. Returns (token rows, error rows).
    """
    if num_shards < 1:
        raise TokenizeInputError(f"--num-shards must be at least 1, got {num_shards}")
    shards_dir = Path(shards_dir)
    pairs = [shard_paths(shards_dir, i, num_shards)[:2] for i in range(num_shards)]
    missing = [str(p) for pair in pairs for p in pair if not p.is_file()]
    if missing:
        raise ArtifactError(f"gather-tokens: {len(missing)} shard files missing: {', '.join(missing[:10])}")
    consistent: dict[str, Any] = {}
    for shard, (tokens_path, errors_path) in enumerate(pairs):
        for path, artifact in ((tokens_path, TOKENS_ARTIFACT), (errors_path, ERRORS_ARTIFACT)):
            meta = read_meta(path)
            check_meta(meta, artifact)
            params = meta.lineage.get("params", {})
            if params.get("shard") != shard or params.get("num_shards") != num_shards:
                raise ArtifactError(
                    f"{path}: lineage says shard {params.get('shard')} of {params.get('num_shards')}, expected {shard} of {num_shards}"
                )
            for key in ("vqgan_fingerprint", "precision", "sharding"):
                consistent.setdefault(key, (params.get(key), path))
                if params.get(key) != consistent[key][0]:
                    raise ArtifactError(
                        f"{path}: {key} {params.get(key)!r} differs from {consistent[key][0]!r} in {consistent[key][1]}"
                    )
            listed = read_artifact(path, artifact, columns=["img_path", "image_key"])
            paths = listed.column("img_path").to_pylist()
            wrong = next((p for p in paths if shard_of(p, num_shards) != shard), None)
            if wrong is not None:
                raise ArtifactError(f"{path}: img_path {wrong!r} belongs to shard {shard_of(wrong, num_shards)}, not {shard}")
            # A file may carry several image keys; each (img_path, image_key) appears once.
            order = [row_order(ImageRow(p, k, "")) for p, k in zip(paths, listed.column("image_key").to_pylist())]
            if order != sorted(order) or len(set(order)) != len(order):
                raise ArtifactError(f"{path}: rows are not sorted by distinct (img_path, image_key)")
    params = {
        "num_shards": num_shards,
        "sharding": consistent["sharding"][0],
        "vqgan_fingerprint": consistent["vqgan_fingerprint"][0],
        "precision": consistent["precision"][0],
        "order": "img_path ascending",
    }
    shard_token_files = [p[0] for p in pairs]
    shard_error_files = [p[1] for p in pairs]
    all_inputs = [*shard_token_files, *shard_error_files]
    with ArtifactGroup() as outputs:  # the gathered tokens and errors appear together or not at all
        with outputs.writer(output, TOKENS_SCHEMA, artifact=TOKENS_ARTIFACT, inputs=all_inputs, params=params) as writer:
            streams = [iter_artifact_batches(p, TOKENS_ARTIFACT, batch_size=4096) for p in shard_token_files]
            for table in _merge_sorted(streams, TOKENS_SCHEMA):
                writer.write(table.cast(TOKENS_SCHEMA))
        errors = pa.concat_tables([read_artifact(p, ERRORS_ARTIFACT).cast(ERRORS_SCHEMA) for p in shard_error_files])
        errors = errors.sort_by([("img_path", "ascending"), ("image_key", "ascending")])
        outputs.write_artifact(errors, errors_output, artifact=ERRORS_ARTIFACT, inputs=all_inputs, params=params)
    assert writer.meta is not None
    return writer.meta.num_rows, errors.num_rows


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def count_high_bit_depth(tokens_path: str | Path) -> int:
    """Distinct image files of a tokens artifact that were high bit depth grayscale (16-bit, 32-bit
    or float): PIL's convert clipped them to 0..255, as the original preprocessing did."""
    table = read_artifact(tokens_path, TOKENS_ARTIFACT, columns=["img_path", "orig_mode"])
    modes = table.column("orig_mode").to_pylist()
    return len({p for p, mode in zip(table.column("img_path").to_pylist(), modes) if mode in HIGH_BIT_DEPTH_MODES})


def high_bit_depth_line(count: int) -> str:
    """The summary line for count_high_bit_depth."""
    return (f"  {count} high bit depth grayscale image(s) (16-bit, 32-bit or float): pixel values clipped "
            "to 0..255, as the original preprocessing (PIL's convert) did")


@dataclass(frozen=True)
class TokenizeConfig:
    """tokenize's settings, the one source of its command line and of the tokenize_shard rule's
    options (the config.yaml `tokenize:` keys; tests/test_stage_settings.py checks the schema
    against it). The shard's coordinates (--shard, --num-shards) are the rule's, not settings.
    identity: the setting is part of each chunk's params (a resumed shard reuses only equal chunks)."""

    batch_size: int = setting(8, help="images per VQGAN batch", key="batch_size", identity=True, minimum=1)
    workers: int = setting(1, help="DataLoader worker processes decoding images (0: in the main process)", key="workers", minimum=0)
    device: str = setting("cpu", help="where the VQGAN runs", key="device", identity=True, choices=DEVICES)
    precision: str = setting("fp32", help="fp32 is exact and reproducible; bf16/tf32 are opt-in", key="precision",
                             identity=True, choices=PRECISIONS)
    chunk_size: int = setting(64, help="images per resumable chunk file", key="chunk_size", identity=True, minimum=1)
    max_pixels: int = setting(DEFAULT_MAX_PIXELS, help="refuse images (and resized images) above this many pixels",
                              key="max_pixels", identity=True, minimum=1)
    keep_chunks: bool = setting(False, help="keep the chunk files after the shard is written", key="keep_chunks")
    progress: bool = setting(True, help="a tqdm progress bar (--no-progress: none)")


def tokenize_config_from_args(args: argparse.Namespace) -> TokenizeConfig:
    check_shard_arguments(args.shard, args.num_shards, args.batch_size, args.workers, args.chunk_size)  # its messages first
    return checked_settings(TokenizeConfig, values_from_args(TokenizeConfig, args), TokenizeInputError)


def workflow_arguments(section: Mapping[str, Any]) -> list[str]:
    """The tokenize options for the config.yaml `tokenize:` SECTION (the tokenize_shard rule passes these)."""
    return workflow_arguments_for(TokenizeConfig, section)


def add_tokenize_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, type=Path, help="CSV with an img_path column (image_key, credential optional)")
    parser.add_argument("--output", required=True, type=Path, help="folder for shard-I-of-N.parquet, .errors.parquet and .chunks/")
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint folder: original (tokenizer/vqgan.yaml + vqgan.ckpt) or HF Chameleon")
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--credentialed-root", action="append", default=[], type=Path, metavar="DIR",
                        help="a credentialed image root: images whose file lies under it are credential = yes "
                        "whatever the CSV says; repeatable")
    add_setting_arguments(parser, TokenizeConfig)


def run_tokenize(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    config = tokenize_config_from_args(args)
    result = tokenize_shard(
        args.input, args.output, args.ckpt, shard=args.shard, num_shards=args.num_shards, batch_size=config.batch_size,
        workers=config.workers, device=config.device, precision=config.precision, chunk_size=config.chunk_size,
        max_pixels=config.max_pixels, keep_chunks=config.keep_chunks, progress=config.progress,
        credentialed_roots=args.credentialed_root,
    )
    if result.errors_path is not None:
        elapsed = time.perf_counter() - started
        print(
            f"{result.tokens_path}: {result.num_tokens} images tokenized, {result.num_errors} errors "
            f"({result.errors_path}); {result.chunks_done} chunks computed, {result.chunks_reused} reused; {elapsed:.1f}s"
        )
        print(high_bit_depth_line(count_high_bit_depth(result.tokens_path)))
    return 0


def add_gather_tokens_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", required=True, type=Path, help="folder holding shard-I-of-N.parquet files")
    parser.add_argument("--num-shards", required=True, type=int)
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--errors", required=True, type=Path)


def run_gather_tokens(args: argparse.Namespace) -> int:
    tokens, errors = gather_tokens(args.shards, args.num_shards, args.output, args.errors)
    print(f"{args.output}: {tokens} images; {args.errors}: {errors} errors")
    print(high_bit_depth_line(count_high_bit_depth(args.output)))
    return 0
