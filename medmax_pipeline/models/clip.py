"""CLIP similarity for captioning and image generation, loaded from a local open_clip folder.

MedMax scored captions by the cosine similarity of BiomedCLIP's image and caption embeddings,
and generated images by the similarity of the generated image and its prompt. open_clip is not
installed here and nothing can be downloaded, so this module carries its own small loader.

Architecture choice (reduced but real): the loader reads open_clip's NATIVE CLIP layout, the one
of open_clip's `CLIP` class and OpenAI CLIP: a ViT image tower and a causal text transformer
with the state-dict names open_clip uses (visual.conv1, visual.class_embedding,
visual.transformer.resblocks.N.attn.in_proj_weight, ..., token_embedding, text_projection,
logit_scale). A folder holds

    open_clip_config.json              {"model_cfg": {"embed_dim", "vision_cfg", "text_cfg",
                                         "quick_gelu"?}, "preprocess_cfg"?: {"mean", "std"}}
    open_clip_pytorch_model.bin        or open_clip_model.safetensors / open_clip_pytorch_model.safetensors
    tokenizer.json                     a HF `tokenizers` file (open_clip ships its BPE inside the
                                       package, not the folder, so the folder must carry one)

BiomedCLIP itself uses a timm ViT and a HuggingFace PubMedBERT text tower (model_cfg with
timm_model_name / hf_model_name) whose tokenizer lives on the hub: such a folder is refused with
a clear error rather than loaded wrongly. Numbers from this scorer are comparable with each
other, not with the paper's BiomedCLIP numbers, unless the same weights are supplied.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

CONFIG_NAME = "open_clip_config.json"
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin")
TOKENIZER_NAME = "tokenizer.json"
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipLoadError(RuntimeError):
    """The CLIP folder is missing, malformed, or of an architecture this loader does not know."""


# ----------------------------------------------------------------------------------------------
# Model (open_clip native names)
# ----------------------------------------------------------------------------------------------


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, hidden), gelu=QuickGELU() if quick_gelu else nn.GELU(), c_proj=nn.Linear(hidden, width)
        ))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, embed_dim: int, image_size: int, patch_size: int, width: int, layers: int,
                 heads: int, mlp_ratio: float = 4.0, quick_gelu: bool = False) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ClipLoadError(f"vision_cfg: image_size {image_size} is not a multiple of patch_size {patch_size}")
        grid = image_size // patch_size
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, vision_cfg: dict[str, Any], text_cfg: dict[str, Any], quick_gelu: bool = False) -> None:
        super().__init__()
        try:
            self.visual = VisionTransformer(
                embed_dim, int(vision_cfg["image_size"]), int(vision_cfg["patch_size"]), int(vision_cfg["width"]),
                int(vision_cfg["layers"]), int(vision_cfg.get("heads", max(1, int(vision_cfg["width"]) // 64))),
                float(vision_cfg.get("mlp_ratio", 4.0)), quick_gelu,
            )
            width, ctx = int(text_cfg["width"]), int(text_cfg["context_length"])
            self.context_length = ctx
            self.vocab_size = int(text_cfg["vocab_size"])
            self.token_embedding = nn.Embedding(self.vocab_size, width)
            self.positional_embedding = nn.Parameter(torch.zeros(ctx, width))
            self.transformer = Transformer(width, int(text_cfg["layers"]), int(text_cfg["heads"]),
                                           float(text_cfg.get("mlp_ratio", 4.0)), quick_gelu)
        except KeyError as exc:
            raise ClipLoadError(f"model_cfg lacks {exc.args[0]!r}") from exc
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.register_buffer("attn_mask", torch.full((ctx, ctx), float("-inf")).triu(1), persistent=False)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(pixels), dim=-1)

    def encode_text(self, ids: torch.Tensor, eot_positions: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]
        x = self.transformer(x, self.attn_mask[: ids.shape[1], : ids.shape[1]])
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0]), eot_positions]  # the end-of-text position, as open_clip does
        return F.normalize(pooled @ self.text_projection, dim=-1)


# ----------------------------------------------------------------------------------------------
# Folder I/O
# ----------------------------------------------------------------------------------------------


def _read_config(folder: Path) -> dict[str, Any]:
    if not folder.is_dir():
        raise ClipLoadError(f"CLIP folder {folder} does not exist")
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise ClipLoadError(f"CLIP folder {folder} has no {CONFIG_NAME}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ClipLoadError(f"{path} is not valid JSON: {exc}") from exc
    cfg = config.get("model_cfg") if isinstance(config, dict) else None
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ClipLoadError(f"{path}: model_cfg must hold embed_dim, vision_cfg and text_cfg")
    if "timm_model_name" in cfg["vision_cfg"] or "hf_model_name" in cfg["text_cfg"]:
        raise ClipLoadError(
            f"{path}: a timm / HuggingFace tower (as in BiomedCLIP) is not supported by this loader "
            "(open_clip is not installed); supply a native open_clip ViT + text transformer folder"
        )
    return config


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_NAMES:
        path = folder / name
        if path.is_file():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    state = load_file(str(path))
                else:
                    state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:
                raise ClipLoadError(f"{path} is not a readable weight file: {exc}") from exc
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            return {k.removeprefix("module."): v for k, v in state.items()}
    raise ClipLoadError(f"CLIP folder {folder} has none of {', '.join(WEIGHT_NAMES)}")


class ClipScorer:
    """Cosine similarities between images and texts with one loaded CLIP model."""

    def __init__(self, model: CLIP, tokenizer: Any, mean: Sequence[float], std: Sequence[float], folder: Path,
                 device: str = "cpu") -> None:
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.folder = folder
        self.device = device
        self.sot_id = tokenizer.token_to_id(SOT_TOKEN)
        self.eot_id = tokenizer.token_to_id(EOT_TOKEN)
        if self.sot_id is None or self.eot_id is None:
            raise ClipLoadError(f"{folder / TOKENIZER_NAME} lacks {SOT_TOKEN} / {EOT_TOKEN}")

    # -- preprocessing ---------------------------------------------------------------------
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB, shorter side to image_size (bicubic), centre crop, scale to [0,1], normalise."""
        size = self.model.visual.image_size
        image = image.convert("RGB")
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = image.size
        left, top = (w - size) // 2, (h - size) // 2
        image = image.crop((left, top, left + size, top + size))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - self.mean) / self.std

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = self.model.context_length
        ids = torch.zeros(len(texts), ctx, dtype=torch.long)
        eot = torch.zeros(len(texts), dtype=torch.long)
        for i, text in enumerate(texts):
            # Truncate the text, never the end token: the embedding is read at its position.
            body = self.tokenizer.encode(text, add_special_tokens=False).ids[: ctx - 2]
            seq = [self.sot_id, *body, self.eot_id]
            if max(seq) >= self.model.vocab_size:
                raise ClipLoadError(f"tokenizer id {max(seq)} >= text_cfg vocab_size {self.model.vocab_size}")
            ids[i, : len(seq)] = torch.tensor(seq)
            eot[i] = len(seq) - 1
        return ids, eot

    # -- embeddings and similarities -------------------------------------------------------
    @torch.no_grad()
    def embed_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return self.model.encode_image(pixels).float().cpu()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        ids, eot = self.tokenize(texts)
        return self.model.encode_text(ids.to(self.device), eot.to(self.device)).float().cpu()

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


def load_clip(folder: str | Path, device: str = "cpu") -> ClipScorer:
    """Load a CLIP scorer from a local open_clip-layout folder (see the module docstring)."""
    folder = Path(folder)
    config = _read_config(folder)
    cfg = config["model_cfg"]
    model = CLIP(int(cfg["embed_dim"]), cfg["vision_cfg"], cfg["text_cfg"], bool(cfg.get("quick_gelu", False)))
    state = _read_weights(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ClipLoadError(
            f"{folder}: weights do not match open_clip_config.json: missing {sorted(missing)[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    tok_path = folder / TOKENIZER_NAME
    if not tok_path.is_file():
        raise ClipLoadError(f"CLIP folder {folder} has no {TOKENIZER_NAME} (a HF tokenizers file)")
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(tok_path))
    except Exception as exc:
        raise ClipLoadError(f"{tok_path} is not a readable tokenizers file: {exc}") from exc
    pre = config.get("preprocess_cfg") or {}
    return ClipScorer(model, tokenizer, pre.get("mean", OPENAI_MEAN), pre.get("std", OPENAI_STD), folder, device)


def make_random_clip(folder: str | Path, seed: int = 0, *, embed_dim: int = 32, image_size: int = 32,
                     patch_size: int = 8, width: int = 32, layers: int = 2, heads: int = 2,
                     context_length: int = 32) -> Path:
    """Write a tiny random CLIP folder in the layout load_clip reads (for tests and the demo).

    The tokenizer is byte-level BPE without merges: every UTF-8 byte is a token, so any text
    encodes and nothing has to be trained or downloaded.
    """
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab[SOT_TOKEN] = len(vocab)
    vocab[EOT_TOKEN] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([SOT_TOKEN, EOT_TOKEN])
    tokenizer.save(str(folder / TOKENIZER_NAME))
    vision_cfg = {"image_size": image_size, "patch_size": patch_size, "width": width, "layers": layers, "heads": heads}
    text_cfg = {"context_length": context_length, "vocab_size": len(vocab), "width": width, "layers": layers, "heads": heads}
    config = {"model_cfg": {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg},
              "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    gen = torch.Generator().manual_seed(seed)
    model = CLIP(embed_dim, vision_cfg, text_cfg)
    state = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2].startswith("ln"):
            # LayerNorms start as identity, like a freshly built model.
            state[name] = torch.ones_like(tensor) if parts[-1] == "weight" else torch.zeros_like(tensor)
        elif name == "logit_scale":
            state[name] = tensor.clone()
        else:
            state[name] = torch.randn(tensor.shape, generator=gen) * 0.05
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / WEIGHT_NAMES[0]))
    return folder
