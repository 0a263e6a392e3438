"""core/artifacts.ArtifactGroup: several outputs that appear all or none."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from medmax_pipeline.core import termination
from medmax_pipeline.core.artifacts import ArtifactError, ArtifactGroup, read_artifact, write_artifact


def test_a_complete_group_appears_at_once(tmp_path: Path) -> None:
    with ArtifactGroup() as group:
        meta = group.write_artifact(pa.table({"x": [1, 2]}), tmp_path / "a.parquet", artifact="dataset")
        with group.writer(tmp_path / "b.parquet", pa.schema([("x", pa.int64())]), artifact="dataset") as writer:
            writer.write(pa.table({"x": [3]}))
        group.write_file(tmp_path / "c.csv", lambda tmp: tmp.write_text("x\n1\n"))
        assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []  # nothing visible yet
    assert meta.path == str(tmp_path / "a.parquet")
    assert read_artifact(tmp_path / "a.parquet").column("x").to_pylist() == [1, 2]
    assert read_artifact(tmp_path / "b.parquet").column("x").to_pylist() == [3]
    assert (tmp_path / "c.csv").read_text() == "x\n1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet", "b.parquet", "c.csv"]


def test_a_failure_leaves_the_previous_outputs_and_no_temporary(tmp_path: Path) -> None:
    write_artifact(pa.table({"x": [0]}), tmp_path / "a.parquet", artifact="dataset")
    before = (tmp_path / "a.parquet").read_bytes()
    with pytest.raises(RuntimeError, match="late failure"):
        with ArtifactGroup() as group:
            group.write_artifact(pa.table({"x": [1, 2]}), tmp_path / "a.parquet", artifact="dataset")
            group.write_artifact(pa.table({"x": [3]}), tmp_path / "b.parquet", artifact="dataset")
            raise RuntimeError("late failure")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.parquet"]
    assert (tmp_path / "a.parquet").read_bytes() == before



def test_a_declared_output_that_was_not_written_publishes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"b\.txt: not written"):
        with ArtifactGroup([tmp_path / "a.parquet", tmp_path / "b.txt"]) as group:
            group.write_artifact(pa.table({"x": [1]}), tmp_path / "a.parquet", artifact="dataset")
    assert list(tmp_path.iterdir()) == []


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has it


@pytest.mark.parametrize("failure", ["before any write", "after the writes"])
def test_remove_previous_leaves_no_output_old_or_new_and_no_dead_runs_temporary(tmp_path: Path, failure: str) -> None:
    a, b = tmp_path / "a.parquet", tmp_path / "b.txt"
    with ArtifactGroup([a, b]) as group:
        group.write_artifact(pa.table({"x": [0]}), a, artifact="dataset")
        group.write_file(b, lambda tmp: tmp.write_text("old\n"))
    dead_tmp = tmp_path / f".a.parquet.{termination.this_host()}~{dead_pid()}~00000000.tmp"
    user_file = tmp_path / ".a.parquet.notes.tmp"  # not the pipeline's: left alone
    unrelated = tmp_path / "c.parquet"  # not an output of the group
    for path in (dead_tmp, user_file, unrelated):
        path.write_bytes(b"x")
    with pytest.raises(RuntimeError, match="failed"):
        with ArtifactGroup([a, b], on_failure="remove_previous") as group:
            if failure == "after the writes":
                group.write_artifact(pa.table({"x": [1, 2]}), a, artifact="dataset")
                group.write_file(b, lambda tmp: tmp.write_text("new\n"))
            raise RuntimeError("failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([user_file.name, unrelated.name])


def test_on_failure_is_checked() -> None:
    with pytest.raises(ValueError, match="on_failure"):
        ArtifactGroup(on_failure="remove")  # type: ignore[arg-type]
