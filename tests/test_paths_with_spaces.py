"""Paths with spaces (and quotes) reach every rule's command as one shell word (issue 11 item 5)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def snakemake(workdir: Path, config: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "--directory", str(workdir),
               "--cores", "2", "--configfile", str(REPO / "config.yaml"), str(config), *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=workdir)


def test_a_results_dir_with_a_space_is_one_word_in_every_command(tmp_path: Path) -> None:
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    demo = yaml.safe_load((REPO / "config.yaml").read_text())
    overlay = {"results_dir": "res dir"}
    # The demo's paths follow the results folder (the demo may write only inside it).
    for key in ("checkpoint",):
        overlay[key] = demo[key].replace("results/", "res dir/", 1)
    overlay["dataset"] = {k: v.replace("results/", "res dir/", 1) for k, v in demo["dataset"].items()}
    overlay["images"] = {**demo["images"], "public_root": demo["images"]["public_root"].replace("results/", "res dir/", 1),
                         "credentialed": [{**e, "root": e["root"].replace("results/", "res dir/", 1)} for e in demo["images"]["credentialed"]]}
    overlay["evaluate"] = {k: demo["evaluate"][k].replace("results/", "res dir/", 1) for k in ("eval_set", "image_root", "clip", "clip_text_tower")}
    config = tmp_path / "spaces.yaml"
    config.write_text(yaml.safe_dump(overlay))

    plan = snakemake(workdir, config, "-n", "-p", "--forceall")
    assert plan.returncode == 0, plan.stdout[-3000:] + plan.stderr[-3000:]
    commands = [line.split("Shell command: ", 1)[1] for line in (plan.stdout + plan.stderr).splitlines() if "Shell command: " in line]
    assert len(commands) >= 12
    for command in commands:
        words = shlex.split(command)
        assert "res" not in words and not any(w.startswith("dir/") for w in words), command

    run = snakemake(workdir, config, "--until", "collect")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (workdir / "res dir" / "collect" / "image_paths.parquet").is_file()
    assert not (workdir / "res").exists()  # no stray file from an unquoted `> {log}`
