"""Reading one line-delimited file (a MedMax train.jsonl) in several processes, in file order.

    for batch, extra in map_line_ranges(path, lines_per_range, workers, work, ...):

cuts the file into byte ranges of `lines_per_range` non-blank lines (plan_line_ranges), runs
`work(byte_range) -> (record batch, picklable extra)` on each range in spawned worker processes,
and yields the results in file order, as a serial reader would. What a range becomes is the
caller's `work` (a top-level function, or a functools.partial of one, so that it pickles); per
worker state (a tokenizer, a lookup table) is built once per worker by `initializer(*initargs)`.

The ranges end exactly where rows.read_row_batches ends a batch of the same size, so that
rows.read_jsonl_range(path, split, *byte_range) is one batch of the serial reader: a stage that
streams rows writes the same outputs with or without workers. The planner reads the file once,
sequentially, in a thread, and hashes it on the way (the fingerprint of describe_input), so the
file is not read a second time for its lineage.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import shutil
import threading
import time
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import pyarrow as pa

from medmax_pipeline.core import termination
from medmax_pipeline.core.artifacts import FINGERPRINT_PREFIX, new_hash


class ByteRange(NamedTuple):
    """Bytes [start, end) of a file; `first_line` is the 1-based number of the line at `start`."""

    start: int
    end: int
    first_line: int


_BLANK_BYTES = frozenset(b" \t\r\x0b\x0c")  # bytes.strip()'s whitespace, less the newline itself


def plan_line_ranges(
    path: str | Path, lines_per_range: int, on_block: Callable[[bytes], Any] | None = None, block_size: int = 1 << 24
) -> Iterator[ByteRange]:
    """The byte ranges of each `lines_per_range` non-blank lines (a line is blank when
    bytes.strip() empties it, as for the serial reader), in file order. Every range ends just after
    a newline (or at the end of the file). Reads the file once, sequentially; `on_block` sees every
    block read (to hash the file in this same pass)."""
    if lines_per_range < 1:
        raise ValueError(f"lines_per_range {lines_per_range}: expected at least 1")
    range_start, range_line = 0, 1  # where the current range begins
    line_no = 1  # number of the line being scanned
    n_lines = 0  # non-blank lines in the current range
    nonblank = False  # the line being scanned has a non-whitespace byte so far
    offset = 0  # file offset of block[0]
    with open(path, "rb") as f:
        while block := f.read(block_size):
            if on_block is not None:
                on_block(block)
            pos = 0
            while True:
                newline = block.find(b"\n", pos)
                stop = len(block) if newline < 0 else newline
                if not nonblank and stop > pos:
                    # Usually decided by the first byte ("{"); a line only of whitespace is blank.
                    nonblank = block[pos] not in _BLANK_BYTES or not block[pos:stop].isspace()
                if newline < 0:
                    break
                n_lines += nonblank
                nonblank = False
                line_no += 1
                pos = newline + 1
                if n_lines == lines_per_range:
                    yield ByteRange(range_start, offset + pos, range_line)
                    range_start, range_line, n_lines = offset + pos, line_no, 0
            offset += len(block)
    n_lines += nonblank  # a last line without a newline
    if n_lines:
        yield ByteRange(range_start, offset, range_line)


def default_workers(limit: int = 4) -> int:
    """One worker per core this process may run on, up to `limit`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(limit, cores))


def shared_scratch_dir(kind: str) -> Path:
    """A new folder medmax-KIND-HOST~PID~RANDOM in /dev/shm where there is one (tmpfs: what passes
    between processes never touches a disk), else in the temp folder. The caller removes it; if
    the process is killed first, a later run removes it (termination.sweep_stale_scratch)."""
    return termination.make_scratch_dir(kind)


def prefetch(iterator: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Run `iterator` up to `depth` items ahead in a thread, so that producing the next item
    (reading, decoding) overlaps consuming this one. Its errors are raised in the consumer."""
    items: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in iterator:
                items.put(item)
        except BaseException as exc:  # handed to the consumer
            items.put(exc)
        items.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while True:
        item = items.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def _run_range(work: Callable[[ByteRange], tuple[pa.RecordBatch, Any]], handoff_dir: Path, byte_range: ByteRange) -> tuple[str, Any]:
    """Worker: run `work` on one range. The batch goes back as an Arrow IPC file in the handoff
    folder (named by the range's offset): one copy into shared memory and none out of it, where
    pickling it through the pool's pipe made four."""
    batch, extra = work(byte_range)
    path = handoff_dir / f"{byte_range.start}.arrow"
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return str(path), extra


def _init_worker(parent: int, initializer: Callable[..., Any] | None, initargs: tuple[Any, ...]) -> None:
    termination.ignore_interrupts_in_worker()  # the parent stops its workers on Ctrl-C
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_when_orphaned(parent: int, interval: float = 1.0) -> None:
    """Worker: exit once the parent is gone (SIGKILLed): an idle worker waits on a queue whose
    other end it holds itself, so it would never notice, and would live on as an orphan."""
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """Terminate a process pool's workers now (SIGTERM), without waiting for their tasks."""
    terminate = getattr(pool, "terminate_workers", None)  # Python 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        if process.is_alive():
            process.terminate()


def _take_handoff(path: str) -> pa.RecordBatch:
    """Map a worker's batch (zero-copy) and remove its file; the mapping lives as long as the batch."""
    with pa.memory_map(path) as source:
        batch = pa.ipc.open_stream(source).read_next_batch()
    os.unlink(path)
    return batch


def map_line_ranges(
    path: str | Path,
    lines_per_range: int,
    workers: int,
    work: Callable[[ByteRange], tuple[pa.RecordBatch, Any]],
    *,
    initializer: Callable[..., Any] | None = None,
    initargs: tuple[Any, ...] = (),
    on_fingerprint: Callable[[str], Any] | None = None,
    in_flight_per_worker: int = 2,
) -> Iterator[tuple[pa.RecordBatch, Any]]:
    """work(range) for every range of plan_line_ranges, in `workers` spawned processes; the
    (batch, extra) results in file order.

    A thread plans the ranges and hashes the file while doing so; `on_fingerprint` gets the file's
    fingerprint (describe_input's) once the whole file is read, before the last result is yielded.
    At most `in_flight_per_worker` ranges per worker are submitted ahead of the one being yielded,
    which bounds memory however large the file. Closing the iterator stops the workers."""
    ranges: queue.Queue = queue.Queue()
    done = object()
    hasher = new_hash()  # the hash of describe_input, fed block by block

    def plan() -> None:
        try:
            for byte_range in plan_line_ranges(path, lines_per_range, on_block=hasher.update):
                ranges.put(byte_range)
            if on_fingerprint is not None:
                on_fingerprint(FINGERPRINT_PREFIX + hasher.hexdigest())
            ranges.put(done)
        except BaseException as exc:  # handed to the consumer
            ranges.put(exc)

    handoff_dir = shared_scratch_dir("rows")
    try:
        threading.Thread(target=plan, daemon=True).start()
        # Spawned, not forked: this process runs threads (the planner, the caller's writers).
        pool = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(os.getpid(), initializer, initargs)
        )
        try:
            pending: deque[Future] = deque()
            while True:
                byte_range = ranges.get()
                if isinstance(byte_range, BaseException):
                    raise byte_range
                if byte_range is done:
                    break
                pending.append(pool.submit(_run_range, work, handoff_dir, byte_range))
                if len(pending) > in_flight_per_worker * workers:
                    handoff, extra = pending.popleft().result()
                    yield _take_handoff(handoff), extra
            while pending:
                handoff, extra = pending.popleft().result()
                yield _take_handoff(handoff), extra
        except BaseException:
            # Stopped (a signal, an error, the consumer closing this iterator early): the ranges
            # in flight are not wanted, and finishing them would delay the stop by their time.
            stop_workers(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        shutil.rmtree(handoff_dir, ignore_errors=True)
