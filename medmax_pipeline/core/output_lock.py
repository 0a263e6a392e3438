"""One writer per output: a stage holds a lock file beside each output it writes, or stops at once.

The lock file of OUTPUT (a file or a folder) is OUTPUT's folder/.<name>.lock. It holds the
holder's "host pid". Two ways to hold it, tried in this order:

- flock (non-blocking, exclusive): the kernel (or the file server) releases it when the holder
  dies, however it dies, so a leftover file never blocks anyone.
- where the filesystem has no flock (Lustre mounted without -o flock, some NFS: flock fails with
  ENOLCK / EOPNOTSUPP), exclusive creation: the file exists exactly while a run holds it. A file
  left by a killed run is stale when it names this host and a pid that no longer runs here; it
  is then removed and taken. One naming another host is never guessed about: the error says how
  to remove it.

A second run is refused with OutputLockedError naming the lock file, the holder's pid and host.
The file is removed on release (while still held); under flock a run that opened it just before
sees that the path no longer names its file and tries again, so two runs never both hold it.

`hold_output_locks` serves the command line: it locks what a subcommand's arguments name as its
outputs (OUTPUT_ARGUMENTS). Under torchrun only rank 0 locks: it speaks for the whole job, whose
other ranks must not be refused.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import socket
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Callable, Iterator

from medmax_pipeline.core.ranks import ranks_from_env

# flock errors that mean "this filesystem has no flock", not "someone holds it".
FLOCK_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS})
FLOCK_HELD = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})

# subcommand -> the arguments that name what it writes (files or folders). Absent: commands that
# write nothing (inspect, validate-config), tokenize (the shards of one run share its output
# folder, so it locks each shard itself: tokenize_images.shard_lock_path), demo (it makes the
# inputs, and refuses folders it did not make) and train-node (a launcher: the train it starts locks).
OUTPUT_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "convert-checkpoint": ("output",),
    "collect": ("output_dir",),
    "gather-tokens": ("output", "errors"),
    "map-vocab": ("output",),
    "assemble": ("output_dir",),
    "train": ("output",),
    "export": ("output_checkpoint", "output_hf"),
    "generate": ("output",),
    "clip-scores": ("output", "image_dir"),
    "judge": ("output",),
    "score": ("output",),
    "report": ("output_dir",),
}


class OutputLockedError(RuntimeError):
    """Another run holds the lock of an output this run would write."""


def lock_path_for(output: str | Path) -> Path:
    """The lock file of an output file or folder: beside it, .<name>.lock."""
    output = Path(output)
    return output.parent / f".{output.name}.lock"


def holder_record() -> str:
    return f"{socket.gethostname()} {os.getpid()}"


def parse_holder(text: str) -> tuple[str | None, int | None]:
    """(host, pid) from a lock file's "host pid" (or a bare "pid", as older runs wrote)."""
    parts = text.split()
    if len(parts) == 1 and parts[0].isdigit():
        return None, int(parts[0])
    if len(parts) == 2 and parts[1].isdigit():
        return parts[0], int(parts[1])
    return None, None


def describe_holder(text: str) -> str:
    host, pid = parse_holder(text)
    if pid is None:
        return "holder unknown"
    return f"pid {pid}" + (f" on {host}" if host else "")


def _locked(lock_path: Path, what: str, holder_text: str, hint: str = "") -> OutputLockedError:
    return OutputLockedError(
        f"another {what} run holds {lock_path} ({describe_holder(holder_text)}); wait for it to finish "
        f"(or stop it) before running again{hint}"
    )


def pid_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _flock(fd: int) -> None:
    """fcntl.flock(fd, LOCK_EX | LOCK_NB); a seam the tests replace to simulate a filesystem without flock."""
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _read_holder(fd: int) -> str:
    return os.pread(fd, 256, 0).decode(errors="replace").strip()


def _open_lock_file(lock_path: Path) -> tuple[int, bool]:
    """(fd, created): opens the lock file, creating it when absent, and says whether this call made it."""
    while True:
        try:
            return os.open(lock_path, os.O_RDWR), False
        except FileNotFoundError:
            pass
        try:
            return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            continue  # made by another run in between: open theirs


@contextmanager
def hold_lock(lock_path: str | Path, what: str = "medmax") -> Iterator[None]:
    """Hold lock_path for the duration of the block, or raise OutputLockedError at once.
    `what` names the kind of run in the error ("medmax assemble")."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd, created = _open_lock_file(lock_path)
        try:
            _flock(fd)
        except OSError as exc:
            if exc.errno in FLOCK_HELD:
                holder = _read_holder(fd)
                os.close(fd)
                raise _locked(lock_path, what, holder) from None
            if exc.errno not in FLOCK_UNSUPPORTED:
                os.close(fd)
                raise
            if not created:
                try:
                    _remove_if_stale(lock_path, fd, what)
                finally:
                    os.close(fd)
                continue  # the stale file is gone: create it
            # Created by this call on a filesystem without flock: its existence is the lock.
            with _held(lock_path, fd, by_existence=True):
                yield
            return
        try:
            same_file = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # removed by the run that held it just before: take the new file
    with _held(lock_path, fd, by_existence=False):
        yield


def _remove_if_stale(lock_path: Path, fd: int, what: str) -> None:
    """Remove the existence lock open as fd when a dead run on this host left it; refuse any other."""
    holder_text = _read_holder(fd)
    host, pid = parse_holder(holder_text)
    if host == socket.gethostname() and pid is not None and not pid_is_running(pid):
        try:
            if os.stat(lock_path).st_ino == os.fstat(fd).st_ino:  # still the file judged stale
                lock_path.unlink()
        except FileNotFoundError:
            pass
        return
    hint = f" (this filesystem has no flock: if that run is gone, remove {lock_path} yourself)"
    raise _locked(lock_path, what, holder_text, hint)


@contextmanager
def _held(lock_path: Path, fd: int, by_existence: bool) -> Iterator[None]:
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder_record().encode(), 0)
        yield
    finally:
        try:
            # An existence lock is removed only while it is still ours (never another run's file).
            if not by_existence or os.stat(lock_path).st_ino == os.fstat(fd).st_ino:
                lock_path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        os.close(fd)


def output_paths(command: str, args: argparse.Namespace) -> list[Path]:
    """The outputs a subcommand's parsed arguments name (OUTPUT_ARGUMENTS), in a fixed order."""
    values = [getattr(args, name, None) for name in OUTPUT_ARGUMENTS.get(command, ())]
    return sorted({Path(v) for v in values if v})


def is_main_rank() -> bool:
    return ranks_from_env().is_main


@contextmanager
def hold_output_locks(command: str, args: argparse.Namespace) -> Iterator[list[Path]]:
    """Hold the lock of every output `medmax COMMAND` would write (rank 0 only); yields the lock files."""
    locks = [lock_path_for(p) for p in output_paths(command, args)] if is_main_rank() else []
    with ExitStack() as stack:
        for lock in locks:
            stack.enter_context(hold_lock(lock, f"medmax {command}"))
        yield locks


def run_holding_output_locks(command: str, run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int | None:
    """run(args) while holding the locks of `medmax COMMAND`'s outputs (the command line's entry)."""
    with hold_output_locks(command, args):
        return run(args)
