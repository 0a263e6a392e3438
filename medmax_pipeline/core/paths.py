"""Relative paths confined to a root folder: no absolute paths, no `..`, no symlink out of the root."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

# Both POSIX and Windows spellings of an absolute path: a leading '/', '\' or a drive letter.
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


class PathEscapeError(ValueError):
    """A relative path is absolute, climbs out with `..`, names nothing, or resolves outside its root."""


def confined_path(root: str | Path, relative: str) -> Path:
    """The resolved path of `relative` under `root`; raises PathEscapeError when it would leave `root`.

    Symlinks are followed (the file need not exist): a link inside the root that points outside
    it is refused, as collect refuses dataset paths.
    """
    if not isinstance(relative, str) or not relative.strip():
        raise PathEscapeError(f"{relative!r} names no file")
    if relative.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(relative):
        raise PathEscapeError(f"{relative!r} is an absolute path; expected a path relative to {root}")
    parts = PurePosixPath(relative.replace("\\", "/")).parts
    if ".." in parts:
        raise PathEscapeError(f"{relative!r} has a '..' component")
    if parts in ((), (".",)):
        raise PathEscapeError(f"{relative!r} names no file")
    resolved_root = Path(root).resolve()
    try:
        resolved = (resolved_root / relative).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop, name too long
        raise PathEscapeError(f"{relative!r}: {exc.__class__.__name__}: {exc}") from exc
    if not resolved.is_relative_to(resolved_root):
        raise PathEscapeError(f"{relative!r} resolves to {resolved}, outside {resolved_root}")
    return resolved
