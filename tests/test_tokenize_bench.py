"""benchmarks/tokenize_bench.py still runs (seconds, no timing asserted): a broken import or API
change in the tokenize stage fails here rather than after minutes of a real benchmark."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_tokenize_bench_smoke_run() -> None:
    command = [sys.executable, str(REPO / "benchmarks" / "tokenize_bench.py"), "--images", "2", "--ch", "32",
               "--batch-size", "2", "--workers", "0", "--chunk-size", "2", "--bf16-images", "0"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "codes identical:    True (2 images)" in out
    assert re.search(r"our tokenizer:\s+\d+\.\d+ images/s", out)
    # bf16 convolutions take over a minute per 512 px image on this CPU; tests/test_vqgan.py covers bf16 codes
    assert "bf16 vs fp32:       skipped (--bf16-images 0)" in out
