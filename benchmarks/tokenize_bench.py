"""Stage 2 benchmark: our tokenizer (DataLoader workers + batching + resumable chunks) against a
naive serial loop (one image at a time, decoded in the main process, like the public script),
on the same images and weights; checks both give identical codes, and counts the codes bf16
changes. With a GPU: encoder images/s at full size (ch 128, random weights) and the fraction of
the compute bound (554 GFLOP per 512x512 image against --peak-tflops).

    python benchmarks/tokenize_bench.py [--images 12] [--ch 32] [--batch-size 4] [--workers 2]
                                        [--peak-tflops 989] [--gpu-batch 16] [--gpu-iters 5]
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medmax_pipeline.core.artifacts import read_artifact
from medmax_pipeline.models.image_preprocess import load_image_pixels
from medmax_pipeline.stages.tokenize_images import prepare_vqgan, tokenize_shard
from medmax_pipeline.demo_models import make_random_vqgan
from medmax_pipeline.models.vqgan import load_vqgan, save_original_checkpoint

ENCODER_GFLOP_PER_IMAGE = 554.0  # MEDMAX-FACTS, measured with FlopCounterMode at ch 128


def make_images(folder: Path, count: int, seed: int) -> list[Path]:
    """JPEGs of typical dataset sizes (about 1000x800), smooth structure plus noise."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        width, height = int(rng.integers(700, 1300)), int(rng.integers(600, 1100))
        y, x = np.mgrid[0:height, 0:width]
        channels = [
            127 + 100 * np.sin(rng.uniform(0.002, 0.03) * x + rng.uniform(0.002, 0.03) * y) + rng.normal(0, 15, (height, width))
            for _ in range(3)
        ]
        image = Image.fromarray(np.clip(np.dstack(channels), 0, 255).astype(np.uint8))
        path = folder / f"img{i:04d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def naive_serial(model: torch.nn.Module, paths: list[Path]) -> list[list[int]]:
    codes = []
    with torch.inference_mode():
        for path in paths:
            pixels = load_image_pixels(path).pixels.unsqueeze(0)
            codes.append(model.encode_codes(pixels)[0].tolist())
    return codes


def cpu_benchmark(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = make_images(root / "images", args.images, seed=1)
        model, config = make_random_vqgan(ch=args.ch, seed=0)
        save_original_checkpoint(root / "ckpt" / "tokenizer", model, config)
        csv_path = root / "img_paths.csv"
        with open(csv_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["img_path"])
            writer.writerows([[str(p)] for p in paths])

        loaded = load_vqgan(root / "ckpt")
        started = time.perf_counter()
        naive_codes = naive_serial(loaded, paths)
        naive_s = time.perf_counter() - started

        started = time.perf_counter()
        result = tokenize_shard(
            csv_path, root / "out", root / "ckpt", batch_size=args.batch_size, workers=args.workers,
            chunk_size=args.chunk_size, progress=False,
        )
        ours_s = time.perf_counter() - started
        table = read_artifact(result.tokens_path, "image_tokens")
        ours = dict(zip(table.column("img_path").to_pylist(), table.column("img_tokens").to_pylist()))
        identical = all(ours[str(p)] == c for p, c in zip(paths, naive_codes))

        print(f"CPU, {torch.get_num_threads()} torch threads, VQGAN ch {args.ch} (real layout otherwise), {len(paths)} JPEGs ~1000x800")
        print(f"  naive serial loop:  {len(paths) / naive_s:7.3f} images/s ({naive_s:.1f} s)")
        print(f"  our tokenizer:      {len(paths) / ours_s:7.3f} images/s ({ours_s:.1f} s, batch {args.batch_size}, "
              f"{args.workers} workers, incl. model load and parquet writes)")
        print(f"  ratio ours / naive: {naive_s / ours_s:7.2f}x")
        print(f"  codes identical:    {identical} ({len(ours)} images)")

        if args.bf16_images == 0:
            print("  bf16 vs fp32:       skipped (--bf16-images 0)")
        else:
            print_bf16_code_changes(root / "ckpt", loaded, paths[: args.bf16_images])
        if not identical:
            sys.exit("codes differ between the naive loop and our tokenizer")


def print_bf16_code_changes(ckpt: Path, fp32_model: torch.nn.Module, paths: list[Path]) -> None:
    subset = torch.stack([load_image_pixels(p).pixels for p in paths])
    model_bf16 = prepare_vqgan(ckpt, device="cpu", precision="bf16")  # the stage's own bf16 model
    with torch.inference_mode():
        fp32 = fp32_model.encode_codes(subset)
        bf16 = model_bf16.encode_codes(subset)
    changed = (fp32 != bf16).float().mean().item()
    print(f"  bf16 vs fp32:       {changed * 100:.1f}% of codes differ ({subset.shape[0]} images, random weights)")


def gpu_benchmark(args: argparse.Namespace) -> None:
    from medmax_pipeline.stages.tokenize_images import set_cuda_precision

    model, _ = make_random_vqgan(ch=128, seed=0)
    model = model.cuda().eval()
    pixels = torch.rand(args.gpu_batch, 3, 512, 512, generator=torch.Generator().manual_seed(0)).mul(2).sub(1).cuda()
    print(f"GPU {torch.cuda.get_device_name()}, VQGAN ch 128 (full size, random weights), batch {args.gpu_batch}")
    reference = None
    for precision in ("fp32", "tf32", "bf16"):
        set_cuda_precision(precision)
        run = model
        if precision == "bf16":
            run = make_random_vqgan(ch=128, seed=0)[0].to_bf16_encoder().cuda().eval()
        with torch.inference_mode():
            codes = run.encode_codes(pixels)  # warm-up
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(args.gpu_iters):
                codes = run.encode_codes(pixels)
            torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
        rate = args.gpu_batch * args.gpu_iters / elapsed
        fraction = rate * ENCODER_GFLOP_PER_IMAGE / (args.peak_tflops * 1000)
        if reference is None:
            reference = codes
        changed = (codes != reference).float().mean().item()
        print(f"  {precision}: {rate:8.1f} images/s, {fraction * 100:5.1f}% of {args.peak_tflops} TFLOP/s; "
              f"codes differing from fp32: {changed * 100:.2f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--ch", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=64)
    parser.add_argument("--bf16-images", type=int, default=2,
                        help="images to encode in bf16 and fp32 to count changed codes; 0 skips (bf16 is slow on most CPUs)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="peak dense TFLOP/s of the GPU for the bound (H100 SXM bf16: 989)")
    parser.add_argument("--gpu-batch", type=int, default=16)
    parser.add_argument("--gpu-iters", type=int, default=5)
    parser.add_argument("--skip-cpu", action="store_true")
    args = parser.parse_args()
    if args.bf16_images < 0:
        parser.error(f"--bf16-images must be 0 or more, got {args.bf16_images}")
    if not args.skip_cpu:
        cpu_benchmark(args)
    if torch.cuda.is_available():
        gpu_benchmark(args)
    else:
        print("no CUDA device: GPU figures skipped")


if __name__ == "__main__":
    main()
