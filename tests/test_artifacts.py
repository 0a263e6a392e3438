"""The artifact writer and reader: round trip, atomicity, fingerprints, schema refusal, credentials."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medmax_pipeline.core import artifacts
from medmax_pipeline.core.artifacts import (
    ARTIFACT_SCHEMA_VERSIONS,
    ArtifactError,
    ArtifactWriter,
    CredentialLeakError,
    fingerprint_table,
    read_artifact,
    read_meta,
    write_artifact,
)


def sample_table(credential: str = "no") -> pa.Table:
    return pa.table(
        {
            "row_id": ["train:1", "train:2", "train:3"],
            "tokens": pa.array([[0, 5, 2], [], None], pa.list_(pa.int32())),
            "text": ["a", None, "ccc"],
            "n": pa.array([3, None, 1], pa.int32()),
            "score": pa.array([0.5, 1.5, None], pa.float64()),
            "ok": [True, None, False],
            "credential": ["no", "no", credential],
        }
    )


def test_round_trip_keeps_rows_and_footer_metadata(tmp_path: Path) -> None:
    table = sample_table()
    meta = write_artifact(table, tmp_path / "d.parquet", artifact="dataset", params={"max_length": 2048})
    back = read_artifact(tmp_path / "d.parquet", artifact="dataset")
    assert back.equals(table)
    kv = {k.decode(): v.decode() for k, v in pq.read_metadata(tmp_path / "d.parquet").metadata.items()}
    assert kv["medmax.artifact"] == "dataset"
    assert kv["medmax.schema_version"] == str(ARTIFACT_SCHEMA_VERSIONS["dataset"])
    assert kv["medmax.fingerprint"] == meta.fingerprint == fingerprint_table(table)
    assert json.loads(kv["medmax.lineage"])["params"] == {"max_length": 2048}
    assert kv["medmax.credential"] == "public"
    assert kv["medmax.pipeline_version"]
    assert pq.ParquetFile(tmp_path / "d.parquet").metadata.row_group(0).column(0).compression == "ZSTD"


def test_fingerprint_ignores_batching_and_row_groups(tmp_path: Path) -> None:
    table = sample_table()
    one = write_artifact(table, tmp_path / "one.parquet", artifact="dataset")
    with ArtifactWriter(tmp_path / "many.parquet", table.schema, artifact="dataset") as writer:
        for i in range(table.num_rows):
            writer.write(table.slice(i, 1).to_batches()[0] if table.slice(i, 1).num_rows else table.slice(i, 1))
    assert pq.ParquetFile(tmp_path / "many.parquet").num_row_groups == 3
    assert read_meta(tmp_path / "many.parquet").fingerprint == one.fingerprint


@pytest.mark.parametrize(
    "change",
    [
        lambda t: t.set_column(2, "text", pa.array(["a", None, "ccd"])),
        lambda t: t.set_column(2, "text", pa.array(["a", "", "ccc"])),  # null is not the empty string
        lambda t: t.set_column(1, "tokens", pa.array([[0, 5], [2], None], pa.list_(pa.int32()))),  # same ids, other split
        lambda t: t.set_column(2, "text", pa.array(["ab", None, "cc"])),  # same bytes, other boundaries
        lambda t: t.slice(0, 2),
        lambda t: t.rename_columns([*t.column_names[:-1], "cred"]),
    ],
)
def test_fingerprint_changes_with_content(change) -> None:
    table = sample_table()
    assert fingerprint_table(change(table)) != fingerprint_table(table)


def test_same_inputs_same_fingerprint_across_reruns(tmp_path: Path) -> None:
    table = sample_table()
    a = write_artifact(table, tmp_path / "a.parquet", artifact="dataset")
    b = write_artifact(pa.Table.from_pylist(table.to_pylist(), schema=table.schema), tmp_path / "b.parquet", artifact="dataset")
    assert a.fingerprint == b.fingerprint


def test_reader_refuses_unknown_schema_version_and_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_artifact(sample_table(), tmp_path / "d.parquet", artifact="dataset")
    monkeypatch.setitem(ARTIFACT_SCHEMA_VERSIONS, "dataset", 2)
    with pytest.raises(ArtifactError, match="found dataset schema version 1, expected 2"):
        read_artifact(tmp_path / "d.parquet", artifact="dataset")
    monkeypatch.setitem(ARTIFACT_SCHEMA_VERSIONS, "dataset", 1)
    with pytest.raises(ArtifactError, match="found artifact 'dataset', expected 'coverage'"):
        read_artifact(tmp_path / "d.parquet", artifact="coverage")
    with pytest.raises(ArtifactError, match="unknown artifact name"):
        write_artifact(sample_table(), tmp_path / "x.parquet", artifact="no_such_artifact")
    pq.write_table(sample_table(), tmp_path / "plain.parquet")
    with pytest.raises(ArtifactError, match="not a medmax artifact"):
        read_artifact(tmp_path / "plain.parquet")


def test_failed_write_leaves_previous_artifact_and_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    first = write_artifact(sample_table(), path, artifact="dataset")
    with pytest.raises(RuntimeError):
        with ArtifactWriter(path, sample_table().schema, artifact="dataset") as writer:
            writer.write(sample_table())
            raise RuntimeError("killed mid-write")
    assert read_meta(path).fingerprint == first.fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["d.parquet"]


def test_killed_process_never_leaves_a_complete_looking_file(tmp_path: Path) -> None:
    # A writer process killed before close() leaves only a hidden temporary file.
    script = f"""
import os, pyarrow as pa
from medmax_pipeline.core.artifacts import ArtifactWriter
t = pa.table({{"x": list(range(1000))}})
w = ArtifactWriter({str(tmp_path / 'out.parquet')!r}, t.schema, artifact="coverage")
w.write(t)
os._exit(9)
"""
    result = subprocess.run([sys.executable, "-c", script])
    assert result.returncode == 9
    assert not (tmp_path / "out.parquet").exists()
    assert all(p.name.startswith(".out.parquet.") for p in tmp_path.iterdir())


def test_credentialed_rows_mark_the_artifact_and_public_is_refused(tmp_path: Path) -> None:
    meta = write_artifact(sample_table("yes"), tmp_path / "c.parquet", artifact="dataset")
    assert meta.credential == "credentialed"
    with pytest.raises(CredentialLeakError):
        write_artifact(sample_table("yes"), tmp_path / "p.parquet", artifact="dataset_public", credential="public")
    assert not (tmp_path / "p.parquet").exists()
    # Derived from a credentialed artifact: refused as public even with no credentialed row inside.
    with pytest.raises(CredentialLeakError):
        write_artifact(sample_table("no"), tmp_path / "p.parquet", artifact="dataset_public", inputs=[tmp_path / "c.parquet"], credential="public")
    derived = write_artifact(sample_table("no"), tmp_path / "d.parquet", artifact="dataset", inputs=[tmp_path / "c.parquet"])
    assert derived.credential == "credentialed"
    # A credentialed row arriving in a later batch of a streamed public artifact is refused too.
    with pytest.raises(CredentialLeakError):
        with ArtifactWriter(tmp_path / "s.parquet", sample_table().schema, artifact="dataset_public", credential="public") as w:
            w.write(sample_table("no"))
            w.write(sample_table("yes"))
    assert not (tmp_path / "s.parquet").exists()


def test_lineage_records_inputs_and_inspect_walks_it(tmp_path: Path) -> None:
    raw = tmp_path / "rows.jsonl"
    raw.write_text('{"a": 1}\n')
    first = write_artifact(sample_table(), tmp_path / "a.parquet", artifact="image_paths", inputs=[raw])
    second = write_artifact(sample_table(), tmp_path / "b.parquet", artifact="image_blocks", inputs=[tmp_path / "a.parquet"], params={"k": 1})
    entry = second.lineage["inputs"][0]
    assert entry["artifact"] == "image_paths" and entry["fingerprint"] == first.fingerprint
    assert first.lineage["inputs"][0]["fingerprint"].startswith("blake2b:")
    out = subprocess.run([sys.executable, "-m", "medmax_pipeline", "inspect", str(tmp_path / "b.parquet")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "medmax.artifact: image_blocks" in out.stdout
    assert "a.parquet: image_paths" in out.stdout and "rows.jsonl: file" in out.stdout


def test_inspect_flags_a_stale_input(tmp_path: Path) -> None:
    write_artifact(sample_table(), tmp_path / "a.parquet", artifact="image_paths")
    write_artifact(sample_table(), tmp_path / "b.parquet", artifact="image_blocks", inputs=[tmp_path / "a.parquet"])
    write_artifact(sample_table().slice(0, 1), tmp_path / "a.parquet", artifact="image_paths")
    assert any("stale" in line for line in artifacts.lineage_tree(tmp_path / "b.parquet"))


def test_bad_lineage_parameter_fails_before_writing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        write_artifact(sample_table(), tmp_path / "d.parquet", artifact="dataset", params={"bad": object()})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------
# Issue 11: a full disk never leaves temporary files; the credential guard has no way around it;
# artifacts honour the umask.
# ----------------------------------------------------------------------------------------------


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the patched close, again from __del__
@pytest.mark.parametrize("where", ["write_table", "close", "replace"])
def test_full_disk_leaves_no_temp_file_and_a_retry_succeeds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    path = tmp_path / "d.parquet"
    first = write_artifact(sample_table(), path, artifact="dataset")
    with monkeypatch.context() as patch:
        if where == "replace":
            patch.setattr(artifacts.os, "replace", _disk_full)
        else:
            # The writer's close fails too (its flush hits the same full disk), also on the abort path.
            patch.setattr(pq.ParquetWriter, "close", _disk_full)
            if where == "write_table":
                patch.setattr(pq.ParquetWriter, "write_table", _disk_full)
        with pytest.raises(OSError) as info:
            write_artifact(sample_table().slice(0, 2), path, artifact="dataset")
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(OSError):
            with ArtifactWriter(path, sample_table().schema, artifact="dataset") as writer:
                writer.write(sample_table())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.parquet"]  # no temporary file left
    assert read_meta(path).fingerprint == first.fingerprint  # the previous artifact is untouched
    retry = write_artifact(sample_table().slice(0, 2), path, artifact="dataset")  # space freed: a retry works
    assert read_meta(path).fingerprint == retry.fingerprint != first.fingerprint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.parquet"]


def test_writer_that_cannot_open_its_file_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pq.ParquetWriter, "__init__", _disk_full)
    with pytest.raises(OSError):
        write_artifact(sample_table(), tmp_path / "d.parquet", artifact="dataset")
    assert list(tmp_path.iterdir()) == []


def test_public_guard_looks_at_the_batch_before_projecting_it(tmp_path: Path) -> None:
    """A public schema without a credential column must not quietly drop credential = yes rows."""
    public_schema = sample_table().drop_columns(["credential"]).schema
    with pytest.raises(artifacts.CredentialLeakError):
        with ArtifactWriter(tmp_path / "p.parquet", public_schema, artifact="dataset_public", credential="public") as writer:
            writer.write(sample_table("yes"))
    assert list(tmp_path.iterdir()) == []
    # Without credential = "public" asked for, the projected artifact is marked credentialed.
    meta = write_artifact(sample_table("yes"), tmp_path / "c.parquet", artifact="dataset")
    with ArtifactWriter(tmp_path / "q.parquet", public_schema, artifact="dataset") as writer:
        writer.write(sample_table("yes"))
    assert writer.meta is not None and writer.meta.credential == meta.credential == "credentialed"
    # A batch without any yes still writes a public artifact through the projection.
    with ArtifactWriter(tmp_path / "r.parquet", public_schema, artifact="dataset_public", credential="public") as writer:
        writer.write(sample_table("no"))
    assert read_meta(tmp_path / "r.parquet").credential == "public"


@pytest.mark.parametrize("value", [" yes", "yes\n", "YES ", "\tYes\t", "Yes"])
def test_credential_values_are_normalised_like_the_row_reader(tmp_path: Path, value: str) -> None:
    table = sample_table(value)
    with pytest.raises(artifacts.CredentialLeakError):
        write_artifact(table, tmp_path / "p.parquet", artifact="dataset_public", credential="public")
    for variant in (table, table.set_column(6, "credential", table.column("credential").dictionary_encode()),
                    table.set_column(6, "credential", table.column("credential").cast(pa.large_string()))):
        assert write_artifact(variant, tmp_path / "c.parquet", artifact="dataset").credential == "credentialed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet"]


def test_a_boolean_credential_column_counts_too(tmp_path: Path) -> None:
    table = pa.table({"x": [1, 2], "credential": [False, True]})
    with pytest.raises(artifacts.CredentialLeakError):
        write_artifact(table, tmp_path / "p.parquet", artifact="dataset_public", credential="public")
    assert write_artifact(table.slice(0, 1), tmp_path / "p.parquet", artifact="dataset_public", credential="public").credential == "public"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_artifacts_honour_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        write_artifact(sample_table(), tmp_path / "d.parquet", artifact="dataset")
        with ArtifactWriter(tmp_path / "s.parquet", sample_table().schema, artifact="dataset") as writer:
            writer.write(sample_table())
    finally:
        os.umask(old)
    for name in ("d.parquet", "s.parquet"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode, name


def test_a_folder_with_credentialed_provenance_makes_what_is_computed_from_it_credentialed(tmp_path: Path) -> None:
    from medmax_pipeline.core.artifacts import PROVENANCE_FILE, describe_input, read_provenance, write_provenance

    rows = tmp_path / "dataset.parquet"
    write_artifact(pa.table({"text": ["x"], "credential": ["yes"]}), rows, artifact="dataset")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "weights.bin").write_bytes(b"w")
    assert describe_input(adapter)["credential"] == "public"  # no record: a plain folder
    record = write_provenance(adapter, "adapter", inputs=[rows], params={"lr": 1e-4})
    assert record["credential"] == "credentialed" and read_provenance(adapter) == record
    entry = describe_input(adapter)
    assert entry["credential"] == "credentialed" and entry["artifact"] == "adapter"
    predictions = pa.table({"prediction": ["yes"]})
    with pytest.raises(CredentialLeakError):
        write_artifact(predictions, tmp_path / "p.parquet", artifact="predictions", inputs=[adapter], credential="public")
    assert write_artifact(predictions, tmp_path / "p.parquet", artifact="predictions", inputs=[adapter]).credential == "credentialed"
    (adapter / PROVENANCE_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="unreadable provenance record"):
        describe_input(adapter)
