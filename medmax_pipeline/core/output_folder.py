"""Output folders written whole or not at all, never over someone else's files.

A command that writes a folder (convert-checkpoint, export) writes it into a temporary folder
beside the target (`start_output_folder`), then records what it made in its marker file and
moves it into place (`finish_output_folder`). A target is replaced only when it is empty or an
earlier run of the same command made it (it holds the marker).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from medmax_pipeline.core.file_modes import honour_umask

PARTIAL_MARKER = ".medmax-partial"


def _ours_or_empty(folder: Path, marker: str) -> bool:
    return folder.is_dir() and ((folder / marker).is_file() or not any(folder.iterdir()))


def check_output_folder(final: str | Path, marker: str, command: str) -> None:
    """Refuse (FileExistsError) when `final` is not ours to replace: it may be absent, empty, or a
    folder an earlier run of `command` made (it holds `marker`); anything else is someone's data.
    A command that works long before it writes calls this first, so that it refuses at once."""
    final = Path(final)
    if final.exists() and not _ours_or_empty(final, marker):
        raise FileExistsError(
            f"{final} exists and was not written by {command} (it has no {marker}); refusing to overwrite it. "
            "Choose another output folder or remove it yourself."
        )


def start_output_folder(final: str | Path, marker: str, command: str) -> Path:
    """A fresh temporary folder beside `final` to write into; refuses when `final` is not ours to
    replace (check_output_folder). The temporary folder is marked partial so a later run may clear
    it after a crash, and only such a folder.
    """
    final = Path(final)
    check_output_folder(final, marker, command)
    tmp = final.with_name(f".tmp-{final.name}")
    if tmp.exists():
        if not (tmp / PARTIAL_MARKER).is_file():
            raise FileExistsError(f"{tmp} exists and is not a partial output of {command}; refusing to remove it")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / PARTIAL_MARKER).touch()
    return tmp


def finish_output_folder(tmp: Path, final: str | Path, marker: str, record: Mapping[str, Any]) -> Path:
    """Write `marker` (a JSON record of what was made) into `tmp` and move it to `final`."""
    final = Path(final)
    (tmp / marker).write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    (tmp / PARTIAL_MARKER).unlink()
    honour_umask(tmp)  # safetensors writes 0600, copytree keeps the source's modes: the umask decides
    if final.exists():
        if not _ours_or_empty(final, marker):  # checked again: it may have changed while we worked
            raise FileExistsError(f"{final} appeared while writing and is not ours; the result is left in {tmp}")
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
