"""Files the pipeline writes: unique temporary names for atomic replaces, and modes that follow the umask.

Safetensors (and so transformers' and peft's save_pretrained) create files 0600, and copy tools
that keep modes (shutil.copytree) carry the source's 0644 past a stricter umask. A folder the
pipeline made is given the usual modes before it is moved into place (files 0666, folders 0777,
less the umask), like any file a program creates, so collaborators read what the umask allows.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from medmax_pipeline.core import termination


def current_umask() -> int:
    """This process's umask, read without changing it where Linux says it (/proc), else set and restored."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | Path) -> None:
    """Give PATH (a file, or a folder and everything in it, symlinks left alone) the modes a new
    file or folder gets: 0666 / 0777 less the umask, executable bits of files kept."""
    mask = current_umask()
    root = Path(path)
    paths = [root] if not root.is_dir() else [root, *root.rglob("*")]
    for item in paths:
        mode = item.lstat().st_mode
        if stat.S_ISLNK(mode):
            continue
        base = 0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666
        os.chmod(item, base & ~mask)


def unique_temp_path(path: str | Path) -> Path:
    """A new empty file beside PATH, .<name>.<host>~<pid>~<random>.tmp (core/termination's owner
    tag, so a later run can tell a dead run's temporary from a live one's), created exclusively with
    0666 less the umask (os.open lets the kernel apply it; tempfile.mkstemp would force 0600): two
    processes, on one node or two sharing the folder, never share one. The temporaries of PATH that
    a killed run of this host left are removed first."""
    path = Path(path)
    termination.remove_stale_temporaries(path)
    for _ in range(100):
        tmp = termination.temporary_name(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file beside {path}")


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write TEXT to PATH through a unique temporary file and an atomic os.replace: a reader sees
    the old or the new content, never a mix, and concurrent writers never collide."""
    path = Path(path)
    tmp = unique_temp_path(path)
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_if_changed(path: str | Path, text: str) -> Path:
    """Write TEXT to PATH (atomically) only when PATH does not already hold it: its modification
    time, which Snakemake compares, moves exactly when the content does."""
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, text)
