"""The shipped SLURM profiles, planned with `snakemake -n --workflow-profile ...` (no cluster
needed): every rule planned, each job's request from the profile and the config, and every
request fitting an ordinary node (the check the workflow runs against sinfo before submitting)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medmax_pipeline.core.slurm import JobRequest, gpus_in_gres, parse_sinfo_nodes, requests_that_do_not_fit

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "workflow" / "profiles"
JOB_RULES = {"demo", "convert_checkpoint", "collect", "tokenize_shard", "assemble", "train", "export", "generate", "clip_scores"}
LOCAL_RULES = {"deepspeed_config", "gather_tokens", "map_vocab", "score", "report_figures"}
# An ordinary CPU node (2 cores, 8 GB) and a GPU partition of two 8-GPU nodes.
SMALL_CPU_NODE = "node1 cpu* 2 8000 (null)\n"
GPU_CLUSTER = "cpu01 cpu* 32 128000 (null)\ngpu01 gpu 32 500000 gpu:8\ngpu02 gpu 32 500000 gpu:8\n"


def dry_run(workdir: Path, profile: str, *configfiles: Path) -> str:
    """The profile's plan. The slurm executor's dry run prints no threads (--cpus-per-task), so the
    plan is printed by the local executor with many cores: the same jobs, resources and threads.
    One --configfile with every file: a second --configfile flag would replace the first."""
    command = [
        sys.executable, "-m", "snakemake", "-n", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
        "--workflow-profile", str(PROFILES / profile), "--configfile", str(REPO / "config.yaml"), *map(str, configfiles),
        "--executor", "local", "--cores", "64",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def planned_jobs(plan: str) -> list[dict]:
    """Each job of a dry run: rule, resources (key -> text), threads and shell command."""
    jobs = []
    for block in re.split(r"\n(?=rule \w+:\n)", plan):
        head = re.match(r"rule (\w+):\n", block)
        if not head:
            continue
        resources = re.search(r"^    resources: (.*)$", block, re.M)
        threads = re.search(r"^    threads: (\d+)$", block, re.M)
        shell = re.search(r"^Shell command: (.*)$", block, re.M)
        jobs.append({
            "rule": head.group(1),
            "resources": dict(item.split("=", 1) for item in resources.group(1).split(", ")) if resources else {},
            "threads": int(threads.group(1)) if threads else 1,
            "shell": shell.group(1) if shell else "",
        })
    return jobs


def job_requests(jobs: list[dict]) -> list[JobRequest]:
    """The same request the workflow's SLURM check builds from a job (workflow/rules/slurm.smk)."""
    out = []
    for job in jobs:
        if job["rule"] in LOCAL_RULES or job["rule"] == "all":
            continue
        r = job["resources"]
        nodes = int(r.get("nodes", 1))
        gpus = gpus_in_gres(r.get("gres", "")) or -(-int(r.get("gpu", 0)) // nodes)
        out.append(JobRequest(job["rule"], r.get("slurm_partition"), int(r.get("cpus_per_task", job["threads"])), int(r["mem_mb"]), gpus, nodes))
    return out


def test_cpu_profile_plans_every_rule_within_a_small_node(tmp_path: Path) -> None:
    jobs = planned_jobs(dry_run(tmp_path, "slurm-cpu"))
    assert {j["rule"] for j in jobs} == JOB_RULES | LOCAL_RULES | {"all"}
    for job in jobs:
        if job["rule"] in JOB_RULES:
            r = job["resources"]
            assert r["slurm_account"] == "your_account" and r["slurm_partition"] == "cpu", job
            assert int(r["mem_mb"]) <= 4000 and int(r["runtime"]) <= 60, job
            assert int(r.get("gpu", 0)) == 0 and "gres" not in r, job
    train = next(j for j in jobs if j["rule"] == "train")
    assert int(train["resources"]["mem_mb"]) == 4000  # not the schema's 64000
    assert requests_that_do_not_fit(job_requests(jobs), parse_sinfo_nodes(SMALL_CPU_NODE), "cpu") == []


@pytest.mark.parametrize("profile", ["slurm-cpu", "slurm-gpu"])
def test_profiles_choose_the_status_command_and_poll_early(profile: str) -> None:
    settings = yaml.safe_load((PROFILES / profile / "config.yaml").read_text())
    assert settings["executor"] == "slurm"
    assert settings["slurm-status-command"] == "sacct"  # explicit: the executor's own default depends on the machine
    assert settings["slurm-init-seconds-before-status-checks"] <= 10
    # The comment tells clusters without accounting what to change.
    assert "replace\n# sacct by squeue" in (PROFILES / profile / "config.yaml").read_text()


def test_gpu_profile_puts_the_gpu_rules_on_gpus(tmp_path: Path) -> None:
    jobs = planned_jobs(dry_run(tmp_path, "slurm-gpu", PROFILES / "slurm-gpu" / "demo-on-gpus.yaml"))
    assert {j["rule"] for j in jobs} == JOB_RULES | LOCAL_RULES | {"all"}
    by_rule = {}
    for job in jobs:
        by_rule.setdefault(job["rule"], []).append(job)
    for rule in ("tokenize_shard", "train", "generate"):
        for job in by_rule[rule]:
            assert job["resources"]["slurm_partition"] == "gpu" and int(job["resources"]["gpu"]) == 1, job
    for rule in ("demo", "collect", "assemble", "export", "clip_scores"):
        assert all(j["resources"]["slurm_partition"] == "cpu" and int(j["resources"].get("gpu", 0)) == 0 for j in by_rule[rule])
    assert "--standalone --nproc-per-node 1" in by_rule["train"][0]["shell"]
    assert requests_that_do_not_fit(job_requests(jobs), parse_sinfo_nodes(GPU_CLUSTER), "cpu") == []


def test_multi_node_training_asks_for_nodes_and_starts_one_torchrun_per_node(tmp_path: Path) -> None:
    overlay = tmp_path / "two-nodes.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"gpus": 8, "nodes": 2, "mem_mb": 64000}, "evaluate": {"device": "cuda"}}))
    jobs = planned_jobs(dry_run(tmp_path, "slurm-gpu", overlay))
    (train,) = [j for j in jobs if j["rule"] == "train"]
    r = train["resources"]
    assert (r["slurm_partition"], r["nodes"], r["tasks"], r["gres"], r["gpu"], r["mpi"]) == ("gpu", "2", "2", "gpu:8", "0", "srun")
    assert train["shell"].startswith(
        "srun --nodes 2 --ntasks 2 --ntasks-per-node 1 --cpus-per-task 2 --kill-on-bad-exit=1 --gres gpu:8 "
    )
    assert " -m medmax_pipeline train-node --nproc-per-node 8 -- train --dataset " in train["shell"]
    (request,) = [q for q in job_requests(jobs) if q.rule == "train"]
    assert (request.nodes, request.gpus_per_node) == (2, 8)
    assert requests_that_do_not_fit([request], parse_sinfo_nodes(GPU_CLUSTER), "cpu") == []
    (too_many,) = requests_that_do_not_fit([request], parse_sinfo_nodes(GPU_CLUSTER.replace("gpu02 gpu 32 500000 gpu:8\n", "")), "cpu")
    assert too_many.startswith("rule train asks for 2 node(s) each with 2 CPU(s), 64000 MB, 8 GPU(s) on partition 'gpu'")


def test_multi_node_training_outside_slurm_is_refused_before_any_job(tmp_path: Path) -> None:
    overlay = tmp_path / "two-nodes.yaml"
    overlay.write_text(yaml.safe_dump({"train": {"nodes": 2}}))
    command = [sys.executable, "-m", "snakemake", "--cores", "1", "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path),
               "--configfile", str(REPO / "config.yaml"), str(overlay)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode != 0
    assert "train.nodes is 2: training across nodes runs under SLURM (srun)" in result.stderr
    assert not (tmp_path / "results").exists()  # not even the demo ran
