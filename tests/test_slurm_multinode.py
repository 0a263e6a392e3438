"""Multi-node training as far as one host allows: two `medmax train-node` processes, each given
the environment srun gives the task on one of two nodes (SLURM_JOB_NODELIST, SLURM_NODEID, ...),
each start their own torchrun (--nnodes 2, c10d rendezvous on the first node of the list) and
train the tiny model as one world of two ranks over gloo, DeepSpeed ZeRO-2 across both. The
second job runs on another "node set" (the list reversed: the other node hosts the rendezvous,
another job id) and resumes from the checkpoint the first left in the shared output folder.

Not run here: two real hosts, srun itself starting the tasks, NCCL on GPUs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_train import REPO, base_dir, text_rows, write_dataset  # noqa: E402,F401  (base_dir: the fixture)

from medmax_pipeline.core.artifacts import read_artifact  # noqa: E402

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def node_env(job_id: int, nodelist: str, node_id: int, port: int) -> dict[str, str]:
    """What srun sets in the task on node `node_id` (and nothing torchrun would set)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") and not k.startswith("SLURM_")}
    return {
        **env, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "MEDMAX_RDZV_PORT": str(port),
        "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_NODELIST": nodelist,
        "SLURM_NNODES": "2", "SLURM_STEP_NUM_NODES": "2", "SLURM_NODEID": str(node_id), "SLURM_PROCID": str(node_id),
    }


def two_node_job(job_id: int, nodelist: str, train_args: list[str]) -> list[subprocess.CompletedProcess]:
    port = free_port()
    command = [sys.executable, "-m", "medmax_pipeline", "train-node", "--nproc-per-node", "1", "--", "train", *train_args]
    nodes = [subprocess.Popen(command, env=node_env(job_id, nodelist, i, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    results = []
    for process in nodes:
        out, err = process.communicate(timeout=600)
        results.append(subprocess.CompletedProcess(command, process.returncode, out, err))
    return results


def test_two_nodes_train_as_one_world_and_resume_on_another_node_set(base_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    dataset = write_dataset(tmp_path / "d.parquet", text_rows(8), text_rows(3, seed=1))
    out = tmp_path / "shared-results" / "train"
    train_args = [
        "--dataset", str(dataset), "--eval-dataset", str(dataset), "--base-model", str(base_dir), "--output", str(out),
        "--device", "cpu", "--deepspeed", str(REPO / "workflow" / "deepspeed" / "zero2.json"), "--no-progress",
        "--lr", "1e-2", "--epochs", "3", "--batch-size", "2", "--lora-dropout", "0", "--save-every", "2", "--keep-checkpoints", "0",
    ]
    first = two_node_job(101, "127.0.0.1,localhost", [*train_args, "--stop-after-step", "3"])
    for node, result in enumerate(first):
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"medmax train-node: node {node} of 2 (127.0.0.1,localhost), 1 process(es), rendezvous 127.0.0.1:" in result.stderr
    (run_folder,) = (out / "checkpoints").iterdir()
    step2 = run_folder / "step-2"
    # One RNG file per rank of the world of two; the adapter and state written once (rank 0).
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors", "adapter", "trainer_state.json", "engine"} <= {p.name for p in step2.iterdir()}
    assert not (out / "adapter").exists()

    # Another allocation: other job id, the nodes listed the other way round (localhost hosts the rendezvous).
    second = two_node_job(202, "localhost,127.0.0.1", train_args)
    for result in second:
        assert result.returncode == 0, result.stderr[-3000:]
    log = second[0].stderr + second[1].stderr
    assert "rendezvous localhost:" in log
    assert "resumed from" in log and "(step 2 of 6)" in log
    run_config = json.loads((out / "adapter" / "medmax_provenance.json").read_text())["run_config"]
    assert (run_config["engine"], run_config["world_size"]) == ("deepspeed", 2)
    steps = read_artifact(out / "train_metrics.parquet", columns=["step"]).column("step").to_pylist()
    assert steps == [1, 2, 3, 4, 5, 6]
