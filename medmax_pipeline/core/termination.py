"""Stopping cleanly when asked to, and removing what runs that could not stop left behind.

SLURM stops a job with SIGTERM (time limit, scancel; SIGKILL follows after KillWait), a user with
Ctrl-C (SIGINT). `install()` (called by cli.main) turns either signal in the main process into a
`Terminated` exception, so every `finally` and context manager of the stage runs: artifact writers
drop their temporary files, worker pools stop, shared-memory folders go. cli.main then removes the
temporary paths still registered here (`temporary_path`), prints one `error:` line naming the
signal and exits 128 + signal number (143 for SIGTERM), so Snakemake retries or reports the job.
What a stage finished before the signal (tokenize chunks, training checkpoints, generated rows)
is complete on disk and kept: a rerun resumes from it.

A SIGKILL cannot be caught, so the temporaries and scratch folders the pipeline makes carry their
owner in their name: `owner_tag()` = HOST~PID~RANDOM. A later run removes those of a dead process
of its own host (`remove_stale_temporaries` next to a file it writes, `sweep_stale_scratch` for
the /dev/shm folders, which also hold a marker file naming the owner and its start time). A name
that does not parse, another host's, a live process's, or a folder without a matching marker is
never touched: nothing the pipeline did not make is removed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SCRATCH_PREFIX = "medmax-"
SCRATCH_MARKER = ".medmax-owner.json"
SHM_ROOT = Path("/dev/shm")

_installed_pid: int | None = None
_received: int | None = None
_registered: dict[Path, None] = {}  # ordered set of temporary paths to remove on termination
_registry_lock = threading.Lock()


class Terminated(BaseException):
    """The process was asked to stop (SIGTERM, SIGINT). A BaseException, like KeyboardInterrupt,
    so that `except Exception` handlers do not swallow it and cleanups run on the way out."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"stopped by {signal_name(signum)}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# ----------------------------------------------------------------------------------------------
# Signals
# ----------------------------------------------------------------------------------------------


def install() -> None:
    """Raise Terminated in the main thread on SIGTERM or SIGINT (from the main thread only)."""
    global _installed_pid, _received
    if threading.current_thread() is not threading.main_thread():
        return
    _installed_pid, _received = os.getpid(), None
    for signum in HANDLED_SIGNALS:
        signal.signal(signum, _on_signal)


def _on_signal(signum: int, frame: object) -> None:
    global _received
    if os.getpid() != _installed_pid:
        # A forked child (a DataLoader worker) inherited the handler: it dies as the default action
        # would, and its parent, which gets the signal too or sees it die, cleans up.
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        return
    if _received is not None:
        return  # a repeated signal (SLURM and torchrun both send one) must not interrupt the cleanup
    _received = signum
    raise Terminated(signum)


def received() -> int | None:
    """The signal that asked this process to stop, or None."""
    return _received


def ignore_interrupts_in_worker() -> None:
    """For worker processes (pool initializers): Ctrl-C reaches the whole process group, and the
    parent stops its workers itself; a worker's own KeyboardInterrupt would only print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------
# Temporary paths removed on termination
# ----------------------------------------------------------------------------------------------


def register_temporary(path: str | Path) -> Path:
    """Remove `path` (a file or a folder) if the process is terminated before discard_temporary."""
    path = Path(path)
    with _registry_lock:
        _registered[path] = None
    return path


def discard_temporary(path: str | Path) -> None:
    with _registry_lock:
        _registered.pop(Path(path), None)


@contextmanager
def temporary_path(path: str | Path) -> Iterator[Path]:
    """`path` is removed when the block raises (Terminated included); registered meanwhile, so a
    termination that reaches cli.main through a path without cleanup still removes it."""
    path = register_temporary(path)
    try:
        yield path
    except BaseException:
        remove_path(path)
        raise
    finally:
        discard_temporary(path)


def remove_registered_temporaries() -> list[Path]:
    """Remove every registered temporary path; the ones removed."""
    with _registry_lock:
        paths = list(_registered)
        _registered.clear()
    return [p for p in reversed(paths) if remove_path(p)]


def remove_path(path: Path) -> bool:
    """Remove a file, link or folder; True when something was removed."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        return True
    except FileNotFoundError:
        return False
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------
# Owner tags, and the debris of dead runs
# ----------------------------------------------------------------------------------------------

_TAG_RE = re.compile(r"(?P<host>[A-Za-z0-9._-]{1,64})~(?P<pid>[0-9]{1,10})~(?P<random>[0-9a-f]{8})")


def this_host() -> str:
    """The host name as it appears in an owner tag (characters outside [A-Za-z0-9._-] as '_')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname())[:64] or "localhost"


def owner_tag() -> str:
    """HOST~PID~RANDOM: who made a temporary (random: several temporaries of one process)."""
    return f"{this_host()}~{os.getpid()}~{secrets.token_hex(4)}"


def temporary_name(path: str | Path) -> Path:
    """The temporary file that becomes `path` when complete: .NAME.HOST~PID~RANDOM.tmp beside it."""
    path = Path(path)
    return path.with_name(f".{path.name}.{owner_tag()}.tmp")


def parse_owner(tag: str) -> tuple[str, int] | None:
    """(host, pid) of an owner tag; None when `tag` is not one."""
    match = _TAG_RE.fullmatch(tag)
    return (match["host"], int(match["pid"])) if match else None


def process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot, /proc/PID/stat), None when unknown:
    with the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_is_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def owner_is_gone(host: str, pid: int, started: str | None = None) -> bool:
    """True only when the owner is provably dead: this host, and its pid gone (or reused by a
    process that started at another time). Another host's owner is never declared dead."""
    if host != this_host():
        return False
    if not pid_is_alive(pid):
        return True
    return started is not None and process_start(pid) not in (None, started)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries of `path` (temporary_name) that a dead process of this host left."""
    path = Path(path)
    prefix, suffix = f".{path.name}.", ".tmp"
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(suffix)):
            continue
        owner = parse_owner(entry.name[len(prefix) : -len(suffix)])
        if owner is not None and owner_is_gone(*owner) and remove_path(Path(entry.path)):
            removed.append(Path(entry.path))
    return removed


def scratch_root() -> Path:
    """/dev/shm where there is a writable one (tmpfs: what passes between processes never
    touches a disk), else the temp folder."""
    if SHM_ROOT.is_dir() and os.access(SHM_ROOT, os.W_OK):
        return SHM_ROOT
    return Path(tempfile.gettempdir())


def make_scratch_dir(kind: str, root: str | Path | None = None) -> Path:
    """A new folder ROOT/medmax-KIND-HOST~PID~RANDOM (mode 0700) holding a marker file that names
    its owner; the caller removes it. KIND: lower-case letters."""
    if not re.fullmatch(r"[a-z]+", kind):
        raise ValueError(f"scratch kind {kind!r}: expected lower-case letters")
    root = Path(root) if root is not None else scratch_root()
    while True:
        folder = root / f"{SCRATCH_PREFIX}{kind}-{owner_tag()}"
        try:
            folder.mkdir(mode=0o700)
            break
        except FileExistsError:
            continue
    marker = {"host": this_host(), "pid": os.getpid(), "started": process_start(os.getpid()), "kind": kind}
    (folder / SCRATCH_MARKER).write_text(json.dumps(marker) + "\n")
    return folder


_SCRATCH_RE = re.compile(rf"{re.escape(SCRATCH_PREFIX)}(?P<kind>[a-z]+)-(?P<tag>.+)")


def stale_scratch_owner(folder: Path) -> bool:
    """True when `folder` is a scratch folder of make_scratch_dir whose owner is gone: its name
    parses, it is ours (uid), its marker agrees with its name, and the owner is dead."""
    match = _SCRATCH_RE.fullmatch(folder.name)
    owner = parse_owner(match["tag"]) if match else None
    if owner is None or folder.is_symlink() or not folder.is_dir():
        return False
    try:
        if folder.stat().st_uid != os.getuid():
            return False
        marker = json.loads((folder / SCRATCH_MARKER).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or (marker.get("host"), marker.get("pid"), marker.get("kind")) != (*owner, match["kind"]):
        return False
    return owner_is_gone(owner[0], owner[1], marker.get("started"))


def sweep_stale_scratch(roots: tuple[str | Path, ...] | None = None) -> list[Path]:
    """Remove the scratch folders of dead runs of this host (see stale_scratch_owner) under
    /dev/shm and the temp folder; the folders removed."""
    roots = roots if roots is not None else tuple(dict.fromkeys((SHM_ROOT, Path(tempfile.gettempdir()))))
    removed = []
    for root in roots:
        try:
            entries = [Path(e.path) for e in os.scandir(root) if e.name.startswith(SCRATCH_PREFIX)]
        except OSError:
            continue
        for folder in entries:
            if stale_scratch_owner(folder):
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def report(exc: Terminated, stream=sys.stderr) -> int:
    """The `error:` line of a terminated run; its exit code."""
    removed = remove_registered_temporaries()
    extra = f" ({len(removed)} left by interrupted steps)" if removed else ""
    print(f"error: {exc} (signal {exc.signum}); temporary files removed{extra}, finished work kept for a rerun", file=stream)
    return exc.exit_code
