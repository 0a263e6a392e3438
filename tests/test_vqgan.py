"""The VQGAN: parity with an independent re-implementation of Chameleon's ImageTokenizer, the
decoder against an independent taming decoder, the HF layout (our loader and HF's own encoder),
strict loading, and the random checkpoint the demo uses."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from vqgan_fixtures import build_hf_folder, cheap_params, smooth_image, write_checkpoint  # noqa: E402

from medmax_pipeline.models.image_preprocess import load_image_pixels  # noqa: E402
from medmax_pipeline.models.vqgan import (  # noqa: E402
    VQGANLoadError,
    codes_to_pil,
    load_vqgan,
    save_original_checkpoint,
)
from medmax_pipeline.demo_models import make_random_vqgan, random_vqgan  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Reference: the original Chameleon ImageTokenizer written out plainly, on a raw state dict.
# Shares no code with medmax_pipeline (only torch, numpy and PIL).
# ----------------------------------------------------------------------------------------------


def ref_whiten_transparency(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    vals_rgba = np.array(img.convert("RGBA"))
    if not (vals_rgba[:, :, 3] < 255).any():
        return img.convert("RGB")
    alpha = vals_rgba[:, :, 3] / 255.0
    vals_rgb = (1 - alpha[:, :, np.newaxis]) * 255 + alpha[:, :, np.newaxis] * vals_rgba[:, :, :3]
    return Image.fromarray(vals_rgb.astype("uint8"), "RGB")


def ref_vqgan_input_from(img: Image.Image, target_image_size: int = 512) -> torch.Tensor:
    s = min(img.size)
    scale = target_image_size / s
    new_size = (round(scale * img.size[0]), round(scale * img.size[1]))
    img = img.resize(new_size, Image.LANCZOS)
    x0 = (img.width - target_image_size) // 2
    y0 = (img.height - target_image_size) // 2
    img = img.crop((x0, y0, x0 + target_image_size, y0 + target_image_size))
    np_img = np.array(img) / 255.0
    np_img = np_img * 2 - 1
    return torch.from_numpy(np_img).permute(2, 0, 1).float().unsqueeze(0)


def gn(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.group_norm(x, 32, sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)


def conv(sd: dict, name: str, x: torch.Tensor, stride: int = 1, padding: int = 1) -> torch.Tensor:
    return F.conv2d(x, sd[f"{name}.weight"], sd[f"{name}.bias"], stride=stride, padding=padding)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def resnet(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    h = conv(sd, f"{name}.conv1", nonlinearity(gn(sd, f"{name}.norm1", x)))
    h = conv(sd, f"{name}.conv2", nonlinearity(gn(sd, f"{name}.norm2", h)))
    if f"{name}.nin_shortcut.weight" in sd:
        x = conv(sd, f"{name}.nin_shortcut", x, padding=0)
    return x + h


def attn(sd: dict, name: str, x: torch.Tensor) -> torch.Tensor:
    h_ = gn(sd, f"{name}.norm", x)
    q, k, v = (conv(sd, f"{name}.{p}", h_, padding=0) for p in "qkv")
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w).permute(0, 2, 1)
    k = k.reshape(b, c, h * w)
    w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
    w_ = F.softmax(w_, dim=2)
    v = v.reshape(b, c, h * w)
    h_ = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + conv(sd, f"{name}.proj_out", h_, padding=0)


def ref_encode(sd: dict, dd: dict, x: torch.Tensor) -> torch.Tensor:
    levels = len(dd["ch_mult"])
    h = conv(sd, "encoder.conv_in", x)
    for i in range(levels):
        for j in range(dd["num_res_blocks"]):
            h = resnet(sd, f"encoder.down.{i}.block.{j}", h)
            if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
                h = attn(sd, f"encoder.down.{i}.attn.{j}", h)
        if i != levels - 1:
            h = conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1), mode="constant", value=0), stride=2, padding=0)
    h = resnet(sd, "encoder.mid.block_2", attn(sd, "encoder.mid.attn_1", resnet(sd, "encoder.mid.block_1", h)))
    h = conv(sd, "encoder.conv_out", nonlinearity(gn(sd, "encoder.norm_out", h)))
    return conv(sd, "quant_conv", h, padding=0)


def ref_quantize(sd: dict, z: torch.Tensor) -> torch.Tensor:
    # taming VectorQuantizer2.forward: distances by the expansion, argmin
    e = sd["quantize.embedding.weight"]
    z = z.permute(0, 2, 3, 1).contiguous()
    z_flattened = z.view(-1, e.shape[1])
    d = torch.sum(z_flattened**2, dim=1, keepdim=True) + torch.sum(e**2, dim=1) - 2 * torch.einsum("bd,dn->bn", z_flattened, e.t())
    return torch.argmin(d, dim=1).reshape(z.shape[0], -1)


def ref_decode(sd: dict, dd: dict, codes: torch.Tensor) -> torch.Tensor:
    e = sd["quantize.embedding.weight"]
    side = int(round(codes.shape[1] ** 0.5))
    # taming get_codebook_entry: view as (B, H, W, D), permute, contiguous
    z = e[codes].reshape(codes.shape[0], side, side, e.shape[1]).permute(0, 3, 1, 2).contiguous()
    h = conv(sd, "decoder.conv_in", conv(sd, "post_quant_conv", z, padding=0))
    h = resnet(sd, "decoder.mid.block_2", attn(sd, "decoder.mid.attn_1", resnet(sd, "decoder.mid.block_1", h)))
    for i in reversed(range(len(dd["ch_mult"]))):
        for j in range(dd["num_res_blocks"] + 1):
            h = resnet(sd, f"decoder.up.{i}.block.{j}", h)
            if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
                h = attn(sd, f"decoder.up.{i}.attn.{j}", h)
        if i != 0:
            h = conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return conv(sd, "decoder.conv_out", nonlinearity(gn(sd, "decoder.norm_out", h)))


def ref_checkpoint(ckpt_dir: Path) -> tuple[dict, dict]:
    config = yaml.safe_load((ckpt_dir / "tokenizer" / "vqgan.yaml").read_text())
    sd = torch.load(ckpt_dir / "tokenizer" / "vqgan.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    return sd, config["model"]["params"]["ddconfig"]


# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parity_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Weights (seed 101, with attention in the last down level) and images used only here."""
    root = tmp_path_factory.mktemp("parity")
    write_checkpoint(root / "ckpt", seed=101, params=cheap_params(attn_resolutions=[32]))
    rng = np.random.default_rng(2024)
    images = root / "images"
    images.mkdir()
    paths = []
    rgba = np.dstack([smooth_image(rng, 531, 517), smooth_image(rng, 531, 517, 1)])
    Image.fromarray(rgba, "RGBA").save(paths.append(images / "a.png") or paths[-1])
    Image.fromarray(smooth_image(rng, 777, 601)).save(paths.append(images / "b.jpg") or paths[-1], quality=85)
    return {"ckpt": root / "ckpt", "paths": paths}


def test_codes_match_reference_imagetokenizer_bit_for_bit(parity_setup: dict) -> None:
    sd, dd = ref_checkpoint(parity_setup["ckpt"])
    model = load_vqgan(parity_setup["ckpt"])
    with torch.no_grad():
        for path in parity_setup["paths"]:
            ref_pixels = ref_vqgan_input_from(ref_whiten_transparency(Image.open(path)))
            ours = load_image_pixels(path).pixels.unsqueeze(0)
            assert torch.equal(ours, ref_pixels), path
            ref_codes = ref_quantize(sd, ref_encode(sd, dd, ref_pixels))
            codes = model.encode_codes(ours)
            assert codes.shape == (1, 1024) and codes.dtype == torch.int64
            assert torch.equal(codes, ref_codes), f"{path}: {(codes != ref_codes).sum()} codes differ"
            assert codes.unique().numel() > 50  # the spread codebook: many codes per image


def test_decoder_matches_reference_taming_decoder(parity_setup: dict) -> None:
    sd, dd = ref_checkpoint(parity_setup["ckpt"])
    model = load_vqgan(parity_setup["ckpt"])
    codes = torch.randint(0, 8192, (1, 1024), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        pixels = model.decode_codes(codes)
        ref = ref_decode(sd, dd, codes).clamp(-1, 1)
    assert pixels.shape == (1, 3, 512, 512) and pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(pixels, ref), f"max difference {(pixels - ref).abs().max()}"
    # decode -> encode: our composition and the reference composition give the same codes
    with torch.no_grad():
        again = model.encode_codes(pixels)
        ref_again = ref_quantize(sd, ref_encode(sd, dd, ref))
    assert torch.equal(again, ref_again)
    # the decoder output varies across the image (not a constant)
    assert pixels.std() > 0.01


def test_codes_to_pil_matches_chameleon_conversion() -> None:
    pixels = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0, 2.0]).repeat(3, 1).reshape(1, 3, 1, 6)
    (image,) = codes_to_pil(pixels)
    assert image.mode == "RGB" and image.size == (6, 1)
    expected = [int((min(max(v, -1.0), 1.0) + 1.0) / 2.0 * 255) for v in (-1.5, -1.0, 0.0, 0.999, 1.0, 2.0)]
    assert np.array(image)[0, :, 0].tolist() == expected


@pytest.fixture(scope="module")
def hf_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("hf")
    model = write_checkpoint(root / "ckpt", seed=202)
    build_hf_folder(root / "hf", model)
    rng = np.random.default_rng(5)
    pixels = torch.from_numpy(smooth_image(rng, 512, 512) / 255.0 * 2 - 1).permute(2, 0, 1).float().unsqueeze(0)
    return {"ckpt": root / "ckpt", "hf": root / "hf", "pixels": pixels}


def test_original_and_hf_layouts_give_the_same_codes(hf_setup: dict) -> None:
    from transformers import ChameleonForConditionalGeneration

    original = load_vqgan(hf_setup["ckpt"])
    hf_layout = load_vqgan(hf_setup["hf"])
    assert hf_layout.has_decoder is False and original.has_decoder is True
    assert original.encoder_fingerprint() == hf_layout.encoder_fingerprint()
    with torch.no_grad():
        ours = original.encode_codes(hf_setup["pixels"])
        assert torch.equal(hf_layout.encode_codes(hf_setup["pixels"]), ours)
        hf_model = ChameleonForConditionalGeneration.from_pretrained(hf_setup["hf"]).eval()
        hf_codes = hf_model.model.vqmodel.encode(hf_setup["pixels"]).image_tokens.reshape(1, -1)
    assert torch.equal(hf_codes, ours), f"{(hf_codes != ours).sum()} codes differ from HF's ChameleonVQVAE"
    with pytest.raises(RuntimeError, match="no decoder"):
        hf_layout.decode_codes(ours)


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path: Path) -> None:
    model = write_checkpoint(tmp_path / "ok", seed=3)
    ckpt = tmp_path / "ok" / "tokenizer" / "vqgan.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    # loss.* keys (the GAN discriminator in the real checkpoint) are ignored
    torch.save({"state_dict": {**state, "loss.discriminator.main.0.weight": torch.zeros(1)}}, ckpt)
    assert load_vqgan(tmp_path / "ok").encoder_fingerprint() == model.encoder_fingerprint()
    broken = dict(state)
    broken.pop("decoder.conv_out.bias")
    broken["encoder.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": broken}, ckpt)
    with pytest.raises(VQGANLoadError, match=r"missing keys: \[decoder.conv_out.bias\]; unexpected keys: \[encoder.extra.weight\]"):
        load_vqgan(tmp_path / "ok")
    torch.save({"weights": state}, ckpt)
    with pytest.raises(VQGANLoadError, match="under 'state_dict'"):
        load_vqgan(tmp_path / "ok")
    with pytest.raises(VQGANLoadError, match="neither an original checkpoint"):
        load_vqgan(tmp_path)


def test_make_random_vqgan_real_layout_and_save_round_trip(tmp_path: Path) -> None:
    model, config = make_random_vqgan(ch=32, seed=0)
    params = config["model"]["params"]
    assert params["embed_dim"] == 256 and params["n_embed"] == 8192 and "lossconfig" in params
    assert params["ddconfig"] | {"ch": 128} == {
        "double_z": False, "z_channels": 256, "resolution": 512, "in_channels": 3, "out_ch": 3, "ch": 128,
        "ch_mult": [1, 1, 2, 2, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
    }
    save_original_checkpoint(tmp_path / "tokenizer", model, config)
    loaded = load_vqgan(tmp_path)
    assert set(loaded.state_dict()) == set(model.state_dict())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert any(k.startswith("decoder.up.4.block.2.") for k in model.state_dict())  # num_res_blocks + 1 in the decoder
    again, _ = make_random_vqgan(ch=32, seed=0)
    assert again.encoder_fingerprint() == model.encoder_fingerprint()
    assert random_vqgan(cheap_params(), seed=1).encoder_fingerprint() != random_vqgan(cheap_params(), seed=2).encoder_fingerprint()
    pixels = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(11)) * 2 - 1
    codes = loaded.encode_codes(pixels)
    assert codes.shape == (1, 1024) and 0 <= int(codes.min()) and int(codes.max()) < 8192
    assert codes.unique().numel() > 200  # random images use many codes


def test_channel_counts_must_suit_groupnorm() -> None:
    with pytest.raises(VQGANLoadError, match="multiples of 32"):
        make_random_vqgan(ch=16, seed=0)


def test_bf16_changes_some_codes() -> None:
    model = random_vqgan(cheap_params(), seed=9)
    # 256 px, not 512: bf16 convolutions are slow on CPUs without bf16 units, and a 16x16 grid suffices here
    pixels = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(12)) * 2 - 1
    first = model.encode_codes(pixels)
    model_bf16 = random_vqgan(cheap_params(), seed=9).to_bf16_encoder()
    assert model_bf16.dtype == torch.bfloat16 and model_bf16.quantize.embedding.weight.dtype == torch.float32
    changed = (model_bf16.encode_codes(pixels) != first).float().mean().item()
    assert 0 < changed < 1
