"""Relative paths confined to a root folder: no absolute paths, no `..`, no symlink out of the root."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

# Both POSIX and Windows spellings of an absolute path: a leading '/', '\' or a drive letter and
# separator ('c:d.jpg' is a plain relative name, and stays confined by the resolution below).
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


class PathEscapeError(ValueError):
    """A relative path is absolute, climbs out with `..`, names nothing, or resolves outside its root."""


def relative_path_problem(relative: str) -> tuple[str, str] | None:
    """(kind, what is wrong) when `relative` may not be joined to a root, else None. Kinds: "nul",
    "absolute", "parent" (a `..` component), "empty". The one syntactic rule for paths taken from
    data: collect (dataset rows) and generation (eval rows) both apply it."""
    if "\x00" in relative:
        return "nul", f"{relative!r} holds a NUL byte"
    if relative.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(relative):
        return "absolute", f"{relative!r} is an absolute path"
    if ".." in PurePosixPath(relative.replace("\\", "/")).parts:
        return "parent", f"{relative!r} has a '..' component"
    if not relative.strip() or PurePosixPath(relative).parts in ((), (".",)):
        return "empty", f"{relative!r} names no file"
    return None


def confined_path(root: str | Path, relative: str) -> Path:
    """The resolved path of `relative` under `root`; raises PathEscapeError when it would leave `root`.

    Symlinks are followed (the file need not exist): a link inside the root that points outside
    it is refused, as collect refuses dataset paths.
    """
    if not isinstance(relative, str):
        raise PathEscapeError(f"{relative!r} names no file")
    problem = relative_path_problem(relative)
    if problem is not None:
        kind, detail = problem
        raise PathEscapeError(f"{detail}; expected a path relative to {root}" if kind == "absolute" else detail)
    resolved_root = Path(root).resolve()
    try:
        resolved = (resolved_root / relative).resolve()
    except (OSError, RuntimeError) as exc:  # symlink loop, name too long
        raise PathEscapeError(f"{relative!r}: {exc.__class__.__name__}: {exc}") from exc
    if not resolved.is_relative_to(resolved_root):
        raise PathEscapeError(f"{relative!r} resolves to {resolved}, outside {resolved_root}")
    return resolved
