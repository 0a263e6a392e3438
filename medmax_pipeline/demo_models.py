"""The demo's and the tests' small random models, in the real on-disk layouts.

A tiny HF Chameleon folder (`build_tiny_chameleon`), a random VQGAN with the published layout
but few channels (`make_random_vqgan`) and a tiny random BiomedCLIP (`make_random_biomedclip`).
They are built with the loaders' own model classes, so the demo and the tests run the real
loading paths; nothing in core/, models/ or the stages imports this module.
"""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.file_modes import honour_umask
from medmax_pipeline.models.chameleon import check_model_vocabulary
from medmax_pipeline.models.clip import (
    BIOMEDCLIP_TEXT_TOWER,
    CONFIG_NAME,
    OPENAI_MEAN,
    OPENAI_STD,
    PUBLIC_CONTEXT_LENGTH,
    WEIGHT_NAMES,
    _open_clip,
    _text_cfg_with_tower,
)
from medmax_pipeline.models.vqgan import VQGAN, check_vqgan_params, real_vqgan_params, vqgan_yaml_dict

# ----------------------------------------------------------------------------------------------
# A tiny HF Chameleon
# ----------------------------------------------------------------------------------------------


def tiny_vq_config() -> dict[str, Any]:
    """A VQ-VAE config with the real code count (8192) and 32x32 grid but few channels (ch 32)."""
    return {
        "embed_dim": 8,
        "num_embeddings": C.NUM_IMAGE_CODES,
        "double_latent": False,
        "latent_channels": 8,
        "resolution": C.IMAGE_SIZE,
        "in_channels": 3,
        "base_channels": 32,  # GroupNorm(32 groups) needs a multiple of 32
        "channel_multiplier": [1, 1, 2, 2, 4],  # 4 downsamplings: 512 / 16 = 32 codes per side
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def build_tiny_chameleon(
    out_dir: str | Path,
    vocabulary_map: Mapping[str, int],
    seed: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int | None = None,
    max_position_embeddings: int = 4096,
    tokenizer_json: str | Path | None = None,
    initializer_range: float = 0.02,
) -> Path:
    """Save a random ChameleonForConditionalGeneration in HF layout and return its folder.

    The weights depend only on `seed` and the sizes. vocab_size defaults to the smallest that
    holds every id of `vocabulary_map`. `tokenizer_json` (a HF tokenizers file) is copied in as
    tokenizer.json so the folder is as complete as the HF Anole copy. initializer_range is the
    std of the random weights; with HF's 0.02 a 64-wide model's logits span only about +-1, so
    tests that need a model able to fit data fast pass a larger one.
    """
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    vocab = {str(k): int(v) for k, v in vocabulary_map.items()}
    needed = max(vocab.values()) + 1
    vocab_size = needed if vocab_size is None else vocab_size
    check_model_vocabulary(vocab, vocab_size, source="build_tiny_chameleon(vocabulary_map)")
    config = ChameleonConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=C.BOS_ID,
        pad_token_id=C.PAD_ID,
        eos_token_id=C.EOS_ID,
        vocabulary_map=vocab,
        vq_config=tiny_vq_config(),
        tie_word_embeddings=False,
        initializer_range=initializer_range,
    )
    config.architectures = ["ChameleonForConditionalGeneration"]
    torch.manual_seed(seed)
    model = ChameleonForConditionalGeneration(config).eval()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, out_dir / "tokenizer.json")
    honour_umask(out_dir)  # safetensors writes 0600
    return out_dir


# ----------------------------------------------------------------------------------------------
# A random VQGAN
# ----------------------------------------------------------------------------------------------


def _calibration_images(generator: torch.Generator, count: int, size: int) -> torch.Tensor:
    """Smooth random images in [-1, 1]: upsampled noise at several scales, like blobs and gradients."""
    images = torch.zeros(count, 3, size, size)
    for cells in (2, 4, 8, 16):
        noise = torch.rand(count, 3, cells, cells, generator=generator) * 2 - 1
        images += F.interpolate(noise, size=(size, size), mode="bilinear", align_corners=False)
    return (images / 2).clamp(-1, 1)


def random_vqgan(params: Mapping[str, Any], seed: int) -> VQGAN:
    """A VQGAN with seeded random weights for any model.params, its codebook spread (see make_random_vqgan)."""
    params = check_vqgan_params(params)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VQGAN(params)
    count, size = 16, 8 * model.downsample_factor  # latents of 8x8 each: cheap, same weights
    with torch.no_grad():
        latents = model.encode_latents(_calibration_images(generator, count, size))
        pool = latents.permute(0, 2, 3, 1).reshape(-1, params["embed_dim"])
        n = params["n_embed"]
        first = pool[torch.randint(len(pool), (n,), generator=generator)]
        second = pool[torch.randint(len(pool), (n,), generator=generator)]
        mix = torch.rand(n, 1, generator=generator)
        spread = pool.std(dim=0, keepdim=True)
        jitter = 0.1 * spread * torch.randn(n, params["embed_dim"], generator=generator)
        model.quantize.embedding.weight.copy_(mix * first + (1 - mix) * second + jitter)
    model.source = f"<random seed={seed}>"
    return model


def make_random_vqgan(ch: int, seed: int) -> tuple[VQGAN, dict[str, Any]]:
    """A random VQGAN with the real layout (only `ch` differs; a multiple of 32) and its vqgan.yaml document.

    Deterministic for a seed. The codebook is spread over the encoder's own outputs: each entry
    mixes two latent vectors of smooth random images and adds a little noise, so random images
    hit many codes instead of the few a default init would give.
    """
    params = real_vqgan_params(ch)
    model = random_vqgan(params, seed)
    model.source = f"<random ch={ch} seed={seed}>"
    return model, vqgan_yaml_dict(params)


# ----------------------------------------------------------------------------------------------
# A tiny random BiomedCLIP
# ----------------------------------------------------------------------------------------------


def _bert_vocab() -> list[str]:
    """A WordPiece vocabulary that tokenizes any lower-cased ASCII text without [UNK]s for letters and digits."""
    pieces = list(string.ascii_lowercase + string.digits + string.punctuation)
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *pieces, *("##" + p for p in string.ascii_lowercase + string.digits)]


def make_random_biomedclip(folder: str | Path, text_tower: str | Path, seed: int = 0, *, embed_dim: int = 16,
                           image_size: int = 64, hidden_size: int = 32) -> Path:
    """Write a tiny random BiomedCLIP: the CLIP folder in hub layout and BiomedBERT's config folder.

    open_clip_config.json has BiomedCLIP's structure and keys, with timm's small test ViT in place of
    vit_base_patch16_224 and the hub id of BiomedBERT as the text tower, exactly as the real file
    names it; the text-tower folder holds a tiny BertConfig. The weights are open_clip's own random
    initialisation under `seed`, saved as open_clip_pytorch_model.bin (byte-identical for a seed).
    """
    from transformers import BertConfig

    folder, tower = Path(folder), Path(text_tower)
    folder.mkdir(parents=True, exist_ok=True)
    tower.mkdir(parents=True, exist_ok=True)
    vocab = _bert_vocab()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": PUBLIC_CONTEXT_LENGTH}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]", "mask_token": "[MASK]"}, indent=2))
    BertConfig(vocab_size=len(vocab), hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
               intermediate_size=2 * hidden_size, max_position_embeddings=PUBLIC_CONTEXT_LENGTH,
               # BERT's 0.02 leaves a tiny random tower giving nearly one embedding for every text.
               initializer_range=0.5).save_pretrained(tower)
    text_cfg = {"hf_model_name": BIOMEDCLIP_TEXT_TOWER, "hf_tokenizer_name": BIOMEDCLIP_TEXT_TOWER, "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": PUBLIC_CONTEXT_LENGTH}
    config = {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {"timm_model_name": "test_vit", "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": image_size},
            "text_cfg": text_cfg,
        },
        "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
    }
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=4))
    for name in WEIGHT_NAMES:  # a stale weight file would be preferred by open_clip
        (folder / name).unlink(missing_ok=True)
    open_clip = _open_clip()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(f"local-dir:{folder}", text_cfg=_text_cfg_with_tower(text_cfg, tower))
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder
