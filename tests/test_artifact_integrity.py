"""Every read of an artifact verifies its content fingerprint: flipped bits never become data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medmax_pipeline.cli import main as cli_main
from medmax_pipeline.core import artifacts
from medmax_pipeline.core import constants as C
from medmax_pipeline.core.artifacts import ArtifactError, iter_artifact_batches, read_artifact, write_artifact
from medmax_pipeline.core.sequences import check_image_block

from test_assemble import SOURCE, TEMPLATE, block_for, inputs, run_stage, tokenizer_path  # noqa: F401 (fixtures)

FLIPS = 300


def blocks_table(n: int = 12) -> pa.Table:
    return pa.table({
        "image_key": [f"mimic:files/{i}/d{i}.jpg" for i in range(n)],
        "img_path": [f"/data/mimic/files/{i}/d{i}.jpg" for i in range(n)],
        "credential": ["yes" if i % 2 else "no" for i in range(n)],
        "block": pa.array([block_for(i) for i in range(n)], pa.list_(pa.int32())),
    })


def flipped_copy(source: Path, target: Path, bit: int) -> Path:
    data = bytearray(source.read_bytes())
    data[bit // 8] ^= 1 << (bit % 8)
    target.write_bytes(bytes(data))
    return target


def raw_read(path: Path) -> pa.Table | None:
    """What a reader that trusts the file gets (None when pyarrow itself refuses it)."""
    try:
        return pq.read_table(path)
    except Exception:
        return None


def same_data(table: pa.Table, original: pa.Table) -> bool:
    return table.schema.names == original.schema.names and table.cast(original.schema).equals(original)


def read_through_every_path(path: Path, columns: list[str] | None) -> list[pa.Table]:
    """The data each reader hands over: whole, projected, streamed (to the end, as stages do)."""
    whole = read_artifact(path, "image_blocks", columns=columns)
    streamed = pa.Table.from_batches(list(iter_artifact_batches(path, "image_blocks", batch_size=5, columns=columns)))
    return [whole, streamed]


@pytest.mark.parametrize("with_column_digests", [True, False])
def test_every_bit_flip_that_changes_the_data_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_column_digests: bool) -> None:
    original = blocks_table()
    path = tmp_path / "image_blocks.parquet"
    if not with_column_digests:  # an artifact written before per-column digests: every column is read and hashed
        monkeypatch.setattr(artifacts, "KEY_COLUMN_FINGERPRINTS", "medmax.not_written")
    write_artifact(original, path, artifact="image_blocks")
    monkeypatch.undo()
    assert read_artifact(path, "image_blocks").equals(original)
    bits = np.random.default_rng(20).choice(path.stat().st_size * 8, size=FLIPS, replace=False)
    silently_changed_before = refused = 0
    for bit in bits.tolist():
        bad = flipped_copy(path, tmp_path / f"flip-{bit}.parquet", bit)
        raw = raw_read(bad)
        silently_changed_before += raw is not None and not same_data(raw, original)
        for columns in (None, ["image_key", "block"]):
            expected = original if columns is None else original.select(columns)
            try:
                tables = read_through_every_path(bad, columns)
            except ArtifactError as exc:
                assert str(bad) in str(exc), exc
                refused += 1
                continue
            for table in tables:
                assert same_data(table, expected), f"bit {bit}: changed data read without an error"
        bad.unlink()
    # The old readers took most of these flips as data; the check must be what refuses them.
    assert silently_changed_before > FLIPS // 3
    assert refused >= silently_changed_before


def test_a_damaged_footer_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "image_blocks.parquet"
    write_artifact(blocks_table(), path, artifact="image_blocks")
    data = path.read_bytes()
    lineage_at = data.rindex(b'{"inputs"')
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(data[:lineage_at] + b"[" + data[lineage_at + 1:])  # the lineage JSON no longer parses
    with pytest.raises(ArtifactError, match="broken.parquet: damaged footer"):
        read_artifact(broken, "image_blocks")
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="truncated.parquet"):
        read_artifact(truncated, "image_blocks")


def test_a_missing_column_is_named(tmp_path: Path) -> None:
    path = tmp_path / "image_blocks.parquet"
    write_artifact(blocks_table().rename_columns(["key", "img_path", "credential", "block"]), path, artifact="image_blocks")
    with pytest.raises(ArtifactError, match="has no column.s. image_key"):
        read_artifact(path, "image_blocks", columns=["image_key", "block"])


def flip_one_code(path: Path, tmp_path: Path) -> Path:
    """A copy of image_blocks PATH in which one bit flip changed one image code to another valid
    code, the file still reading cleanly: what a trusting reader takes as data."""
    original = pq.read_table(path)
    size = path.stat().st_size
    for bit in np.random.default_rng(5).permutation(size * 8).tolist():
        bad = flipped_copy(path, tmp_path / "flipped.parquet", bit)
        raw = raw_read(bad)
        if raw is None or raw.num_rows != original.num_rows or raw.column("image_key") != original.column("image_key"):
            continue
        changed = raw.column("block") != original.column("block")
        blocks = [np.asarray(b, dtype=np.int64) for b in raw.column("block").to_pylist()]
        if changed and all(check_image_block(b) is None for b in blocks):
            return bad
    raise AssertionError("no single bit flip changes one code into another valid code")


def test_a_flipped_code_in_image_blocks_stops_assembly(inputs, tmp_path: Path, capsys) -> None:  # noqa: F811
    bad = flip_one_code(inputs["image_blocks"], tmp_path)
    out = tmp_path / "out"
    with pytest.raises(ArtifactError, match=f"{bad}: content does not match the fingerprint"):
        run_stage({**inputs, "image_blocks": bad}, out)
    assert not (out / "dataset.parquet").exists() and not (out / "dataset_public.parquet").exists()
    assert not list(out.glob(".*.tmp")) if out.exists() else True
    status = cli_main([
        "assemble", "--rows", str(inputs["rows"]), "--split", "train", "--output-dir", str(out),
        "--tokenizer", str(inputs["tokenizer_path"]), "--image-blocks", str(bad),
        "--path-problems", str(inputs["path_problems"]), "--token-errors", str(inputs["token_errors"]),
        "--credentialed", f"{SOURCE}=/data/mimic={TEMPLATE}", "--max-error-fraction", "0.5",
    ])
    err = capsys.readouterr().err
    assert status == 1 and f"error: {bad}: content does not match" in err and "Traceback" not in err
