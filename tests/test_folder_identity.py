"""Folder inputs have a cheap identity: a real change inside a folder makes what was computed from
it stale (inspect says so) and moves the manifest file the rules depend on."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa

from medmax_pipeline.core.artifacts import describe_input, write_artifact
from medmax_pipeline.core.folder_identity import folder_fingerprint, write_manifest_if_changed


def make_checkpoint(root: Path) -> Path:
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "vqgan.yaml").write_text("model:\n  params:\n    embed_dim: 256\n")
    (root / "tokenizer" / "vqgan.ckpt").write_bytes(b"\x00" * 4096)
    return root


def test_every_kind_of_change_changes_the_identity(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt")
    before = folder_fingerprint(ckpt)
    assert folder_fingerprint(ckpt) == before  # nothing changed: same identity

    yaml_file = ckpt / "tokenizer" / "vqgan.yaml"
    stat = yaml_file.stat()
    yaml_file.write_text("model:\n  params:\n    embed_dim: 128\n")  # same size, same time: the content hash sees it
    os.utime(yaml_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after_edit = folder_fingerprint(ckpt)
    assert after_edit != before

    weights = ckpt / "tokenizer" / "vqgan.ckpt"
    weights.write_bytes(b"\x01" * 4096)  # a replaced weight file: same size, new time
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    after_weights = folder_fingerprint(ckpt)
    assert after_weights != after_edit

    (ckpt / "tokenizer" / "extra.png").write_bytes(b"png")  # an added file
    assert folder_fingerprint(ckpt) != after_weights


def test_the_manifest_file_moves_only_when_the_folder_changes(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(b"jpeg")
    manifest = write_manifest_if_changed(images, tmp_path / "manifests" / "images.json")
    first = manifest.stat().st_mtime_ns
    time.sleep(0.01)
    write_manifest_if_changed(images, manifest)
    assert manifest.stat().st_mtime_ns == first  # unchanged folder: the file is left alone
    (images / "b.jpg").write_bytes(b"jpeg2")
    write_manifest_if_changed(images, manifest)
    assert manifest.stat().st_mtime_ns != first and "b.jpg" in manifest.read_text()


def test_inspect_reports_an_artifact_whose_folder_input_changed(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt")
    assert describe_input(ckpt)["fingerprint"] == folder_fingerprint(ckpt)
    out = tmp_path / "tokens.parquet"
    write_artifact(pa.table({"x": [1]}), out, artifact="image_tokens", inputs=[ckpt])

    def inspect() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "medmax_pipeline", "inspect", str(out)], capture_output=True, text=True)

    fresh = inspect()
    assert fresh.returncode == 0 and "stale" not in fresh.stdout
    (ckpt / "tokenizer" / "vqgan.ckpt").write_bytes(b"\x02" * 10)  # replaced weights
    stale = inspect()
    assert stale.returncode == 1
    assert f"{ckpt}: folder public" in stale.stdout and "(changed since: stale)" in stale.stdout
    assert "warning: 1 input(s) changed since" in stale.stdout


def test_a_change_inside_a_folder_input_reruns_what_reads_it(tmp_path: Path) -> None:
    """Demo off, inputs that are the user's own folders: after a run, `snakemake -n` has nothing to
    do; replacing one image or editing vqgan.yaml makes it plan the rules that read them again."""
    import yaml

    from medmax_pipeline.demo import default_paths, generate_demo

    repo = Path(__file__).resolve().parents[1]
    data = tmp_path / "data"
    paths = default_paths(data)
    generate_demo(paths, seed=0, vqgan_channels=32, rows_per_task=1)
    config = yaml.safe_load((repo / "config.yaml").read_text())
    config["demo"]["enabled"] = False
    config.update(checkpoint=str(paths.checkpoint), base_model=None, results_dir=str(tmp_path / "results"))
    config["dataset"] = {"train": str(paths.train), "validation": str(paths.validation)}
    config["images"]["public_root"] = str(paths.public_root)
    config["images"]["credentialed"][0]["root"] = str(paths.credentialed_root)
    config["evaluate"].update(eval_set=str(paths.eval_set), image_root=str(paths.eval_image_root), clip=str(paths.clip),
                              clip_text_tower=str(paths.clip_text_tower))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))

    def snakemake(*args: str) -> str:
        command = [sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "--directory", str(tmp_path),
                   "--cores", "2", "--configfile", str(repo / "config.yaml"), str(tmp_path / "run.yaml"), *args]
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout + result.stderr

    snakemake("--until", "collect")
    idle = snakemake("-n", "--until", "collect")
    assert "Nothing to be done" in idle or re.search(r"^total\s+0$", idle, re.M), idle[-2000:]
    image = sorted(p for p in paths.public_root.rglob("*") if p.is_file() and p.suffix in (".png", ".jpg"))[0]
    image.write_bytes(image.read_bytes() + b"\0")  # a replaced image
    assert "collect" in snakemake("-n", "--until", "tokenize_shard")
    snakemake("--until", "collect")
    yaml_file = paths.checkpoint / "tokenizer" / "vqgan.yaml"
    yaml_file.write_text(yaml_file.read_text() + "\n# edited\n")
    planned = snakemake("-n", "--until", "tokenize_shard")
    assert "tokenize_shard" in planned and "collect " not in planned.split("Job stats:")[-1].split("total")[0]


def test_eval_and_dataset_paths_share_one_syntactic_rule(tmp_path: Path) -> None:
    """core/paths.relative_path_problem serves collect and generation: a NUL byte is refused by
    both (generation used to raise a bare ValueError), and so are absolute and '..' paths."""
    import pytest

    from medmax_pipeline.core.paths import PathEscapeError, confined_path
    from medmax_pipeline.stages.collect import check_relative_path

    for bad in ("a\x00b.png", "/etc/passwd", "C:\\x.png", "sub/../../x.png", "", "."):
        with pytest.raises(PathEscapeError):
            confined_path(tmp_path, bad)
        assert check_relative_path(bad) is not None
    assert confined_path(tmp_path, "c:d.jpg") == (tmp_path / "c:d.jpg").resolve() and check_relative_path("c:d.jpg") is None
