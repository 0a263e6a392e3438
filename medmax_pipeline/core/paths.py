"""Relative paths confined to a root folder (no absolute paths, no `..`, no symlink out of the root),
and whether a path lies under one of a set of roots (credentialed image roots)."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath
from typing import Sequence

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


class MissingRootError(ValueError):
    """A configured root folder (e.g. a credentialed image root) does not exist."""


def resolve_roots(roots: Sequence[str | Path], option: str = "--credentialed-root") -> list[Path]:
    """Each root resolved (symlinks followed, `~` expanded); a missing one is an error naming `option`."""
    resolved = []
    for root in roots:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise MissingRootError(f"{option} {root}: folder does not exist")
        resolved.append(path.resolve(strict=True))
    return resolved


def is_under_roots(path: str | Path, roots: Sequence[Path]) -> bool:
    """True when `path` lies under one of the (resolved) roots, by its real path (symlinks followed)
    or by its spelled absolute path: either way it names a file of that root."""
    if not roots:
        return False
    path = Path(path).expanduser()
    try:
        candidates = {path.resolve(), Path(os.path.abspath(path))}
    except (OSError, RuntimeError, ValueError):  # symlink loop, NUL byte: not a file of any root
        return False
    return any(c.is_relative_to(root) for c in candidates for root in roots)


def image_under_roots(image_root: str | Path | None, relative: str | None, roots: Sequence[Path]) -> bool:
    """True when the image `relative` names (under `image_root`, or as it is without one) lies under
    one of `roots`. Unconfined on purpose: a path that escapes its root but names a credentialed
    file still makes its row credentialed (confinement is checked where the image is read)."""
    if not relative or not roots or "\x00" in relative:
        return False
    base = Path(image_root).expanduser() if image_root is not None else Path(".")
    return is_under_roots(base / relative, roots)
