"""BiomedCLIP similarity for captioning, image generation and mm_out, loaded through open_clip.

The public MedMax evaluation (evaluation/eval_utils.py `CLIPSimilarity`) loads
`hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224` with open_clip's
`create_model_from_pretrained` and `get_tokenizer`, embeds an image (RGBA converted to RGB, then
open_clip's eval transform) and a text (tokenized with context_length=256), normalises both
embeddings and reports their raw cosine. This module does the same from local folders, so nothing
is downloaded:

    CLIP folder (the hub repository's files)     text-tower folder (BiomedBERT's config)
      open_clip_config.json                        config.json
      open_clip_pytorch_model.bin (or .safetensors)
      tokenizer files (vocab.txt, tokenizer_config.json, ...)

BiomedCLIP's open_clip_config.json names its text tower by hub id (text_cfg.hf_model_name,
"microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"). open_clip builds that tower from the
tower's config.json (its weights come from the CLIP checkpoint), so the loader hands open_clip the
local text-tower folder in place of the hub id (`evaluate.clip_text_tower`, `--clip-text-tower`).
The tokenizer is read from the CLIP folder itself, as open_clip's `local-dir:` schema does.

demo_models.make_random_biomedclip writes a tiny random model in the same layout and config
structure (a timm ViT, a BERT text tower with an MLP projection and CLS pooling), so the demo and
the tests run the real loading path.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

CONFIG_NAME = "open_clip_config.json"
# What open_clip's local-dir loader picks up, in its order of preference.
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
                "open_clip_pytorch_model.pth")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt")
TEXT_TOWER_CONFIG = "config.json"
# The public CLIPSimilarity tokenizes every text with context_length=256.
PUBLIC_CONTEXT_LENGTH = 256
BIOMEDCLIP_TEXT_TOWER = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipLoadError(RuntimeError):
    """The CLIP folder or its text-tower folder is missing, malformed, or does not load."""


# ----------------------------------------------------------------------------------------------
# Folder checks (clear errors before open_clip sees the folder)
# ----------------------------------------------------------------------------------------------


def read_open_clip_config(folder: Path) -> dict[str, Any]:
    """The folder's open_clip_config.json, checked for the keys open_clip needs."""
    if not folder.is_dir():
        raise ClipLoadError(f"CLIP folder {folder} does not exist")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ClipLoadError(f"CLIP folder {folder} has no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ClipLoadError(f"{path} is not valid JSON: {exc}") from exc
    cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if (not isinstance(cfg, dict) or not isinstance(cfg.get("embed_dim"), int) or not isinstance(cfg.get("vision_cfg"), dict)
            or not isinstance(cfg.get("text_cfg"), dict)):
        raise ClipLoadError(f"{path}: model_cfg must hold embed_dim, vision_cfg and text_cfg")
    return config


def _check_weights(folder: Path) -> None:
    if not any((folder / name).is_file() for name in WEIGHT_NAMES):
        raise ClipLoadError(f"CLIP folder {folder} has none of {', '.join(WEIGHT_NAMES)}")


def resolve_text_tower(folder: Path, text_cfg: dict[str, Any], text_tower: str | Path | None) -> Path | None:
    """The local folder whose config.json builds the HF text tower; None for a native open_clip text tower."""
    if "hf_model_name" not in text_cfg:
        if text_tower is not None:
            raise ClipLoadError(f"{folder / CONFIG_NAME} has a native text tower (no text_cfg.hf_model_name), "
                                f"so the text-tower folder {text_tower} would be unused; leave it unset")
        return None
    named = str(text_cfg["hf_model_name"])
    if text_tower is None:
        if not Path(named).is_dir():
            raise ClipLoadError(
                f"{folder / CONFIG_NAME} builds its text tower from {named!r}, which is not a local folder: set "
                f"evaluate.clip_text_tower (--clip-text-tower) to a folder holding that model's {TEXT_TOWER_CONFIG}"
            )
        text_tower = named
    tower = Path(text_tower)
    if not (tower / TEXT_TOWER_CONFIG).is_file():
        raise ClipLoadError(f"text-tower folder {tower} has no {TEXT_TOWER_CONFIG} (the config of {named})")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ClipLoadError(f"CLIP folder {folder} has none of the tokenizer files {', '.join(TOKENIZER_FILES)}")
    return tower


def _text_cfg_with_tower(text_cfg: dict[str, Any], tower: Path | None) -> dict[str, Any] | None:
    """text_cfg with the local tower folder in place of the hub id; weights come from the CLIP checkpoint."""
    if tower is None:
        return None
    return {**text_cfg, "hf_model_name": str(tower), "hf_model_pretrained": False}


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


class ClipScorer:
    """Raw cosine similarities of normalised open_clip embeddings, as the public CLIPSimilarity computes them."""

    def __init__(self, model: torch.nn.Module, preprocess: Callable[[Image.Image], torch.Tensor],
                 tokenizer: Callable[..., torch.Tensor], folder: Path, device: str = "cpu",
                 context_length: int = PUBLIC_CONTEXT_LENGTH) -> None:
        self.model = model.eval().to(device)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.folder = folder
        self.device = device
        self.context_length = context_length

    def pixels(self, image: Image.Image) -> torch.Tensor:
        # The public code converts only RGBA; open_clip's transform converts other modes itself.
        if image.mode == "RGBA":
            image = image.convert("RGB")
        return self.preprocess(image)

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self.tokenizer(list(texts), context_length=self.context_length)

    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        features = self.model.encode_image(torch.stack([self.pixels(im) for im in images]).to(self.device)).float()
        return (features / features.norm(dim=-1, keepdim=True)).cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        features = self.model.encode_text(self.tokenize(texts).to(self.device)).float()
        return (features / features.norm(dim=-1, keepdim=True)).cpu()

    def image_text_similarity(self, images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        """Pairwise-aligned cosine similarity: images[i] with texts[i]."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        if not images:
            return np.zeros(0)
        return (self.embed_images(images) * self.embed_texts(texts)).sum(-1).numpy().astype(np.float64)

    def image_image_similarity(self, a: Sequence[Image.Image], b: Sequence[Image.Image]) -> np.ndarray:
        if len(a) != len(b):
            raise ValueError(f"{len(a)} and {len(b)} images")
        if not a:
            return np.zeros(0)
        return (self.embed_images(a) * self.embed_images(b)).sum(-1).numpy().astype(np.float64)

    def text_text_similarity(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        if len(a) != len(b):
            raise ValueError(f"{len(a)} and {len(b)} texts")
        if not a:
            return np.zeros(0)
        return (self.embed_texts(a) * self.embed_texts(b)).sum(-1).numpy().astype(np.float64)


def _open_clip() -> Any:
    # Only local folders are read; never let a missing file turn into a hub request.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import open_clip
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ClipLoadError(f"open_clip is not importable ({exc}); install open_clip_torch and timm") from exc
    return open_clip


def load_clip(folder: str | Path, text_tower: str | Path | None = None, device: str = "cpu") -> ClipScorer:
    """Load a CLIP scorer from a local open_clip folder (hub layout) and, for an HF text tower, its config folder."""
    folder = Path(folder)
    config = read_open_clip_config(folder)
    _check_weights(folder)
    tower = resolve_text_tower(folder, config["model_cfg"]["text_cfg"], text_tower)
    overrides = {}
    text_cfg = _text_cfg_with_tower(config["model_cfg"]["text_cfg"], tower)
    if text_cfg is not None:
        overrides["text_cfg"] = text_cfg
    open_clip = _open_clip()
    try:
        model, preprocess = open_clip.create_model_from_pretrained(f"local-dir:{folder}", device=device, **overrides)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    except Exception as exc:  # open_clip, timm and transformers raise many kinds
        where = f"{folder}" + (f" with text tower {tower}" if tower else "")
        raise ClipLoadError(f"open_clip could not load {where}: {type(exc).__name__}: {exc}") from exc
    return ClipScorer(model, preprocess, tokenizer, folder, device)
