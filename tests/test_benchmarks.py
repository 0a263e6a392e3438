"""The benchmark scripts still run and measure what they say (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import child_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def test_chameleon_7b_preset_has_the_7b_shape() -> None:
    """Built on the meta device (no memory): the MFU figures are computed on the real shape."""
    import train_bench

    shape, seq = train_bench.PRESETS["chameleon-7b"]
    model = train_bench.build_model(shape, torch.bfloat16, torch.device("meta"))
    language_params = sum(p.numel() for name, p in model.named_parameters() if "vqmodel" not in name)
    assert 6.9e9 < language_params < 7.1e9  # Chameleon-7B: 7.0B without the VQ-VAE
    assert seq == 2048 and shape.vocab == 65536
    # Decoder linears and lm_head: everything but the embedding table and the norms.
    assert train_bench.matmul_params(model) == language_params - 65536 * 4096 - sum(
        p.numel() for name, p in model.named_parameters() if "vqmodel" not in name and "norm" in name
    )


def test_train_bench_runs_both_engines_on_the_same_step(tmp_path: Path) -> None:
    out = tmp_path / "train_bench.json"
    command = [sys.executable, str(REPO / "benchmarks" / "train_bench.py"), "--preset", "cpu-tiny", "--engines", "torch,deepspeed",
               "--steps", "2", "--warmup-steps", "1", "--json", str(out)]
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "deepspeed / torch tokens/s" in done.stdout
    figures = json.loads(out.read_text())
    torch_run, ds_run = figures["engines"]
    assert (torch_run["engine"], ds_run["engine"]) == ("torch", "deepspeed")
    assert torch_run["lora_params"] == ds_run["lora_params"] > 0
    assert all(r["tokens_per_s"] > 0 for r in (torch_run, ds_run))
    # Same seed, same rows, same recipe: the engines compute the same training.
    assert ds_run["loss"] == pytest.approx(torch_run["loss"], rel=1e-5)
