"""The image blocks assembly works with, by image key: those credentialed rows are filled from
(stage 3's blocks and the image problems of stages 1 and 2, for the configured credentialed
sources), and the re-derived blocks of public images (keys "public:<image_path>", present when
collect ran with images.include_public), which public rows' published tokens are compared with."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.artifacts import check_meta, iter_artifact_batches, read_artifact, read_meta
from medmax_pipeline.core.image_keys import PUBLIC_ROOT_NAME, CredentialedSource
from medmax_pipeline.core.sequences import block_problems


@dataclass
class ImageLookup:
    """Image blocks and image problems of the credentialed sources, by image key.

    A block is kept as its 1024 VQGAN codes (0..8191) in one uint16 row of `codes`, row index[key]:
    half the memory of int32 ids, and the frame 8197 ... 8196 and the +4 offset are added back by
    block(), so every block handed out is valid by construction."""

    index: dict[str, int] = field(default_factory=dict)  # credentialed image key -> row of codes
    codes: np.ndarray = field(default_factory=lambda: np.zeros((0, C.CODES_PER_IMAGE), np.uint16))
    unreadable: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    public_index: dict[str, int] = field(default_factory=dict)  # "public:<image_path>" -> row of codes
    # codes_digest of every credentialed block: a public row carrying one of them is refused.
    credentialed_digests: frozenset[bytes] = frozenset()

    def block(self, key: str) -> np.ndarray:
        """The 1026-id block (int32) of a key in `index`."""
        out = np.empty(C.IMAGE_BLOCK_LEN, np.int32)
        out[0], out[-1] = C.BEGIN_IMAGE_ID, C.END_IMAGE_ID
        np.add(self.codes[self.index[key]], C.IMAGE_CODE_OFFSET, out=out[1:-1], dtype=np.int32)
        return out


class ImageInputError(ValueError):
    """An image input of assembly lacks a column it needs (renamed, or another file)."""


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _is_id_list(kind: pa.DataType) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and pa.types.is_integer(kind.value_type)


# The columns assembly reads from each image input, and what each must hold.
REQUIRED_COLUMNS: dict[str, dict[str, tuple[str, Callable[[pa.DataType], bool]]]] = {
    "image_blocks": {"image_key": ("text", _is_text), "block": ("a list of integer ids", _is_id_list)},
    "image_token_errors": {"image_key": ("text", _is_text), "reason": ("text", _is_text)},
    "image_path_problems": {"image_key": ("text", _is_text), "reason": ("text", _is_text)},
}


def check_columns(path: Path, artifact: str) -> None:
    """Refuse `path` unless it has the columns assembly reads from an `artifact` file, with the
    right types (pyarrow would silently skip a missing column and fail later without a name)."""
    check_meta(read_meta(path), artifact)  # another artifact altogether: its own message first
    schema = pq.read_schema(path)
    for name, (what, accepts) in REQUIRED_COLUMNS[artifact].items():
        if name not in schema.names:
            raise ImageInputError(f"{path}: the {artifact} file has no column {name!r} (its columns: {', '.join(schema.names)})")
        if not accepts(schema.field(name).type):
            raise ImageInputError(f"{path}: column {name!r} of the {artifact} file is {schema.field(name).type}, expected {what}")


def codes_digest(codes: np.ndarray) -> bytes:
    """A digest of one image's 1024 codes (any integer dtype): equal codes, equal digest."""
    return hashlib.blake2b(np.ascontiguousarray(codes, dtype="<u2").tobytes(), digest_size=16).digest()


def load_image_lookup(
    image_blocks: Path | None, path_problems: Path | None, token_errors: Path | None, sources: Mapping[str, CredentialedSource]
) -> ImageLookup:
    """Keep only keys of the configured credentialed sources and public images (2 KB of codes per
    image): memory is bounded by the images, however many rows there are. Public blocks exist only
    where collect listed public images (images.include_public)."""
    lookup = ImageLookup()
    public_prefix = f"{PUBLIC_ROOT_NAME}:"
    prefixes = tuple(f"{s}:" for s in sources) + (public_prefix,)

    def wanted(keys: pa.Array) -> pa.Array:
        mask = pc.starts_with(keys, prefixes[0])
        for prefix in prefixes[1:]:
            mask = pc.or_(mask, pc.starts_with(keys, prefix))
        return pc.fill_null(mask, False)

    for path, artifact in ((image_blocks, "image_blocks"), (token_errors, "image_token_errors"), (path_problems, "image_path_problems")):
        if path is not None:
            check_columns(path, artifact)
    if image_blocks is not None:
        # Room for every block of the file: np.empty only takes memory for the rows written, and
        # filling one preallocated array never holds two copies of the blocks (as concatenating would).
        codes = np.empty((read_meta(image_blocks).num_rows, C.CODES_PER_IMAGE), np.uint16)
        n_codes = 0
        # Small batches: a batch is held as int32 ids while it is checked.
        for batch in iter_artifact_batches(image_blocks, "image_blocks", batch_size=8192, columns=["image_key", "block"]):
            batch = batch.filter(wanted(batch.column(0)))
            if batch.num_rows == 0:
                continue
            lengths = pc.fill_null(pc.list_value_length(batch.column(1)), 0).to_numpy(zero_copy_only=False)
            good = lengths == C.IMAGE_BLOCK_LEN
            keys = batch.column(0).to_pylist()
            flat = batch.column(1).filter(pa.array(good)).flatten().to_numpy(zero_copy_only=False)
            blocks = flat.reshape(-1, C.IMAGE_BLOCK_LEN)
            reasons = iter(block_problems(blocks))
            rows = iter(range(len(blocks)))
            for key, ok in zip(keys, good.tolist()):
                if not ok:
                    lookup.unreadable.setdefault(key, f"image block has the wrong length (expected {C.IMAGE_BLOCK_LEN} ids)")
                    continue
                reason, row = next(reasons), next(rows)
                if reason is not None:
                    lookup.unreadable.setdefault(key, reason)
                    continue
                index = lookup.public_index if key.startswith(public_prefix) else lookup.index
                if key not in index:  # first one wins: deterministic
                    codes[n_codes] = blocks[row, 1:-1] - C.IMAGE_CODE_OFFSET  # checked: 0..8191 fits uint16
                    index[key] = n_codes
                    n_codes += 1
        lookup.codes = codes[:n_codes]
        lookup.credentialed_digests = frozenset(codes_digest(lookup.codes[i]) for i in lookup.index.values())
    if token_errors is not None:
        table = read_artifact(token_errors, "image_token_errors", columns=["image_key", "reason"])
        table = table.filter(wanted(table.column("image_key")))
        for key, reason in zip(table.column("image_key").to_pylist(), table.column("reason").to_pylist()):
            lookup.unreadable.setdefault(key, f"image unreadable: {reason}")
    if path_problems is not None:
        table = read_artifact(path_problems, "image_path_problems", columns=["image_key", "reason"])
        table = table.filter(wanted(table.column("image_key")))
        for key, reason in zip(table.column("image_key").to_pylist(), table.column("reason").to_pylist()):
            lookup.missing.setdefault(key, f"image missing: {reason}")
    return lookup
