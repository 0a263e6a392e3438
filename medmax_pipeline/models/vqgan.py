"""Chameleon's VQGAN (taming-transformers architecture and parameter names), loaders and savers.

Parameter names are taming's: encoder.*, decoder.*, quant_conv.*, post_quant_conv.*,
quantize.embedding.weight, so the original <ckpt>/tokenizer/vqgan.ckpt loads strictly (its
loss.* keys, the GAN discriminator and perceptual loss, are ignored).

    encode_codes: encoder -> quant_conv -> nearest codebook entry -> codes [B, (H/16)*(W/16)]
    decode_codes: codebook entries -> post_quant_conv -> decoder -> pixels in [-1, 1]

The nearest entry is argmin of z^2 + e^2 - 2 z.e, the expansion the original VectorQuantizer2
(and HF's ChameleonVQVAEVectorQuantizer) computes, so near-ties resolve as they do there.

Two checkpoint layouts load (load_vqgan detects which):
- original: <ckpt>/tokenizer/vqgan.yaml (model.params) + vqgan.ckpt ({"state_dict": ...});
- HF: a ChameleonForConditionalGeneration folder (config.json with vq_config, safetensors with
  model.vqmodel.* keys). It holds the encoder half only: decode_codes refuses there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from medmax_pipeline.core.constants import IMAGE_SIZE, NUM_IMAGE_CODES, VQGAN_CKPT, VQGAN_YAML

DDCONFIG_KEYS = (
    "double_z", "z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult",
    "num_res_blocks", "attn_resolutions", "dropout",
)
# HF ChameleonVQVAEConfig key -> taming key (model.params or ddconfig)
HF_TO_TAMING_CONFIG = {
    "embed_dim": "embed_dim",
    "num_embeddings": "n_embed",
    "double_latent": "double_z",
    "latent_channels": "z_channels",
    "resolution": "resolution",
    "in_channels": "in_channels",
    "base_channels": "ch",
    "channel_multiplier": "ch_mult",
    "num_res_blocks": "num_res_blocks",
    "attn_resolutions": "attn_resolutions",
    "dropout": "dropout",
}
HF_VQ_PREFIXES = ("model.vqmodel.", "vqmodel.")
GROUP_NORM_GROUPS = 32  # taming's Normalize: channel counts must be multiples of 32


class VQGANLoadError(Exception):
    """A VQGAN checkpoint folder is missing files, has the wrong keys or an unusable config."""


# ----------------------------------------------------------------------------------------------
# Building blocks (taming.modules.diffusionmodules.model)
# ----------------------------------------------------------------------------------------------


def normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=GROUP_NORM_GROUPS, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, height, width = q.shape
        q = q.reshape(b, c, height * width).permute(0, 2, 1)
        k = k.reshape(b, c, height * width)
        weights = torch.bmm(q, k) * (int(c) ** (-0.5))
        weights = F.softmax(weights, dim=2)
        v = v.reshape(b, c, height * width)
        h = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, height, width)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))  # taming's asymmetric pad


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(
        self, *, ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
        dropout: float, in_channels: int, resolution: int, z_channels: int, double_z: bool, **_: Any,
    ) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1,) + tuple(ch_mult)
        current_resolution = resolution
        self.down = nn.ModuleList()
        block_in = ch
        for level in range(self.num_resolutions):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_in = ch * in_ch_mult[level]
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            down = nn.Module()
            down.block, down.attn = blocks, attns
            if level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in)
                current_resolution //= 2
            self.down.append(down)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in range(self.num_resolutions):
            down = self.down[level]
            for i in range(self.num_res_blocks):
                h = down.block[i](h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            if level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(
        self, *, ch: int, out_ch: int, ch_mult: Sequence[int], num_res_blocks: int, attn_resolutions: Sequence[int],
        dropout: float, resolution: int, z_channels: int, **_: Any,
    ) -> None:
        super().__init__()
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        block_in = ch * ch_mult[-1]
        current_resolution = resolution // 2 ** (self.num_resolutions - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.up = nn.ModuleList()
        for level in reversed(range(self.num_resolutions)):
            blocks, attns = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            up = nn.Module()
            up.block, up.attn = blocks, attns
            if level != 0:
                up.upsample = Upsample(block_in)
                current_resolution *= 2
            self.up.insert(0, up)  # taming prepends, so up[level] matches down[level]
        self.norm_out = normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            for i in range(self.num_res_blocks + 1):
                h = up.block[i](h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if level != 0:
                h = up.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.n_embed, self.embed_dim = n_embed, embed_dim
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D, H, W] -> codes [B, H*W] (raster order), computed in float32."""
        b, d, height, width = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d).float()
        weight = self.embedding.weight.float()
        distances = (
            torch.sum(flat**2, dim=1, keepdim=True)
            + torch.sum(weight**2, dim=1)
            - 2 * torch.einsum("bd,dn->bn", flat, weight.t())
        )
        return torch.argmin(distances, dim=1).reshape(b, height * width)

    def entries(self, codes: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """codes [B, H*W] -> codebook entries [B, D, H, W]."""
        return self.embedding(codes).reshape(codes.shape[0], height, width, self.embed_dim).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


def check_vqgan_params(params: Mapping[str, Any], source: str = "vqgan config") -> dict[str, Any]:
    """Validate taming `model.params` (embed_dim, n_embed, ddconfig{...}); returns a clean copy."""
    missing = [k for k in ("embed_dim", "n_embed", "ddconfig") if k not in params]
    if missing:
        raise VQGANLoadError(f"{source}: model.params lacks {', '.join(missing)}")
    dd = params["ddconfig"]
    missing = [k for k in DDCONFIG_KEYS if k not in dd]
    if missing:
        raise VQGANLoadError(f"{source}: ddconfig lacks {', '.join(missing)}")
    ddconfig = {k: dd[k] for k in DDCONFIG_KEYS}
    ddconfig["ch_mult"] = [int(m) for m in ddconfig["ch_mult"]]
    ddconfig["attn_resolutions"] = [int(r) for r in (ddconfig["attn_resolutions"] or [])]
    channels = [ddconfig["ch"]] + [ddconfig["ch"] * m for m in ddconfig["ch_mult"]]
    bad = sorted({c for c in channels if c % GROUP_NORM_GROUPS})
    if bad:
        raise VQGANLoadError(
            f"{source}: channel counts {bad} (ch {ddconfig['ch']} x ch_mult {ddconfig['ch_mult']}) are not multiples "
            f"of {GROUP_NORM_GROUPS}, which taming's GroupNorm(32) needs"
        )
    return {"embed_dim": int(params["embed_dim"]), "n_embed": int(params["n_embed"]), "ddconfig": ddconfig}


class VQGAN(nn.Module):
    """taming VQModel (encoder, decoder, quant_conv, post_quant_conv, quantize) without the loss."""

    def __init__(self, params: Mapping[str, Any], has_decoder: bool = True) -> None:
        super().__init__()
        self.params = check_vqgan_params(params)
        dd = self.params["ddconfig"]
        embed_dim, n_embed = self.params["embed_dim"], self.params["n_embed"]
        self.downsample_factor = 2 ** (len(dd["ch_mult"]) - 1)
        self.encoder = Encoder(**dd)
        self.has_decoder = has_decoder
        if has_decoder:
            self.decoder = Decoder(**dd)
        self.quantize = VectorQuantizer(n_embed, embed_dim)
        self.quant_conv = nn.Conv2d(dd["z_channels"], embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, dd["z_channels"], 1)
        self.source = "<in memory>"
        self.eval()

    @property
    def n_embed(self) -> int:
        return self.params["n_embed"]

    @property
    def device(self) -> torch.device:
        return self.quantize.embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def to_bf16_encoder(self) -> "VQGAN":
        """In place: convolutions in bfloat16, nearest-code search in float32 (tokenize --precision bf16)."""
        self.to(torch.bfloat16)
        self.quantize.float()  # bf16 distances would tie many codes; the argmin stays in fp32
        return self

    @torch.no_grad()
    def encode_latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, H, W] in [-1, 1] -> quant_conv output [B, embed_dim, H/16, W/16]."""
        if pixels.ndim != 4 or pixels.shape[1] != self.params["ddconfig"]["in_channels"]:
            raise ValueError(f"expected pixels [B, {self.params['ddconfig']['in_channels']}, H, W], got {tuple(pixels.shape)}")
        if pixels.shape[2] % self.downsample_factor or pixels.shape[3] % self.downsample_factor:
            raise ValueError(f"image height and width must be multiples of {self.downsample_factor}, got {tuple(pixels.shape)}")
        return self.quant_conv(self.encoder(pixels.to(device=self.device, dtype=self.dtype)))

    @torch.no_grad()
    def encode_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [B, 3, 512, 512] in [-1, 1] -> int64 codes [B, 1024] in raster order of the 32x32 grid."""
        return self.quantize.nearest_codes(self.encode_latents(pixels))

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor, height: int | None = None, width: int | None = None) -> torch.Tensor:
        """codes [B, 1024] -> float32 pixels [B, 3, 512, 512] clamped to [-1, 1] (square grid by default)."""
        if not self.has_decoder:
            raise RuntimeError(
                f"{self.source}: this VQGAN has no decoder (an HF-format Chameleon folder holds the encoder half only); "
                "load the original <ckpt>/tokenizer/vqgan.ckpt to decode image tokens"
            )
        if codes.ndim != 2:
            raise ValueError(f"expected codes [B, N], got {tuple(codes.shape)}")
        if height is None or width is None:
            side = math.isqrt(codes.shape[1])
            if side * side != codes.shape[1]:
                raise ValueError(f"{codes.shape[1]} codes do not form a square grid; pass height and width")
            height = width = side
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.n_embed):
            raise ValueError(f"codes must lie in [0, {self.n_embed - 1}], got {int(codes.min())}..{int(codes.max())}")
        entries = self.quantize.entries(codes.to(self.device).long(), height, width).to(self.dtype)
        pixels = self.decoder(self.post_quant_conv(entries))
        return pixels.float().clamp(-1.0, 1.0)

    def encoder_fingerprint(self) -> str:
        """Hash of the config and the tensors codes depend on (encoder, quant_conv, quantize).

        Independent of the checkpoint layout, so the original and the HF copy of the same weights agree.
        """
        h = hashlib.blake2b(digest_size=32)
        h.update(json.dumps(self.params, sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            if name.startswith(("encoder.", "quant_conv.", "quantize.")):
                t = tensor.detach().to("cpu", torch.float32).contiguous()
                h.update(f"{name} {tuple(t.shape)}\n".encode())
                h.update(t.numpy().tobytes())
        return "blake2b:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Pixels -> PIL (Chameleon's _pil_from_chw_tensor)
# ----------------------------------------------------------------------------------------------


def encode_image_files(model: VQGAN, paths: Sequence[str | Path], batch_size: int = 4) -> list[list[int]]:
    """Codes of image files, in order, with the exact Chameleon preprocessing; one batch at a time.

    A file that cannot become pixels raises preprocess.ImageDecodeError naming it.
    """
    from medmax_pipeline.models.image_preprocess import load_image_pixels

    codes: list[list[int]] = []
    for start in range(0, len(paths), batch_size):
        pixels = torch.stack([load_image_pixels(p).pixels for p in paths[start : start + batch_size]])
        with torch.no_grad():
            codes += model.encode_codes(pixels.to(model.device, model.dtype)).tolist()
    return codes


def codes_to_pil(pixels: torch.Tensor) -> list[Image.Image]:
    """Decoded pixels [B, 3, H, W] in [-1, 1] -> RGB images: ((clamp(x) + 1) / 2 * 255) truncated to uint8."""
    if pixels.ndim == 3:
        pixels = pixels.unsqueeze(0)
    if pixels.ndim != 4 or pixels.shape[1] != 3:
        raise ValueError(f"expected pixels [B, 3, H, W], got {tuple(pixels.shape)}")
    unit = (torch.clamp(pixels.detach().float().cpu(), -1.0, 1.0) + 1.0) / 2.0
    arrays = (unit.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    return [Image.fromarray(a, "RGB") for a in arrays]


# ----------------------------------------------------------------------------------------------
# Loading and saving
# ----------------------------------------------------------------------------------------------


def _check_keys(model: VQGAN, state: Mapping[str, torch.Tensor], source: str, expected_prefixes: Sequence[str] | None = None) -> None:
    expected = set(model.state_dict())
    if expected_prefixes is not None:
        expected = {k for k in expected if k.startswith(tuple(expected_prefixes))}
    found = set(state)
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:20]) + (f" ... ({len(keys)} in all)" if len(keys) > 20 else "")
        raise VQGANLoadError(
            f"{source}: state dict does not match the config; missing keys: [{show(missing)}]; "
            f"unexpected keys: [{show(unexpected)}]"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in model.state_dict().items() if k in state and state[k].shape != v.shape
    ]
    if wrong:
        raise VQGANLoadError(f"{source}: tensor shapes do not match the config: {'; '.join(wrong[:10])}")


def original_checkpoint_files(ckpt_dir: str | Path) -> tuple[Path, Path] | None:
    """(vqgan.yaml, vqgan.ckpt) of a checkpoint folder (or of its tokenizer/ folder), if both exist."""
    ckpt_dir = Path(ckpt_dir)
    for folder in (ckpt_dir / "tokenizer", ckpt_dir):
        if (folder / VQGAN_YAML).is_file() and (folder / VQGAN_CKPT).is_file():
            return folder / VQGAN_YAML, folder / VQGAN_CKPT
    return None


def load_original_vqgan(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> VQGAN:
    """Load <ckpt>/tokenizer/vqgan.yaml + vqgan.ckpt (taming layout; loss.* keys ignored, the rest strict)."""
    files = original_checkpoint_files(ckpt_dir)
    if files is None:
        raise VQGANLoadError(f"{ckpt_dir}: no tokenizer/{VQGAN_YAML} and tokenizer/{VQGAN_CKPT}")
    yaml_path, ckpt_path = files
    try:
        config = yaml.safe_load(yaml_path.read_text())
        params = config["model"]["params"]
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise VQGANLoadError(f"{yaml_path}: not a taming vqgan config with model.params ({exc})") from None
    model = VQGAN(check_vqgan_params(params, str(yaml_path)))
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for damaged or unsafe pickles
        raise VQGANLoadError(f"{ckpt_path}: cannot load with torch.load(weights_only=True): {exc}") from None
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint:
        raise VQGANLoadError(f"{ckpt_path}: expected a dict with the weights under 'state_dict'")
    state = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("loss.")}
    _check_keys(model, state, str(ckpt_path))
    model.load_state_dict(state, strict=True)
    model.source = str(ckpt_path)
    return model.to(device).eval()


def _hf_weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({folder / name for key, name in weight_map.items() if key.startswith(HF_VQ_PREFIXES)})
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(folder.glob("*.safetensors"))


def taming_params_from_hf(vq_config: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """HF ChameleonVQVAEConfig dict -> taming model.params."""
    missing = [k for k in HF_TO_TAMING_CONFIG if k not in vq_config]
    if missing:
        raise VQGANLoadError(f"{source}: vq_config lacks {', '.join(missing)}")
    if vq_config.get("attn_type", "vanilla") != "vanilla":
        raise VQGANLoadError(f"{source}: vq_config attn_type {vq_config.get('attn_type')!r} is not supported (only 'vanilla')")
    taming = {HF_TO_TAMING_CONFIG[k]: vq_config[k] for k in HF_TO_TAMING_CONFIG}
    dd = {k: taming[k] for k in DDCONFIG_KEYS if k in taming}
    dd["out_ch"] = vq_config.get("out_channels", vq_config["in_channels"])
    return {"embed_dim": taming["embed_dim"], "n_embed": taming["n_embed"], "ddconfig": dd}


def load_hf_vqgan(folder: str | Path, device: str | torch.device = "cpu") -> VQGAN:
    """Load the VQGAN encoder half of an HF ChameleonForConditionalGeneration folder (no decoder)."""
    from safetensors import safe_open

    folder = Path(folder)
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VQGANLoadError(f"{config_path}: cannot read ({exc})") from None
    if "vq_config" not in config:
        raise VQGANLoadError(f"{config_path}: no vq_config (not a Chameleon model folder)")
    params = taming_params_from_hf(config["vq_config"], str(config_path))
    model = VQGAN(check_vqgan_params(params, str(config_path)), has_decoder=False)
    state: dict[str, torch.Tensor] = {}
    files = _hf_weight_files(folder)
    if not files:
        raise VQGANLoadError(f"{folder}: no safetensors weight files")
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                for prefix in HF_VQ_PREFIXES:
                    if key.startswith(prefix):
                        state[key[len(prefix):]] = f.get_tensor(key)
                        break
    prefixes = ["encoder.", "quant_conv.", "quantize."] + (["post_quant_conv."] if any(k.startswith("post_quant_conv.") for k in state) else [])
    _check_keys(model, state, f"{folder} (model.vqmodel.*)", expected_prefixes=prefixes)
    model.load_state_dict(state, strict=False)
    model.source = str(folder)
    return model.to(device).eval()


def load_vqgan(ckpt_dir: str | Path, device: str | torch.device = "cpu") -> VQGAN:
    """Load a VQGAN from an original checkpoint folder (tokenizer/vqgan.yaml + vqgan.ckpt) or an HF Chameleon folder."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise VQGANLoadError(f"{ckpt_dir}: checkpoint folder does not exist")
    if original_checkpoint_files(ckpt_dir) is not None:
        return load_original_vqgan(ckpt_dir, device)
    if (ckpt_dir / "config.json").is_file():
        return load_hf_vqgan(ckpt_dir, device)
    raise VQGANLoadError(
        f"{ckpt_dir}: neither an original checkpoint (tokenizer/{VQGAN_YAML} + {VQGAN_CKPT}) "
        "nor an HF Chameleon folder (config.json + safetensors)"
    )


def vqgan_yaml_dict(params: Mapping[str, Any]) -> dict[str, Any]:
    """The vqgan.yaml document for model.params, with the lossconfig the original carries."""
    return {
        "model": {
            "target": "taming.models.vqgan.VQModel",
            "params": {
                **copy.deepcopy(dict(params)),
                "lossconfig": {"target": "taming.modules.losses.vqperceptual.DummyLoss"},
            },
        }
    }


def save_original_checkpoint(folder: str | Path, model: VQGAN, config: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write folder/vqgan.yaml (config: the yaml document) and folder/vqgan.ckpt ({"state_dict": ...})."""
    if not model.has_decoder:
        raise ValueError("cannot write an original-layout checkpoint from an encoder-only VQGAN")
    params = config.get("model", {}).get("params") if isinstance(config.get("model"), Mapping) else None
    if params is None:
        raise ValueError("config must be the vqgan.yaml document: {'model': {'params': {...}}}")
    if check_vqgan_params(params) != model.params:
        raise ValueError("config model.params do not describe this model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    yaml_path, ckpt_path = folder / VQGAN_YAML, folder / VQGAN_CKPT
    yaml_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    tmp = ckpt_path.with_name(ckpt_path.name + ".tmp")
    torch.save({"state_dict": state}, tmp)
    tmp.replace(ckpt_path)
    return yaml_path, ckpt_path


def real_vqgan_params(ch: int = 128) -> dict[str, Any]:
    """The published model.params (ch 128); a smaller ch keeps the 512 -> 32x32 geometry."""
    return {
        "embed_dim": 256,
        "n_embed": NUM_IMAGE_CODES,
        "ddconfig": {
            "double_z": False, "z_channels": 256, "resolution": IMAGE_SIZE, "in_channels": 3, "out_ch": 3,
            "ch": ch, "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
        },
    }


def state_dict_for_hf(model: VQGAN, prefix: str = "model.vqmodel.") -> dict[str, torch.Tensor]:
    """The encoder-half tensors under HF ChameleonForConditionalGeneration names (for building HF folders)."""
    return {
        prefix + k: v.detach().cpu().contiguous()
        for k, v in model.state_dict().items()
        if k.startswith(("encoder.", "quant_conv.", "quantize.", "post_quant_conv."))
    }


def hf_vq_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """taming model.params -> HF ChameleonVQVAEConfig keyword arguments."""
    taming_to_hf = {v: k for k, v in HF_TO_TAMING_CONFIG.items()}
    flat = {"embed_dim": params["embed_dim"], "n_embed": params["n_embed"], **params["ddconfig"]}
    return {taming_to_hf[k]: v for k, v in flat.items() if k in taming_to_hf}
