"""Memory of `medmax convert-checkpoint`: peak RSS against the bytes of weights it converts.

Writes a random checkpoint in the original layout (real key names, q/k norms, rope.freqs, bf16
as released) in one process, then converts it in a fresh process that records its RSS right
before the conversion (interpreter + torch + transformers) and its peak (ru_maxrss) after.
Prints peak RSS / weight bytes (target: at most 1.3, i.e. about one copy of the weights) and the
same ratio for the growth over the pre-conversion RSS.

    python benchmarks/convert_bench.py                      # 7B width (4096, 32 heads, 11008, 65536), 1 layer: 1.5 GB
    python benchmarks/convert_bench.py --preset 7b-narrow   # head size 128, dim 2048, 4 layers: 0.95 GB
    python benchmarks/convert_bench.py --preset tiny        # seconds; what the test suite runs
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# preset -> OriginalParams fields (vocab_size 65536 as the 7B; head size 128 as the 7B in all but tiny)
PRESETS = {
    "7b-width": {"dim": 4096, "n_layers": 1, "n_heads": 32, "n_kv_heads": 32, "vocab_size": 65536},
    "7b-narrow": {"dim": 2048, "n_layers": 4, "n_heads": 16, "n_kv_heads": 16, "vocab_size": 65536},
    "tiny": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 65536},
}


def make_checkpoint(root: Path, fields: dict, seed: int = 0) -> None:
    """Random original-format checkpoint: tokenizer + small VQGAN + bf16 consolidated.pth."""
    import torch

    from medmax_pipeline.core.text_tokenizer import build_chameleon_tokenizer
    from medmax_pipeline.models import chameleon_original as O
    from medmax_pipeline.demo_models import make_random_vqgan
    from medmax_pipeline.models.vqgan import save_original_checkpoint

    rng = random.Random(seed)
    words = ["lung", "heart", "opacity", "effusion", "normal", "chest", "shows", "the", "no", "yes"]
    build_chameleon_tokenizer(root / "tokenizer", [" ".join(rng.choice(words) for _ in range(10)) for _ in range(100)], text_vocab_size=100)
    vqgan, document = make_random_vqgan(ch=32, seed=seed)
    save_original_checkpoint(root / "tokenizer", vqgan, document)
    p = O.OriginalParams(**fields)
    O.write_original_model(root / O.MODEL_SUBDIR, O.random_original_state(p, seed=seed, dtype=torch.bfloat16), p)


def vm_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def convert_and_measure(checkpoint: Path, output: Path) -> dict:
    """In this (fresh) process: RSS before, convert, peak RSS after."""
    import transformers  # noqa: F401  (imported before measuring: the baseline includes the libraries)

    from medmax_pipeline.stages.convert_checkpoint import convert_checkpoint

    before = vm_rss_bytes()
    start = time.perf_counter()
    record = convert_checkpoint(checkpoint, output)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "weight_bytes": record["weight_bytes"],
        "rss_before_bytes": before,
        "peak_rss_bytes": peak,
        "seconds": seconds,
        "logits_max_abs_diff": record["logits_check"]["max_abs_diff"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7b-width")
    parser.add_argument("--workdir", type=Path, help="where the checkpoint and HF folder go (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--child", nargs=2, metavar=("CHECKPOINT", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(convert_and_measure(Path(args.child[0]), Path(args.child[1]))))
        return 0
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        make = [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO / 'benchmarks')!r}); import convert_bench as b; "
                f"b.make_checkpoint(__import__('pathlib').Path({str(root / 'ckpt')!r}), {PRESETS[args.preset]!r})"]
        subprocess.run(make, check=True)
        print(f"made a random {args.preset} checkpoint in {time.perf_counter() - start:.1f} s")
        done = subprocess.run([sys.executable, __file__, "--child", str(root / "ckpt"), str(root / "hf")], check=True, capture_output=True, text=True)
        figures = {"preset": args.preset, **json.loads(done.stdout.strip().splitlines()[-1])}
    w, peak, before = figures["weight_bytes"], figures["peak_rss_bytes"], figures["rss_before_bytes"]
    figures["peak_rss_over_weights"] = peak / w
    figures["rss_growth_over_weights"] = (peak - before) / w
    print(f"weights {w / 1e9:.3f} GB, RSS before conversion {before / 1e9:.3f} GB, peak RSS {peak / 1e9:.3f} GB, {figures['seconds']:.1f} s")
    print(f"peak RSS / weight bytes: {figures['peak_rss_over_weights']:.3f} (target <= 1.3); "
          f"(peak - before) / weight bytes: {figures['rss_growth_over_weights']:.3f}")
    print(f"logits check max |diff|: {figures['logits_max_abs_diff']:.3g}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
