"""The pure sequence logic of assembly, on flat token lists (values + offsets, as Arrow holds a
list column): checking published sequences, where to truncate, taking prefixes and rows.

Everything here is vectorised over a whole batch: the published train split is 1.47M rows of
~1.3k ids. The one-block validator is core.sequences.check_image_block; check_published_tokens
checks blocks in place, inside whole sequences, and must accept and refuse the same blocks
(tests/test_assemble.py pins this).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from medmax_pipeline.core import constants as C

PUBLISHED_MAX_LENGTH = 2048  # the public release truncated at 2048 ids (MEDMAX-FACTS.md)


def _rows_of(offsets: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Row of each flat value position, for list offsets. Only for the few positions asked about:
    a row index for every value (np.repeat) cost as much as the checks that read it."""
    return np.searchsorted(offsets, positions, side="right") - 1


def check_published_tokens(
    values: np.ndarray,
    offsets: np.ndarray,
    n_images: np.ndarray,
    published_max_length: int = PUBLISHED_MAX_LENGTH,
) -> tuple[list[str | None], np.ndarray]:
    """Check published sequences (flat `values`, list `offsets`) against the contract.

    Returns (reason or None per row, publisher-truncated mask). A row passes when every id is in
    [0, 65536), it starts with 0, ends with 2 (or is exactly `published_max_length` ids long:
    truncated by the publisher), holds no unreplaced 8711, every 8197 opens a block of 1024 code
    ids in 4..8195 closed by 8196 (only the last block of a publisher-truncated row may be cut
    short), no image id lies outside a block, and it has as many blocks as its text has <image>
    (at most as many when truncated).
    """
    values = np.asarray(values)
    offsets = np.asarray(offsets, dtype=np.int64)
    n = len(offsets) - 1
    lengths = np.diff(offsets)
    reasons: list[str | None] = [None] * n

    def flag(mask: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(mask).tolist():
            if reasons[i] is None:
                reasons[i] = reason

    nonempty = lengths > 0
    first = np.where(nonempty, values[np.minimum(offsets[:-1], max(len(values) - 1, 0))] if len(values) else -1, -1)
    last = np.where(nonempty, values[np.maximum(offsets[1:] - 1, 0)] if len(values) else -1, -1)
    pub_truncated = nonempty & (last != C.EOS_ID) & (lengths == published_max_length)

    flag(~nonempty, "published tokens are empty")
    out_of_range = (values < 0) | (values >= C.VOCAB_SIZE)
    flag(np.bincount(_rows_of(offsets, np.flatnonzero(out_of_range)), minlength=n) > 0, f"published tokens have an id outside [0, {C.VOCAB_SIZE})")
    flag(nonempty & (first != C.BOS_ID), f"published tokens do not start with bos {C.BOS_ID}")
    flag(nonempty & (last != C.EOS_ID) & ~pub_truncated, f"published tokens do not end with eos {C.EOS_ID}")
    flag(np.bincount(_rows_of(offsets, np.flatnonzero(values == C.IMAGE_PLACEHOLDER_ID)), minlength=n) > 0, "published tokens hold an unreplaced <image> (8711)")

    bad_block, begin_rows = _malformed_block_rows(values, offsets, pub_truncated)
    flag(bad_block, "published tokens have a malformed image block (expected 8197, 1024 ids in 4..8195, 8196)")

    n_blocks = np.bincount(begin_rows, minlength=n)
    n_images = np.asarray(n_images)
    mismatch = np.where(pub_truncated, n_blocks > n_images, n_blocks != n_images)
    for i in np.flatnonzero(mismatch).tolist():
        if reasons[i] is None:
            reasons[i] = f"published tokens have {n_blocks[i]} image block(s), text has {n_images[i]} <image>"
    return reasons, pub_truncated


def _malformed_block_rows(values: np.ndarray, offsets: np.ndarray, pub_truncated: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows with a malformed image block (an 8197 not followed by 1024 codes and 8196, a non-code
    inside a block, an image id outside one; a block cut short is allowed only at the end of a
    publisher-truncated row), and the row of every 8197."""
    # Mark the inside of every block opened by 8197 with a difference array.
    n = len(offsets) - 1
    begins = np.flatnonzero(values == C.BEGIN_IMAGE_ID)
    begin_rows = _rows_of(offsets, begins)
    row_ends = offsets[1:][begin_rows]
    ends = begins + C.IMAGE_BLOCK_LEN - 1
    complete = ends < row_ends
    closed = np.zeros(len(begins), dtype=bool)
    closed[complete] = values[ends[complete]] == C.END_IMAGE_ID
    diff = np.zeros(len(values) + 1, dtype=np.int32)
    np.add.at(diff, begins + 1, 1)
    np.add.at(diff, np.minimum(ends, row_ends), -1)
    inside = np.cumsum(diff[:-1]) > 0
    is_code = (values >= C.FIRST_IMAGE_TOKEN_ID) & (values <= C.LAST_IMAGE_TOKEN_ID)
    frame = np.zeros(len(values), dtype=bool)
    frame[begins] = True
    frame[ends[closed]] = True
    is_image_id = is_code | (values == C.BEGIN_IMAGE_ID) | (values == C.END_IMAGE_ID)
    bad_position = (inside & ~is_code) | (~inside & is_image_id & ~frame)
    bad_block = np.bincount(_rows_of(offsets, np.flatnonzero(bad_position)), minlength=n) > 0
    unclosed = complete & ~closed
    bad_block |= np.bincount(begin_rows[unclosed], minlength=n) > 0
    partial_rows = begin_rows[~complete]
    # A block cut short is only allowed at the end of a publisher-truncated row.
    bad_block |= (np.bincount(partial_rows, minlength=n) > 0) & ~pub_truncated
    return bad_block, begin_rows


def truncation_lengths(values: np.ndarray, offsets: np.ndarray, max_length: int) -> np.ndarray:
    """Kept length of each sequence: min(length, max_length), moved back to the begin of an image
    block that the cut (or the sequence's own end) would split."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    cut = np.minimum(lengths, max_length)
    begins = np.flatnonzero(np.asarray(values) == C.BEGIN_IMAGE_ID)
    if begins.size:
        rows = _rows_of(offsets, begins)
        position = begins - offsets[:-1][rows]
        split = (position < cut[rows]) & (position + C.IMAGE_BLOCK_LEN > cut[rows])
        np.minimum.at(cut, rows[split], position[split])
    return cut


def take_prefixes(values: np.ndarray, offsets: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The first keep[i] values of each list: (flat values, offsets)."""
    offsets = np.asarray(offsets, dtype=np.int64)
    keep = np.asarray(keep, dtype=np.int64)
    new_offsets = np.zeros(len(keep) + 1, dtype=np.int64)
    np.cumsum(keep, out=new_offsets[1:])
    if np.array_equal(keep, np.diff(offsets)):
        return np.asarray(values), offsets
    index = np.arange(new_offsets[-1]) + np.repeat(offsets[:-1] - new_offsets[:-1], keep)
    return np.asarray(values)[index], new_offsets


def select_lists(values: np.ndarray, offsets: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lists `rows` (increasing) of flat `values` / `offsets`: (values, offsets) of the selection.
    Copies runs of consecutive rows as slices: memcpy speed, no index array per value."""
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)[rows]
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    if len(rows) == 0:
        return values[:0], new_offsets
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    firsts = rows[np.concatenate([[0], breaks])]
    lasts = rows[np.concatenate([breaks - 1, [len(rows) - 1]])]
    bounds = offsets.tolist()
    return np.concatenate([values[bounds[a] : bounds[b + 1]] for a, b in zip(firsts.tolist(), lasts.tolist())]), new_offsets


def list_array(values: np.ndarray, offsets: np.ndarray) -> pa.ListArray:
    """An Arrow list<int32> column of flat `values` / `offsets`."""
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(np.asarray(values, dtype=np.int32)))
