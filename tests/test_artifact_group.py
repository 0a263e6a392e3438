"""core/artifacts.ArtifactGroup: several outputs that appear all or none."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

from medmax_pipeline.core.artifacts import ArtifactGroup, read_artifact, write_artifact


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
