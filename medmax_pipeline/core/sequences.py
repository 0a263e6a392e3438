"""What a MedMax token sequence is: the image block, its one check, and a row's sequence.

An image inside a sequence is [8197] + [code + 4 for each of its 1024 VQGAN codes] + [8196]
(1026 ids, MEDMAX-FACTS.md); a row is [0] + BPE(text) + [2] with every <image> (8711) replaced by
its image block. Every stage that builds, reads or checks blocks uses these functions: vocab
(codes -> blocks), assembly (rows, and the blocks before they enter a row), generation (prompt
blocks) and the demo. `block_problems` is the one block validator; `check_image_block` is it for
a single block.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from medmax_pipeline.core import constants as C


class ImageBlockError(ValueError):
    """Image codes cannot become a valid image block; the message names the image."""


def image_blocks_array(codes: np.ndarray) -> np.ndarray:
    """(n, 1024) codes -> (n, 1026) int32 blocks. The caller has checked shape and range."""
    n = codes.shape[0]
    blocks = np.empty((n, C.IMAGE_BLOCK_LEN), dtype=np.int32)
    blocks[:, 0] = C.BEGIN_IMAGE_ID
    blocks[:, 1:-1] = codes + C.IMAGE_CODE_OFFSET
    blocks[:, -1] = C.END_IMAGE_ID
    return blocks


def code_problem(codes: Sequence[int] | np.ndarray) -> str | None:
    """Why a code list is not one image's 1024 VQGAN codes, or None."""
    arr = np.asarray(codes)
    if arr.ndim != 1 or arr.shape[0] != C.CODES_PER_IMAGE:
        return f"{arr.size} codes, expected {C.CODES_PER_IMAGE}"
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        return f"codes of type {arr.dtype}, expected integers"
    bad = np.flatnonzero((arr < 0) | (arr >= C.NUM_IMAGE_CODES))
    if bad.size:
        i = int(bad[0])
        return f"code {int(arr[i])} at position {i} outside [0, {C.NUM_IMAGE_CODES - 1}] ({bad.size} such code(s))"
    return None


def image_block(codes: Sequence[int] | np.ndarray) -> list[int]:
    """[8197] + [c + 4 for c in codes] + [8196]; raises ImageBlockError for a malformed code list."""
    problem = code_problem(codes)
    if problem is not None:
        raise ImageBlockError(problem)
    return image_blocks_array(np.asarray(codes, dtype=np.int64)[None, :])[0].tolist()


def _block_problem(block: np.ndarray) -> str | None:
    """Why one block of the right length is not well formed, or None."""
    if block[0] != C.BEGIN_IMAGE_ID:
        return f"block starts with id {int(block[0])}, expected {C.BEGIN_IMAGE_ID}"
    if block[-1] != C.END_IMAGE_ID:
        return f"block ends with id {int(block[-1])}, expected {C.END_IMAGE_ID}"
    inner = block[1:-1]
    bad = np.flatnonzero((inner < C.FIRST_IMAGE_TOKEN_ID) | (inner > C.LAST_IMAGE_TOKEN_ID))
    if bad.size:
        i = int(bad[0])
        return (f"id {int(inner[i])} at block position {i + 1} is not an image token "
                f"[{C.FIRST_IMAGE_TOKEN_ID}, {C.LAST_IMAGE_TOKEN_ID}] ({bad.size} such id(s))")
    return None


def block_problems(blocks: np.ndarray) -> list[str | None]:
    """The block check for every row of an (n, 1026) array: why each is not a well-formed block
    (begin, 1024 image ids, end), or None. Vectorised; only failing rows are described."""
    framed = (blocks[:, 0] == C.BEGIN_IMAGE_ID) & (blocks[:, -1] == C.END_IMAGE_ID)
    codes = blocks[:, 1:-1]
    in_range = (codes.min(axis=1) >= C.FIRST_IMAGE_TOKEN_ID) & (codes.max(axis=1) <= C.LAST_IMAGE_TOKEN_ID)
    good = (framed & in_range).tolist()
    return [None if ok else _block_problem(blocks[i]) for i, ok in enumerate(good)]


def check_image_block(ids: Sequence[int] | np.ndarray) -> str | None:
    """Why `ids` is not one well-formed image block (begin, 1024 image ids, end), or None."""
    arr = np.asarray(ids)
    if arr.ndim != 1:
        return f"expected a flat id sequence, found shape {arr.shape}"
    if arr.shape[0] != C.IMAGE_BLOCK_LEN:
        return f"block of {arr.shape[0]} ids, expected {C.IMAGE_BLOCK_LEN}"
    return block_problems(arr[None, :])[0]


def find_image_blocks(sequence: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each image block of a token sequence, so that sequence[start:end] is the block.

    A block starts at each begin id (8197) and ends just after the next end id (8196). When another
    begin id or the end of the sequence comes first (a block cut by truncation, a missing end id),
    the span stops there; check_image_block on the span then says what is wrong. End ids outside
    any block are not spans: see stray_end_ids.
    """
    arr = np.asarray(sequence)
    n = arr.shape[0]
    begins = np.flatnonzero(arr == C.BEGIN_IMAGE_ID)
    ends = np.flatnonzero(arr == C.END_IMAGE_ID)
    spans: list[tuple[int, int]] = []
    for k, start in enumerate(begins.tolist()):
        next_begin = int(begins[k + 1]) if k + 1 < begins.size else n
        j = int(np.searchsorted(ends, start))
        end = int(ends[j]) + 1 if j < ends.size else n + 1
        spans.append((start, min(end, next_begin, n)))
    return spans


def stray_end_ids(sequence: Sequence[int] | np.ndarray) -> list[int]:
    """Positions of end ids (8196) that close no image block."""
    arr = np.asarray(sequence)
    inside = np.zeros(arr.shape[0], dtype=bool)
    for start, end in find_image_blocks(arr):
        inside[start:end] = True
    return [int(i) for i in np.flatnonzero((arr == C.END_IMAGE_ID) & ~inside)]


def build_sequence(text_ids: Sequence[int], block: Sequence[int] | np.ndarray | None) -> np.ndarray:
    """[0] + text ids with every 8711 replaced by `block` + [2] (int32)."""
    ids = np.asarray(text_ids, dtype=np.int32)
    places = np.flatnonzero(ids == C.IMAGE_PLACEHOLDER_ID)
    if places.size and block is None:
        raise ValueError("text has <image> but the row has no image block")
    pieces: list[np.ndarray] = [np.array([C.BOS_ID], np.int32)]
    start = 0
    for place in places.tolist():
        pieces.append(ids[start:place])
        pieces.append(np.asarray(block, dtype=np.int32))
        start = place + 1
    pieces.append(ids[start:])
    pieces.append(np.array([C.EOS_ID], np.int32))
    return np.concatenate(pieces)
