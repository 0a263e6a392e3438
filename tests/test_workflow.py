"""The whole workflow on the embedded demo, through Snakemake, as README line 1 runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from medmax_pipeline.core.artifacts import ARTIFACT_SCHEMA_VERSIONS, read_artifact, read_meta

REPO = Path(__file__).resolve().parent.parent
REQUIRED_KEYS = {"medmax.artifact", "medmax.schema_version", "medmax.fingerprint", "medmax.lineage", "medmax.credential", "medmax.pipeline_version"}

pytestmark = pytest.mark.slow


def snakemake(workdir: Path, *args: str, configfiles: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir), "--cores", "2"]
    # The default config (the demo) with its relative paths resolved inside `workdir`, plus overlays.
    command += ["--configfile", str(REPO / "config.yaml"), *map(str, configfiles)]
    return subprocess.run([*command, *args], capture_output=True, text=True, cwd=workdir)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    workdir = tmp_path_factory.mktemp("workflow")
    result = snakemake(workdir)
    if result.returncode != 0:
        logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "results" / "logs").rglob("*.log")))
        pytest.fail(f"snakemake failed:\n{result.stderr[-4000:]}\n{logs}")
    return workdir


def test_every_parquet_is_an_artifact_with_the_footer_metadata(run_dir: Path) -> None:
    parquets = sorted((run_dir / "results").rglob("*.parquet"))
    assert len(parquets) >= 15
    for path in parquets:
        kv = {k.decode() for k in (pq.read_metadata(path).metadata or {})}
        assert REQUIRED_KEYS <= kv, f"{path} lacks {REQUIRED_KEYS - kv}"
        meta = read_meta(path)
        assert meta.schema_version == ARTIFACT_SCHEMA_VERSIONS[meta.artifact]


def test_public_export_has_no_credentialed_row_and_dataset_has_every_fillable_one(run_dir: Path) -> None:
    for split in ("train", "validation"):
        public = read_artifact(run_dir / f"results/assemble/{split}/dataset_public.parquet", "dataset_public")
        assert read_meta(run_dir / f"results/assemble/{split}/dataset_public.parquet").credential == "public"
        assert set(public.column("credential").to_pylist()) == {"no"}
        dataset = read_artifact(run_dir / f"results/assemble/{split}/dataset.parquet", "dataset")
        problems = read_artifact(run_dir / f"results/assemble/{split}/dataset_problems.parquet", "dataset_problems")
        credentialed_rows = [r for r in dataset.to_pylist() if r["credential"] == "yes"]
        if split == "train":
            assert credentialed_rows, "no credentialed row was filled"
            assert read_meta(run_dir / f"results/assemble/{split}/dataset.parquet").credential == "credentialed"
        assert all(r["tokens"][0] == 0 and 8197 in r["tokens"] for r in credentialed_rows)
        reasons = " ".join(problems.column("reason").to_pylist())
        if split == "train":
            assert "bad JSON" in reasons


def test_broken_credentialed_images_are_reported_not_tokenized(run_dir: Path) -> None:
    errors = read_artifact(run_dir / "results/tokenize/image_token_errors.parquet", "image_token_errors")
    assert errors.num_rows == 3
    problems = read_artifact(run_dir / "results/collect/image_path_problems.parquet", "image_path_problems")
    assert any("missing" in r for r in problems.column("reason").to_pylist())


def test_rerun_does_nothing(run_dir: Path) -> None:
    result = snakemake(run_dir, "-n")
    assert result.returncode == 0, result.stderr
    assert "Nothing to be done" in result.stdout + result.stderr


def test_changing_the_shard_count_reruns_tokenization_onward_only(run_dir: Path, tmp_path: Path) -> None:
    overlay = tmp_path / "shards.yaml"
    overlay.write_text(yaml.safe_dump({"tokenize": {"num_shards": 3}}))
    result = snakemake(run_dir, "-n", configfiles=(overlay,))
    assert result.returncode == 0, result.stderr
    plan = result.stdout + result.stderr
    jobs = {line.split()[0] for line in plan.split("Job stats:")[1].splitlines()[3:] if line.strip() and not line.startswith("total")}
    assert {"tokenize_shard", "gather_tokens"} <= jobs
    assert "collect" not in jobs and "demo" not in jobs


def test_report_renders(run_dir: Path) -> None:
    result = snakemake(run_dir, "--report", "report.html")
    assert result.returncode == 0, result.stderr
    html = (run_dir / "report.html").read_text()
    assert "Evaluation" in html and "loss curve" in html.lower()
