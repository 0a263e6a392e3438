"""A cheap identity for a folder input (a checkpoint, a base model, an image root).

Hashing a 14 GB checkpoint or a million images on every run is too slow, and Snakemake only sees a
folder's own modification time, which does not change when a file inside is replaced. The identity
is a manifest instead: every file's relative name, size and modification time (ns), plus a content
hash of each small configuration file (json, yaml, txt up to 1 MiB), where an edit can keep the
size and a copy tool can keep the time. Its fingerprint stands for the folder in artifact lineage,
and the workflow keeps one manifest file per folder input (written only when it changed), on which
the rules that read the folder depend: a real change reruns what follows it.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from medmax_pipeline.core.file_modes import write_text_if_changed

SMALL_FILE_SUFFIXES = (".json", ".yaml", ".yml", ".txt", ".model")
SMALL_FILE_LIMIT = 1 << 20
# Written by the pipeline into folders it makes; their churn says nothing about the data.
IGNORED_NAMES = frozenset({".snakemake_timestamp"})


def _file_digest(path: Path) -> str:
    return hashlib.blake2b(path.read_bytes(), digest_size=16).hexdigest()


def folder_manifest(folder: str | Path) -> dict[str, Any]:
    """{"files": [[name, size, mtime_ns], ...], "hashes": {name: digest}} in sorted name order.
    Symlinks are followed (an image root may link to where the images are); a dangling link is
    listed with size -1."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    files: list[list[Any]] = []
    hashes: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if name in IGNORED_NAMES:
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            try:
                stat = path.stat()
            except FileNotFoundError:
                files.append([rel, -1, 0])
                continue
            files.append([rel, stat.st_size, stat.st_mtime_ns])
            if path.suffix.lower() in SMALL_FILE_SUFFIXES and stat.st_size <= SMALL_FILE_LIMIT:
                hashes[rel] = _file_digest(path)
    files.sort()
    return {"files": files, "hashes": dict(sorted(hashes.items()))}


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    canonical = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    return "manifest:" + hashlib.blake2b(canonical, digest_size=32).hexdigest()


def folder_fingerprint(folder: str | Path) -> str:
    """The folder's identity: changes when a file is added, removed, resized, touched, or when a
    small configuration file's content changes."""
    return manifest_fingerprint(folder_manifest(folder))


def write_manifest_if_changed(folder: str | Path, manifest_path: str | Path) -> Path:
    """Keep MANIFEST_PATH describing FOLDER, rewriting it only when the folder changed, so that its
    modification time (what Snakemake compares) moves exactly when the folder does."""
    manifest_path = Path(manifest_path)
    manifest = folder_manifest(folder)
    text = json.dumps({"folder": str(folder), "fingerprint": manifest_fingerprint(manifest), **manifest}, indent=0, sort_keys=True)
    # A unique temporary name: Snakemake on two nodes may plan at once over a shared results folder.
    return write_text_if_changed(manifest_path, text)
