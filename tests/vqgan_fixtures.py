"""Small random VQGAN checkpoints and images for the preprocessing, VQGAN and tokenize tests.

Imported explicitly by the tests (not a conftest). A 512x512 encode at the real layout costs
seconds on CPU, so tests use a cheaper layout with the same key structure and the same 32x32
grid: ch 32 (GroupNorm(32) needs multiples of 32), five levels of ch_mult 1, one res block,
32 latent channels; 8192 codes as in the real model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medmax_pipeline.demo_models import random_vqgan
from medmax_pipeline.models.vqgan import VQGAN, real_vqgan_params, save_original_checkpoint, vqgan_yaml_dict


def cheap_params(latent: int = 32, attn_resolutions: list[int] | None = None) -> dict[str, Any]:
    params = real_vqgan_params(ch=32)
    params["embed_dim"] = latent
    params["ddconfig"].update(
        ch_mult=[1, 1, 1, 1, 1], num_res_blocks=1, z_channels=latent, attn_resolutions=attn_resolutions or []
    )
    return params


def write_checkpoint(ckpt_dir: Path, seed: int, params: dict[str, Any] | None = None) -> VQGAN:
    """<ckpt_dir>/tokenizer/vqgan.yaml + vqgan.ckpt with random weights; returns the model."""
    params = params or cheap_params()
    model = random_vqgan(params, seed)
    save_original_checkpoint(Path(ckpt_dir) / "tokenizer", model, vqgan_yaml_dict(params))
    return model


def build_hf_folder(folder: Path, model: VQGAN) -> Path:
    """An HF ChameleonForConditionalGeneration folder (tiny text model) holding `model`'s encoder half."""
    import torch
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from medmax_pipeline.models.vqgan import hf_vq_config

    vocabulary_map = {f"IMGIMG{''.join(chr(ord('A') + int(d)) for d in str(i))}Z": i + 4 for i in range(16)}
    vocabulary_map["<image>"] = 8711
    config = ChameleonConfig(
        vocab_size=8712, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, vq_config=hf_vq_config(model.params), vocabulary_map=vocabulary_map,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        hf_model = ChameleonForConditionalGeneration(config)
    vq_state = {k: v for k, v in model.state_dict().items() if not k.startswith("decoder.")}
    hf_model.model.vqmodel.load_state_dict(vq_state, strict=True)
    hf_model.save_pretrained(folder)
    return Path(folder)


def smooth_image(rng: np.random.Generator, width: int, height: int, channels: int = 3) -> np.ndarray:
    """uint8 image of smooth structure plus noise (so codes vary across the grid)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    out = np.empty((height, width, channels), np.uint8)
    for c in range(channels):
        fx, fy, phase = rng.uniform(0.002, 0.05), rng.uniform(0.002, 0.05), rng.uniform(0, 6.3)
        wave = 127.5 + 100 * np.sin(fx * x + fy * y + phase) + rng.normal(0, 20, (height, width))
        out[:, :, c] = np.clip(wave, 0, 255).astype(np.uint8)
    return out if channels > 1 else out[:, :, 0]


def write_images(folder: Path, seed: int, count: int) -> list[Path]:
    """`count` valid images of varied size, mode and format."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    kinds = ["rgb_png", "jpeg", "rgba_png", "gray_png", "palette_png", "gray16_png"]
    for i in range(count):
        width, height = int(rng.integers(300, 700)), int(rng.integers(300, 700))
        kind = kinds[i % len(kinds)]
        if kind == "rgb_png":
            path = folder / f"img{i:03d}.png"
            Image.fromarray(smooth_image(rng, width, height)).save(path)
        elif kind == "jpeg":
            path = folder / f"img{i:03d}.jpg"
            Image.fromarray(smooth_image(rng, width, height)).save(path, quality=90)
        elif kind == "rgba_png":
            path = folder / f"img{i:03d}.png"
            rgba = np.dstack([smooth_image(rng, width, height), smooth_image(rng, width, height, 1)])
            Image.fromarray(rgba, "RGBA").save(path)
        elif kind == "gray_png":
            path = folder / f"img{i:03d}.png"
            Image.fromarray(smooth_image(rng, width, height, 1), "L").save(path)
        elif kind == "palette_png":
            path = folder / f"img{i:03d}.png"
            Image.fromarray(smooth_image(rng, width, height)).quantize(64).save(path)
        else:
            path = folder / f"img{i:03d}.png"
            Image.fromarray(smooth_image(rng, width, height, 1).astype(np.uint16) * 250).save(path)
        paths.append(path)
    return paths
