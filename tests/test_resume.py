"""core/resume: finished units of a job are reused only with the same identity, torn ones are
ignored, stale ones discarded, and cleanup removes only the units' own files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from medmax_pipeline.core.resume import UnitFiles, UnitLog, job_fingerprint

ARTIFACT = "image_tokens_chunk"
SCHEMA = pa.schema([("img_path", pa.string()), ("image_key", pa.string()), ("credential", pa.string()),
                    ("img_tokens", pa.list_(pa.int16())), ("orig_width", pa.int32()), ("orig_height", pa.int32()),
                    ("orig_mode", pa.string()), ("reason", pa.string())])


def unit_table(name: str) -> pa.Table:
    return pa.table({"img_path": [name], "image_key": [name], "credential": ["no"], "img_tokens": [[1, 2]],
                     "orig_width": [1], "orig_height": [1], "orig_mode": ["RGB"], "reason": [None]}, schema=SCHEMA)


def test_job_fingerprint_depends_on_content_not_key_order() -> None:
    assert job_fingerprint({"a": 1, "b": [1, 2]}) == job_fingerprint({"b": [1, 2], "a": 1})
    assert job_fingerprint({"a": 1}) != job_fingerprint({"a": 2})


def test_unit_files_reused_only_with_the_same_identity(tmp_path: Path) -> None:
    units = UnitFiles(tmp_path / "job.chunks", ARTIFACT, prefix="chunk")
    identity = {"model": "m1", "unit": 0, "rows": (0, 1)}  # a tuple reads back as a list: still the same
    assert not units.is_finished(0, identity)
    units.write(0, unit_table("a.png"), identity)
    assert units.path(0).name == "chunk-000000.parquet"
    assert units.is_finished(0, identity)
    assert units.read(0).column("img_path").to_pylist() == ["a.png"]
    # Made with other settings (another model): never reused; doing the unit again replaces it.
    assert not units.is_finished(0, {**identity, "model": "m2"})
    units.write(0, unit_table("b.png"), {**identity, "model": "m2"})
    assert not units.is_finished(0, identity) and units.is_finished(0, {**identity, "model": "m2"})


def test_a_torn_unit_file_is_not_finished(tmp_path: Path) -> None:
    units = UnitFiles(tmp_path / "job.chunks", ARTIFACT, prefix="chunk")
    units.write(1, unit_table("a.png"), {"unit": 1})
    data = units.path(1).read_bytes()
    units.path(1).write_bytes(data[: len(data) // 2])  # a write cut short (not through the atomic writer)
    assert not units.is_finished(1, {"unit": 1})
    units.path(2).write_bytes(b"not parquet")
    assert not units.is_finished(2, {"unit": 2})


def test_unit_files_cleanup_removes_only_their_own_files(tmp_path: Path) -> None:
    units = UnitFiles(tmp_path / "job.chunks", ARTIFACT, prefix="chunk")
    for unit in range(3):
        units.write(unit, unit_table(f"{unit}.png"), {"unit": unit})
    killed_write = units.folder / ".chunk-000003.parquet.host~123~abc.tmp"
    killed_write.write_bytes(b"half")
    foreign = units.folder / "notes.txt"
    foreign.write_text("the user's")
    units.remove()
    assert sorted(p.name for p in units.folder.iterdir()) == ["notes.txt"]  # folder kept: not empty
    foreign.unlink()
    units.remove()
    assert not units.folder.exists()
    units.remove()  # nothing left: no error


def test_unit_log_reuses_units_and_ignores_a_torn_line(tmp_path: Path) -> None:
    log = UnitLog(tmp_path / "out.parquet.partial.jsonl", "fp")
    assert log.load() == {}
    log.append([{"index": 0, "prediction": "a"}, {"index": 1, "prediction": "b"}])
    with open(log.path, "a") as f:
        f.write('{"index": 2, "predic')  # killed mid-line
    assert log.load() == {0: {"index": 0, "prediction": "a"}, 1: {"index": 1, "prediction": "b"}}
    assert json.loads(log.path.read_text().splitlines()[0]) == {"fingerprint": "fp"}


def test_unit_log_of_another_job_is_discarded(tmp_path: Path, capsys) -> None:
    path = tmp_path / "out.parquet.partial.jsonl"
    UnitLog(path, "fp").append([{"index": 0, "prediction": "a"}])
    assert UnitLog(path, "other").load() == {}
    assert not path.exists()
    assert "made with other inputs or options" in capsys.readouterr().err
    # The new job's units start a fresh log with its own header.
    UnitLog(path, "other").append([{"index": 0, "prediction": "z"}])
    assert UnitLog(path, "other").load() == {0: {"index": 0, "prediction": "z"}}
    assert UnitLog(path, "fp").load() == {}


def test_unit_log_cleanup(tmp_path: Path) -> None:
    log = UnitLog(tmp_path / "out.parquet.partial.jsonl", "fp")
    log.append([{"index": 0}])
    other = tmp_path / "out.parquet"
    other.write_text("output")
    log.remove()
    assert not log.path.exists() and other.read_text() == "output"
    log.remove()
