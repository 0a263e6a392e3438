"""Finished units of work of a job, kept so that a rerun redoes only the rest.

A long job records each unit of work as soon as it is finished (tokenize: a chunk of a shard's
images; generate: a row's prediction). One contract, whatever the layout:
- identity: every unit carries the identity of the job that made it (its inputs and settings:
  a fingerprint, or the params it was made with); a rerun reuses a unit only when that identity
  equals its own, so a unit made with other inputs or settings is never reused: it is discarded
  (a unit file is replaced when its unit is done again, a log is started afresh);
- torn units are ignored: a unit file is written atomically and read back through its footer (a
  killed write leaves only an owner-tagged temporary); a log's torn line is skipped;
- cleanup: once the job's output is complete, `remove` deletes the units: only the files this
  layout names (unit files, their temporaries, the log) where it was told, and a unit folder only
  once empty. Nothing the pipeline did not create is deleted.
Reused or not, each unit's content is what an uninterrupted run computes, so a resumed job's
output (and fingerprint) equals an uninterrupted one's.

Two layouts, because the units differ in size and in who writes them:
- `UnitFiles`: one artifact per unit in a folder of its own (tokenize: a chunk holds 1024 codes
  per image, and several ranks write chunks at once);
- `UnitLog`: one JSON-lines file, a header with the job's fingerprint then one line per finished
  unit, appended and fsynced (generate: small items, one writer).

Training's checkpoints (stages/train/checkpoints.py) are a different thing: a snapshot of the whole
state (weights, optimizer, data position) to continue from, not independent finished pieces of
the output, so they keep their own rules (run id, retention, validation).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa

from medmax_pipeline.core.artifacts import ArtifactError, check_meta, read_artifact, read_meta, write_artifact


def job_fingerprint(parts: Mapping[str, Any]) -> str:
    """A job's identity from its inputs and settings (JSON-able, key order does not matter)."""
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def _as_json(value: Mapping[str, Any]) -> Any:
    """What `value` reads back as from JSON (tuples become lists), for comparison with a stored one."""
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class UnitFiles:
    """Units as artifacts `folder/PREFIX-NNNNNN.parquet`, each with its identity as lineage params."""

    folder: Path
    artifact: str  # the artifact name of a unit file (its schema version is checked on reading)
    prefix: str = "unit"

    def path(self, unit: int) -> Path:
        return self.folder / f"{self.prefix}-{unit:06d}.parquet"

    def is_finished(self, unit: int, identity: Mapping[str, Any]) -> bool:
        """Unit `unit` has an intact file of this artifact made with exactly `identity`."""
        path = self.path(unit)
        if not path.is_file():
            return False
        try:
            meta = read_meta(path)
            check_meta(meta, self.artifact)
        except ArtifactError:  # torn, damaged or another artifact: not a finished unit
            return False
        return meta.lineage.get("params") == _as_json(identity)

    def write(self, unit: int, table: pa.Table, identity: Mapping[str, Any]) -> None:
        """Record a finished unit (atomically: a kill leaves no file, or the whole one)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        write_artifact(table, self.path(unit), artifact=self.artifact, params=dict(identity))

    def read(self, unit: int) -> pa.Table:
        return read_artifact(self.path(unit), self.artifact)

    def remove(self) -> None:
        """The unit files (of any unit number, e.g. an earlier run's with more units), their
        temporaries left by a killed write, and the folder once nothing else is in it."""
        if not self.folder.is_dir():
            return
        own = re.compile(rf"{re.escape(self.prefix)}-\d{{6}}\.parquet")
        temporary = re.compile(rf"\.{re.escape(self.prefix)}-\d{{6}}\.parquet\..*\.tmp")
        for path in self.folder.iterdir():
            if path.is_file() and (own.fullmatch(path.name) or temporary.fullmatch(path.name)):
                path.unlink(missing_ok=True)
        try:
            self.folder.rmdir()
        except OSError:  # something else is in it: not ours to delete
            pass


@dataclass(frozen=True)
class UnitLog:
    """Units as JSON lines after a header {"fingerprint": F}; each unit a dict with its `key`."""

    path: Path
    fingerprint: str
    key: str = "index"

    def load(self) -> dict[int, dict[str, Any]]:
        """The finished units of a run with this fingerprint, by key. A log made with another
        fingerprint is removed (noted on stderr); torn or malformed lines are ignored."""
        if not self.path.exists():
            return {}
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if not isinstance(header, dict) or header.get("fingerprint") != self.fingerprint:
            print(f"note: {self.path} was made with other inputs or options; starting afresh", file=sys.stderr)
            self.path.unlink()
            return {}
        units = {}
        for line in lines[1:]:
            try:
                unit = json.loads(line)
                units[int(unit[self.key])] = unit
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
        return units

    def append(self, units: Iterable[Mapping[str, Any]]) -> None:
        """Record finished units (fsynced: once this returns they survive a kill)."""
        new = not self.path.exists()
        with open(self.path, "a") as f:
            if new:
                f.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
            f.write("".join(json.dumps(dict(unit)) + "\n" for unit in units))
            f.flush()
            os.fsync(f.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
