"""Throughput and peak memory of the stage-5 LoRA training step, with random weights.

    python benchmarks/train_bench.py --preset cpu-small            # CPU, small Chameleon, fp32
    python benchmarks/train_bench.py --preset chameleon-7b         # one GPU, Chameleon-7B shape, bf16

    python benchmarks/train_bench.py --preset cpu-small --engines torch,deepspeed   # side by side

The step is the one medmax_pipeline.stages.train runs (collate -> forward with image logits allowed ->
token-summed cross entropy on response tokens -> backward -> clip -> AdamW), on plain torch
and/or on the DeepSpeed ZeRO-2 engine of workflow/deepspeed/zero2.json in a world of one (ZeRO-2
shards optimizer state across GPUs; one GPU's arithmetic is the same). Each engine gets a fresh
model built from the same seed; they run one after the other in the same process.

Model FLOPs utilisation (MFU). N = parameters that do matrix multiplies per token: every
decoder linear (q, k, v, o, gate, up, down) plus lm_head; the embedding is a lookup and the
VQ-VAE is idle on pre-tokenized data, so neither counts. With LoRA the base is frozen, so the
backward pass computes activation gradients (as costly as the forward) but no base weight
gradients:
    forward            2 N + 2 L s d          (L layers, s sequence length, d hidden; causal
                                              attention scores and values: 4 L s d halved)
    backward           2 N + 4 L s d          (activation grads; attention backward ~ 2x forward)
    LoRA weight grads  2 N_lora (+ 4 N_lora forward/backward through the adapters)
    model FLOPs/token = 4 N + 6 L s d + 6 N_lora
MFU = tokens/s x model FLOPs/token / peak bf16 dense FLOP/s of the device (H100/H200 SXM:
989 TFLOP/s). Recomputation by gradient checkpointing is not counted (it is hardware, not model,
FLOPs). For comparison with full-finetuning numbers we also print the "6N" convention
(6 N + 12 L s d per token), which overstates the work a LoRA step actually needs by ~1.5x.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medmax_pipeline.core import constants as C  # noqa: E402
from medmax_pipeline.demo_models import tiny_vq_config  # noqa: E402
from medmax_pipeline.models.chameleon import allow_image_logits, check_image_logits  # noqa: E402
from medmax_pipeline.core.text_tokenizer import layout_tokens  # noqa: E402
from medmax_pipeline.stages.train import (  # noqa: E402
    DEFAULT_TARGET_MODULES,
    collate,
    init_deepspeed,
    label_token_count as _label_tokens,
    resolve_deepspeed_config,
    token_loss_sum as _token_loss_sum,
)

ZERO2 = Path(__file__).resolve().parents[1] / "workflow" / "deepspeed" / "zero2.json"

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = C.VOCAB_SIZE


PRESETS = {
    "cpu-tiny": (Shape(64, 2, 4, 128, 8864), 256),
    "cpu-small": (Shape(256, 4, 8, 688), 512),
    "chameleon-7b": (Shape(4096, 32, 32, 11008), 2048),
}


def build_model(shape: Shape, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocab_map = {name: i for i, name in enumerate(layout_tokens(modified=True))}
    config = ChameleonConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=4096, vocabulary_map=vocab_map, vq_config=tiny_vq_config(),
        bos_token_id=C.BOS_ID, pad_token_id=C.PAD_ID, eos_token_id=C.EOS_ID,
    )
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype on the target device
    try:
        with device:
            model = ChameleonForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def matmul_params(model: torch.nn.Module) -> int:
    """Weights of decoder linears and lm_head (base weights only, LoRA excluded)."""
    total = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "vqmodel" not in name and "lora_" not in name:
            total += module.weight.numel()
    return total


def measure(engine: str, args: argparse.Namespace, shape: Shape, seq: int, device: torch.device, precision: str) -> dict:
    """Median step time and memory of one engine on a fresh model."""
    from peft import LoraConfig, get_peft_model

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(shape, dtype, device)
    model.config.use_cache = False
    allow_image_logits(model)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_matmul = matmul_params(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.05, target_modules=list(DEFAULT_TARGET_MODULES), task_type="CAUSAL_LM"))
    check_image_logits(model)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    forward = model
    ds_engine = None
    if engine == "deepspeed":
        import deepspeed

        init_deepspeed(device)
        config = resolve_deepspeed_config(ZERO2, micro_batch_size=args.batch_size, grad_accum=1, world_size=1, bf16=precision == "bf16", max_grad_norm=1.0)
        ds_engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        forward = ds_engine
    model.train()

    # Random rows of exactly `seq` ids: a text prompt, an image block, the separator, a response.
    gen = torch.Generator().manual_seed(0)
    half = seq // 2
    rows = []
    for _ in range(args.batch_size):
        text = torch.randint(8800, shape.vocab, (seq,), generator=gen).tolist()
        image = [C.BEGIN_IMAGE_ID, *torch.randint(4, 8196, (min(1024, max(half - 3, 0)),), generator=gen).tolist(), C.END_IMAGE_ID]
        row = ([C.BOS_ID] + image + text)[: half - 1] + [C.SEPARATOR_ID] + text[: seq - half]
        rows.append(row[:seq])
    batch = collate(rows)
    labels = _label_tokens(batch)

    def step() -> float:
        out = forward(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
        loss = _token_loss_sum(out.logits, batch["labels"]) / labels
        if ds_engine is not None:
            ds_engine.backward(loss)
            ds_engine.step()  # clips (gradient_clipping) and steps AdamW
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(args.warmup_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step()  # float() synchronises
        times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    tokens_per_s = args.batch_size * seq / step_s
    flops_lora = 4 * n_matmul + 6 * shape.layers * seq * shape.hidden + 6 * n_lora
    flops_6n = 6 * n_matmul + 12 * shape.layers * seq * shape.hidden
    result = {
        "engine": engine, "matmul_params": n_matmul, "lora_params": n_lora,
        "median_step_s": step_s, "tokens_per_s": tokens_per_s, "loss": loss,
        "model_tflops_per_s": tokens_per_s * flops_lora / 1e12,
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
        if peak:
            result["peak_tflops"] = peak
            result["mfu_lora"] = tokens_per_s * flops_lora / (peak * 1e12)
            result["mfu_6n_convention"] = tokens_per_s * flops_6n / (peak * 1e12)
    else:
        # ru_maxrss is KiB on Linux: the process's peak so far, imports and earlier engines included.
        result["process_peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return result  # the model and engine go with this frame, before the next engine is built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--engines", default="torch", help="comma-separated: torch, deepspeed")
    parser.add_argument("--seq-len", type=int, help="default: the preset's")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--peak-tflops", type=float, help="device peak bf16 dense TFLOP/s for MFU (default: by GPU name)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not engines or set(engines) - {"torch", "deepspeed"}:
        parser.error(f"--engines {args.engines!r}: choose from torch, deepspeed")

    shape, default_seq = PRESETS[args.preset]
    seq = args.seq_len or default_seq
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    header = {
        "preset": args.preset, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "precision": precision, "seq_len": seq, "batch_size": args.batch_size,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    for key, value in header.items():
        print(f"{key:24s} {value}")
    results = []
    for engine in engines:
        result = measure(engine, args, shape, seq, device, precision)
        results.append(result)
        print()
        for key, value in result.items():
            print(f"{key:24s} {value:.4g}" if isinstance(value, float) else f"{key:24s} {value}")
    if len(results) == 2:
        ratio = results[1]["tokens_per_s"] / results[0]["tokens_per_s"]
        print(f"\n{engines[1]} / {engines[0]} tokens/s  {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps({**header, "engines": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
