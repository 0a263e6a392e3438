"""benchmarks/assemble_bench.py still runs, at a tiny scale (seconds), and its pandas reference
does the stage's job (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]


def test_assemble_bench_runs_at_a_tiny_scale(tmp_path: Path) -> None:
    work = tmp_path / "bench"
    # --scale 0 gives the bench's least input (10 rows); half credentialed, so both kinds of row are there.
    command = [sys.executable, str(REPO / "benchmarks" / "assemble_bench.py"), "--scale", "0", "--credentialed-share", "0.5",
               "--pandas-rows", "10", "--workers", "2", "--workdir", str(work)]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    results = json.loads("\n".join(lines[lines.index("{"):]))  # the last thing printed: the summary, indented
    assert results["stage_10pct"]["rows"] == 1 and results["stage_100pct"]["rows"] == 10
    assert results["stage_slice"]["rows"] == results["pandas_slice"]["rows"] == 10
    assert all(results[run]["rows_per_s"] > 0 and results[run]["output_mb"] > 0 for run in ("stage_10pct", "stage_100pct", "stage_slice"))
    # The pandas reference builds the same sequences as the stage, credentialed rows included.
    stage = pq.read_table(work / "out_slice" / "dataset.parquet", columns=["credential", "tokens"])
    pandas = pq.read_table(work / "out_pandas" / "dataset_pandas.parquet", columns=["credential", "tokens"])
    assert set(stage.column("credential").to_pylist()) == {"yes", "no"}
    assert stage.column("tokens").to_pylist() == pandas.column("tokens").to_pylist()
