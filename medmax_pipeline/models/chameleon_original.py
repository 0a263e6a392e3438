"""Chameleon's original checkpoint format (the published MedMax / Anole folders) and its HF twin.

The original layout, as facebookresearch/chameleon `inference/loader.py` reads it:

    <ckpt>/models/7b/consolidated.pth        a flat state dict (torch.save), bf16 in the releases
    <ckpt>/models/7b/params.json             ModelArgs fields, at the top level and/or under "model"
    <ckpt>/models/7b/consolidate_params.json merged over params.json (model_parallel_size, ...)

Key names (original -> HF ChameleonForConditionalGeneration):

    tok_embeddings.weight                      model.embed_tokens.weight
    layers.N.attention.wq|wk|wv|wo.weight      model.layers.N.self_attn.q|k|v|o_proj.weight
    layers.N.attention.q|k_normalization.*     model.layers.N.self_attn.q|k_norm.weight|bias
    layers.N.feed_forward.w1|w3|w2.weight      model.layers.N.mlp.gate|up|down_proj.weight
    layers.N.attention_norm.weight             model.layers.N.input_layernorm.weight
    layers.N.ffn_norm.weight                   model.layers.N.post_attention_layernorm.weight
    norm.weight, output.weight                 model.norm.weight, lm_head.weight
    rope.freqs                                 (a leftover buffer; the original loader skips it)

Two layouts differ, both because the original applies rotary embeddings to adjacent pairs
(x[2j], x[2j+1]) while HF rotates the two halves of each head (rotate_half):
* wq / wk rows are permuted within each head (`permute_for_hf` / `permute_for_original`);
* q/k normalization is one LayerNorm(head_dim) shared by all heads of a model-parallel shard;
  HF holds one row per head. Its entries go through the same within-head permutation and are
  repeated per head; the way back requires every head's row to be the same.

The original model code is also here as `reference_logits`: a plain fp32 re-implementation of
its forward pass (`inference/transformer.py`), reading one tensor at a time, which the
conversion uses to check that the HF model it wrote computes the same logits.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F

from medmax_pipeline.core import constants as C

MODEL_SUBDIR = Path("models") / "7b"
CONSOLIDATED_FILE = "consolidated.pth"
PARAMS_FILE = "params.json"
CONSOLIDATE_PARAMS_FILE = "consolidate_params.json"
ROPE_FREQS_KEY = "rope.freqs"
QK_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the original q/k normalization uses


class OriginalFormatError(ValueError):
    """An original-format folder or state dict cannot be converted faithfully (says which file/tensor and why)."""


# ----------------------------------------------------------------------------------------------
# params.json <-> ChameleonConfig
# ----------------------------------------------------------------------------------------------


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """The original FeedForward width: 2/3 of 4*dim, scaled, rounded up to a multiple (11008 for 7B)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def ffn_params_for(dim: int, intermediate_size: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that give `intermediate_size` back, the 7B's (256, None) when it fits."""
    candidates: list[tuple[int, float | None]] = [(256, None), (intermediate_size, None)]
    candidates.append((1, (intermediate_size + 0.5) / int(8 * dim / 3)))
    for multiple_of, multiplier in candidates:
        if ffn_hidden_dim(dim, multiple_of, multiplier) == intermediate_size:
            return multiple_of, multiplier
    raise OriginalFormatError(f"no params.json multiple_of/ffn_dim_multiplier gives intermediate_size {intermediate_size} for dim {dim}")


@dataclass(frozen=True)
class OriginalParams:
    """The ModelArgs of the original model code (chameleon/inference/transformer.py)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    qk_normalization: bool = True
    swin_norm: bool = False
    model_parallel_size: int = 1

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        return ffn_hidden_dim(self.dim, self.multiple_of, self.ffn_dim_multiplier)


def merged_params(params_json: Mapping[str, Any], consolidate_params: Mapping[str, Any]) -> dict[str, Any]:
    """Merge the two files the way the original loader does: top level, then "model", then consolidate."""
    model = params_json.get("model", {})
    if not isinstance(model, Mapping):
        raise OriginalFormatError(f"params.json: 'model' must be an object, not {type(model).__name__}")
    return {**params_json, **model, **consolidate_params}


def params_from_dict(merged: Mapping[str, Any], source: str) -> OriginalParams:
    """OriginalParams from merged params (ModelArgs defaults for absent optional fields)."""
    missing = [k for k in ("dim", "n_layers", "n_heads", "vocab_size") if k not in merged]
    if missing:
        raise OriginalFormatError(f"{source}: lacks {', '.join(missing)} (neither at the top level nor under 'model')")
    p = OriginalParams(
        dim=int(merged["dim"]),
        n_layers=int(merged["n_layers"]),
        n_heads=int(merged["n_heads"]),
        n_kv_heads=int(merged.get("n_kv_heads") or merged["n_heads"]),
        vocab_size=int(merged["vocab_size"]),
        norm_eps=float(merged.get("norm_eps", 1e-5)),
        rope_theta=float(merged.get("rope_theta", 10000.0)),
        multiple_of=int(merged.get("multiple_of", 256)),
        ffn_dim_multiplier=None if merged.get("ffn_dim_multiplier") is None else float(merged["ffn_dim_multiplier"]),
        # ModelArgs defaults to False; the released Chameleon/Anole checkpoints set it, and HF always has q/k norm.
        qk_normalization=bool(merged.get("qk_normalization", False)),
        swin_norm=bool(merged.get("swin_norm", False)),
        model_parallel_size=int(merged.get("model_parallel_size", 1)),
    )
    problems = []
    if p.dim % p.n_heads or p.head_dim % 2:
        problems.append(f"dim {p.dim} is not n_heads {p.n_heads} times an even head size")
    if p.n_heads % p.n_kv_heads:
        problems.append(f"n_heads {p.n_heads} is not a multiple of n_kv_heads {p.n_kv_heads}")
    if p.model_parallel_size != 1:
        problems.append(f"model_parallel_size {p.model_parallel_size}: only single-shard (7B) checkpoints are supported")
    if not p.qk_normalization:
        problems.append("qk_normalization is not set: HF Chameleon always applies q/k normalization, so this model has no HF equivalent")
    if problems:
        raise OriginalFormatError(f"{source}: {'; '.join(problems)}")
    return p


def read_params(model_dir: str | Path) -> OriginalParams:
    """params.json (+ consolidate_params.json when present) of an original models/7b folder."""
    model_dir = Path(model_dir)
    documents = []
    for name, required in ((PARAMS_FILE, True), (CONSOLIDATE_PARAMS_FILE, False)):
        path = model_dir / name
        if not path.is_file():
            if required:
                raise OriginalFormatError(f"{path} does not exist (expected the original Chameleon layout models/7b/{PARAMS_FILE})")
            documents.append({})
            continue
        try:
            document = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise OriginalFormatError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(document, dict):
            raise OriginalFormatError(f"{path} must hold a JSON object")
        documents.append(document)
    return params_from_dict(merged_params(documents[0], documents[1]), str(model_dir / PARAMS_FILE))


def params_documents(p: OriginalParams) -> tuple[dict[str, Any], dict[str, Any]]:
    """(params.json, consolidate_params.json) documents both the original loader and HF's old script read."""
    model = {k: v for k, v in asdict(p).items() if k != "model_parallel_size"}
    return {"model": model}, {"model_parallel_size": p.model_parallel_size}


def max_position_embeddings_for(rope_theta: float) -> int:
    """What HF's conversion chose: 4096 for Chameleon 1 (theta 10000), 16384 for a larger theta."""
    return 16384 if rope_theta > 10000.0 else 4096


def hf_config_kwargs(p: OriginalParams, vocabulary_map: Mapping[str, int], vq_config: Mapping[str, Any]) -> dict[str, Any]:
    """ChameleonConfig keyword arguments for an original model (ids 0/1/2 are bos/pad/eos, MEDMAX-FACTS)."""
    return {
        "vocab_size": p.vocab_size,
        "hidden_size": p.dim,
        "intermediate_size": p.ffn_dim,
        "num_hidden_layers": p.n_layers,
        "num_attention_heads": p.n_heads,
        "num_key_value_heads": p.n_kv_heads,
        "rms_norm_eps": p.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": p.rope_theta},
        "max_position_embeddings": max_position_embeddings_for(p.rope_theta),
        "model_parallel_size": p.model_parallel_size,
        "swin_norm": p.swin_norm,
        "tie_word_embeddings": False,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "vocabulary_map": dict(vocabulary_map),
        "vq_config": dict(vq_config),
    }


def params_from_hf_config(config: Mapping[str, Any], source: str = "config.json") -> OriginalParams:
    """OriginalParams describing an HF Chameleon config (for writing params.json on the way out)."""
    problems = [
        f"{key} is {config.get(key)!r}" for key, ok in (("attention_bias", False), ("mlp_bias", False), ("tie_word_embeddings", False))
        if bool(config.get(key, ok)) != ok
    ]
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {config.get('hidden_act')!r}")
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type is {rope.get('rope_type')!r}")
    if problems:
        raise OriginalFormatError(f"{source}: the original Chameleon model has no equivalent of: {'; '.join(problems)}")
    dim, intermediate = int(config["hidden_size"]), int(config["intermediate_size"])
    multiple_of, multiplier = ffn_params_for(dim, intermediate)
    return params_from_dict(
        {
            "dim": dim,
            "n_layers": config["num_hidden_layers"],
            "n_heads": config["num_attention_heads"],
            "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
            "vocab_size": config["vocab_size"],
            "norm_eps": config.get("rms_norm_eps", 1e-5),
            "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            "multiple_of": multiple_of,
            "ffn_dim_multiplier": multiplier,
            "qk_normalization": True,
            "swin_norm": bool(config.get("swin_norm", False)),
            "model_parallel_size": int(config.get("model_parallel_size") or 1),
        },
        source,
    )


def same_model_shape(a: OriginalParams, b: OriginalParams) -> list[str]:
    """Fields where two params describe different models (the FFN by its width, not how it is spelled)."""
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "norm_eps", "rope_theta", "swin_norm", "ffn_dim")
    return [f"{name}: {getattr(a, name)} != {getattr(b, name)}" for name in fields if getattr(a, name) != getattr(b, name)]


# ----------------------------------------------------------------------------------------------
# Tensors: names, shapes and layout both ways
# ----------------------------------------------------------------------------------------------


def permute_for_hf(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """wq/wk rows: adjacent rotary pairs (original) -> half-split pairs (HF), within each head."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_for_original(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_for_hf."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def qk_norm_for_hf(vector: torch.Tensor, n_heads: int) -> torch.Tensor:
    """One shared LayerNorm(head_dim) weight/bias -> HF's (n_heads, head_dim), permuted like wq/wk rows."""
    head_dim = vector.shape[0]
    return vector.reshape(head_dim // 2, 2).t().reshape(1, head_dim).repeat(n_heads, 1)


def qk_norm_for_original(per_head: torch.Tensor, name: str) -> torch.Tensor:
    """HF's (n_heads, head_dim) q/k norm -> the shared vector; refuses when heads differ (no original equivalent)."""
    first = per_head[0]
    differing = [h for h in range(1, per_head.shape[0]) if not torch.equal(per_head[h], first)]
    if differing:
        raise OriginalFormatError(
            f"{name}: head {differing[0]} differs from head 0 ({len(differing)} head(s) differ); the original model shares one "
            "q/k LayerNorm across heads, so these weights cannot be written in the original format"
        )
    head_dim = first.shape[0]
    return first.reshape(2, head_dim // 2).t().reshape(head_dim)


def rope_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    """rope.freqs as Meta's checkpoints carry it: theta^(-2j/head_dim), j < head_dim/2."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))


@dataclass(frozen=True)
class TensorRule:
    """One text-model tensor: its name in both formats, how it is transformed, its shape in both."""

    original: str
    hf: str
    kind: str  # plain | q | k | q_norm | k_norm
    original_shape: tuple[int, ...]
    hf_shape: tuple[int, ...]


def tensor_rules(p: OriginalParams) -> list[TensorRule]:
    """Every text-model tensor of a model with params `p`, embedding first, layer by layer, head last."""
    d, hd, ffn = p.dim, p.head_dim, p.ffn_dim
    q_rows, kv_rows = p.n_heads * hd, p.n_kv_heads * hd
    rules = [TensorRule("tok_embeddings.weight", "model.embed_tokens.weight", "plain", (p.vocab_size, d), (p.vocab_size, d))]
    for i in range(p.n_layers):
        o, h = f"layers.{i}.", f"model.layers.{i}."
        rules += [
            TensorRule(o + "attention_norm.weight", h + "input_layernorm.weight", "plain", (d,), (d,)),
            TensorRule(o + "attention.wq.weight", h + "self_attn.q_proj.weight", "q", (q_rows, d), (q_rows, d)),
            TensorRule(o + "attention.wk.weight", h + "self_attn.k_proj.weight", "k", (kv_rows, d), (kv_rows, d)),
            TensorRule(o + "attention.wv.weight", h + "self_attn.v_proj.weight", "plain", (kv_rows, d), (kv_rows, d)),
            TensorRule(o + "attention.wo.weight", h + "self_attn.o_proj.weight", "plain", (d, q_rows), (d, q_rows)),
        ]
        for part in ("weight", "bias"):
            rules.append(TensorRule(o + f"attention.q_normalization.{part}", h + f"self_attn.q_norm.{part}", "q_norm", (hd,), (p.n_heads, hd)))
            rules.append(TensorRule(o + f"attention.k_normalization.{part}", h + f"self_attn.k_norm.{part}", "k_norm", (hd,), (p.n_kv_heads, hd)))
        rules += [
            TensorRule(o + "ffn_norm.weight", h + "post_attention_layernorm.weight", "plain", (d,), (d,)),
            TensorRule(o + "feed_forward.w1.weight", h + "mlp.gate_proj.weight", "plain", (ffn, d), (ffn, d)),
            TensorRule(o + "feed_forward.w3.weight", h + "mlp.up_proj.weight", "plain", (ffn, d), (ffn, d)),
            TensorRule(o + "feed_forward.w2.weight", h + "mlp.down_proj.weight", "plain", (d, ffn), (d, ffn)),
        ]
    rules += [
        TensorRule("norm.weight", "model.norm.weight", "plain", (d,), (d,)),
        TensorRule("output.weight", "lm_head.weight", "plain", (p.vocab_size, d), (p.vocab_size, d)),
    ]
    return rules


def to_hf(rule: TensorRule, tensor: torch.Tensor, p: OriginalParams) -> torch.Tensor:
    """An original tensor in HF layout (a view for plain tensors, a new tensor otherwise)."""
    if tuple(tensor.shape) != rule.original_shape:
        raise OriginalFormatError(f"{rule.original}: shape {tuple(tensor.shape)}, params.json implies {rule.original_shape}")
    if rule.kind == "q":
        return permute_for_hf(tensor, p.n_heads)
    if rule.kind == "k":
        return permute_for_hf(tensor, p.n_kv_heads)
    if rule.kind == "q_norm":
        return qk_norm_for_hf(tensor, p.n_heads)
    if rule.kind == "k_norm":
        return qk_norm_for_hf(tensor, p.n_kv_heads)
    return tensor


def to_original(rule: TensorRule, tensor: torch.Tensor, p: OriginalParams) -> torch.Tensor:
    """An HF tensor in original layout (inverse of to_hf)."""
    if tuple(tensor.shape) != rule.hf_shape:
        raise OriginalFormatError(f"{rule.hf}: shape {tuple(tensor.shape)}, the config implies {rule.hf_shape}")
    if rule.kind == "q":
        return permute_for_original(tensor, p.n_heads)
    if rule.kind == "k":
        return permute_for_original(tensor, p.n_kv_heads)
    if rule.kind in ("q_norm", "k_norm"):
        return qk_norm_for_original(tensor, rule.hf)
    return tensor


_MADV_DONTNEED = 4  # Linux


def release_mapped_pages(tensor: torch.Tensor) -> None:
    """Let go of the resident pages under a contiguous tensor that lies in a read-only file mapping.

    Pages of a memory-mapped file that were read count in the process's RSS until the mapping is
    closed, so a conversion reading every tensor once would end up holding the whole file.
    MADV_DONTNEED on an unmodified private file mapping (torch.load(mmap=True) maps privately and
    nothing here writes to it) drops only the cached copy: a later read faults the same bytes back
    in from the file. Never call it on ordinary memory, where it would zero the data. No-op off Linux.
    """
    if not sys.platform.startswith("linux") or tensor.numel() == 0 or not tensor.is_contiguous():
        return
    page = os.sysconf("SC_PAGE_SIZE")
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
    if last > first:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)


class OriginalTensors:
    """Name -> tensor access to a consolidated.pth state dict that records which tensors were read.

    Also serves checkpoints saved with the original model's fused parameters (attention.wqkv,
    feed_forward.w13: its load hook accepts both), as views into the fused tensor.
    `mapped`: the state was loaded with torch.load(mmap=True), so `release` may drop pages.
    """

    def __init__(self, state: Mapping[str, Any], p: OriginalParams, source: str, mapped: bool = False) -> None:
        self.state, self.p, self.source, self.mapped = state, p, source, mapped
        self.used: set[str] = set()

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the resident pages of a tensor (or view) read from the mapped file; no-op when not mapped."""
        if self.mapped:
            release_mapped_pages(tensor)

    def __call__(self, name: str) -> torch.Tensor:
        if name in self.state:
            self.used.add(name)
            return self._tensor(name)
        head, _, leaf = name.rpartition(".")  # e.g. layers.3.attention.wq , weight
        prefix, _, part = head.rpartition(".")
        fused = {"wq": "wqkv", "wk": "wqkv", "wv": "wqkv", "w1": "w13", "w3": "w13"}.get(part)
        fused_name = f"{prefix}.{fused}.{leaf}"
        if fused is None or fused_name not in self.state:
            raise OriginalFormatError(f"{self.source}: tensor {name} is missing")
        self.used.add(fused_name)
        whole = self._tensor(fused_name)
        if fused == "w13":
            return whole.chunk(2, dim=0)[0 if part == "w1" else 1]
        q_rows, kv_rows = self.p.n_heads * self.p.head_dim, self.p.n_kv_heads * self.p.head_dim
        start = {"wq": 0, "wk": q_rows, "wv": q_rows + kv_rows}[part]
        return whole[start : start + (q_rows if part == "wq" else kv_rows)]

    def _tensor(self, name: str) -> torch.Tensor:
        value = self.state[name]
        if not isinstance(value, torch.Tensor):
            raise OriginalFormatError(f"{self.source}: {name} is a {type(value).__name__}, not a tensor")
        return value

    def unused(self) -> list[str]:
        return sorted(k for k in self.state if k not in self.used and k != ROPE_FREQS_KEY)


def check_rope_freqs(state: Mapping[str, Any], p: OriginalParams, source: str) -> None:
    """rope.freqs, when present as a tensor, must be the frequencies of params.json's rope_theta."""
    value = state.get(ROPE_FREQS_KEY)
    if not isinstance(value, torch.Tensor):
        return  # absent, or None as the public bin_to_pth.py writes it: nothing to check
    expected = rope_frequencies(p.head_dim, p.rope_theta)
    if tuple(value.shape) != tuple(expected.shape) or not torch.allclose(value.double(), expected, rtol=1e-2, atol=0):
        raise OriginalFormatError(
            f"{source}: rope.freqs does not match params.json (head size {p.head_dim}, rope_theta {p.rope_theta}); "
            "the weights were trained with other rotary frequencies"
        )


# ----------------------------------------------------------------------------------------------
# The original forward pass (reference for the checks)
# ----------------------------------------------------------------------------------------------


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def _rotate_adjacent_pairs(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding on pairs (x[2j], x[2j+1]) as xformers' rope_padded applies it; x is (T, heads, head_dim)."""
    seq, _, head_dim = x.shape
    freqs = rope_frequencies(head_dim, theta).float()
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * freqs[None, :]  # (T, head_dim/2)
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).reshape(x.shape)


def chunked_logits(hidden: torch.Tensor, weight: Callable[[int, int], torch.Tensor], vocab_size: int, chunk: int = 8192) -> torch.Tensor:
    """hidden @ W.T in fp32, reading W (vocab, dim) `chunk` rows at a time so it is never held in fp32 whole."""
    parts = [hidden @ weight(start, min(start + chunk, vocab_size)).float().t() for start in range(0, vocab_size, chunk)]
    return torch.cat(parts, dim=-1)


@torch.no_grad()
def reference_logits(
    tensor: Callable[[str], torch.Tensor], p: OriginalParams, ids: Iterable[int], release: Callable[[torch.Tensor], None] | None = None
) -> torch.Tensor:
    """(T, vocab) fp32 logits of the original Chameleon forward pass for one unpadded sequence.

    `tensor(name)` returns an original-format tensor; each is read when needed and upcast on its
    own, so memory stays near one matrix in fp32 whatever the model size. `release(t)` is
    called on each source tensor once it has been read (OriginalTensors.release for a mapped file).
    """
    release = release or (lambda t: None)
    ids = torch.as_tensor(list(ids), dtype=torch.long)
    seq, hd = len(ids), p.head_dim
    embedding = tensor("tok_embeddings.weight")
    x = embedding[ids].float()
    release(embedding)
    mask = torch.full((seq, seq), float("-inf")).triu(1)
    group = p.n_heads // p.n_kv_heads

    def read(name: str) -> torch.Tensor:
        source = tensor(name)
        value = source.float()
        release(source)
        return value

    def linear(h: torch.Tensor, name: str) -> torch.Tensor:
        return h @ read(name).t()

    def attention(h: torch.Tensor, o: str) -> torch.Tensor:
        q = linear(h, o + "attention.wq.weight").view(seq, p.n_heads, hd)
        k = linear(h, o + "attention.wk.weight").view(seq, p.n_kv_heads, hd)
        v = linear(h, o + "attention.wv.weight").view(seq, p.n_kv_heads, hd)
        if p.qk_normalization:
            q = F.layer_norm(q, (hd,), read(o + "attention.q_normalization.weight"), read(o + "attention.q_normalization.bias"), QK_NORM_EPS)
            k = F.layer_norm(k, (hd,), read(o + "attention.k_normalization.weight"), read(o + "attention.k_normalization.bias"), QK_NORM_EPS)
        q, k = _rotate_adjacent_pairs(q, p.rope_theta), _rotate_adjacent_pairs(k, p.rope_theta)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)  # query head h uses kv head h // group
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(seq, p.n_heads * hd)
        return linear(out, o + "attention.wo.weight")

    def feed_forward(h: torch.Tensor, o: str) -> torch.Tensor:
        gate, up = linear(h, o + "feed_forward.w1.weight"), linear(h, o + "feed_forward.w3.weight")
        return linear(F.silu(gate) * up, o + "feed_forward.w2.weight")

    for i in range(p.n_layers):
        o = f"layers.{i}."
        attention_norm, ffn_norm = read(o + "attention_norm.weight"), read(o + "ffn_norm.weight")
        if p.swin_norm:  # normalise each block's output instead of its input
            h = x + _rms_norm(attention(x, o), attention_norm, p.norm_eps)
            x = h + _rms_norm(feed_forward(h, o), ffn_norm, p.norm_eps)
        else:
            h = x + attention(_rms_norm(x, attention_norm, p.norm_eps), o)
            x = h + feed_forward(_rms_norm(h, ffn_norm, p.norm_eps), o)
    x = _rms_norm(x, read("norm.weight"), p.norm_eps)
    output = tensor("output.weight")

    def head_rows(a: int, b: int) -> torch.Tensor:
        rows = output[a:b].float()
        release(output[a:b])
        return rows

    return chunked_logits(x, head_rows, p.vocab_size)


def check_prompt_ids(vocab_size: int) -> list[int]:
    """The short prompt the conversion checks run: bos, an image block's edges and codes, separator, text, eos."""
    ids = [C.BOS_ID, C.BEGIN_IMAGE_ID, C.FIRST_IMAGE_TOKEN_ID + 17, C.LAST_IMAGE_TOKEN_ID, C.END_IMAGE_ID, C.SEPARATOR_ID, vocab_size - 1, C.EOS_ID]
    return [i for i in ids if i < vocab_size]


def compare_logits(expected: torch.Tensor, actual: torch.Tensor, what: str, rtol: float = 1e-3, atol: float = 1e-4) -> float:
    """Max |difference| of two logit tensors; OriginalFormatError when they differ beyond fp32 tolerance.

    Both sides run in fp32 from the same (e.g. bf16) numbers and differ only in the order of
    operations, which moves logits by far less than rtol * their largest magnitude; a wrong
    permutation or a swapped tensor moves them by about their own size.
    """
    if expected.shape != actual.shape:
        raise OriginalFormatError(f"{what}: logits of shape {tuple(actual.shape)}, expected {tuple(expected.shape)}")
    diff = (expected - actual).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if not torch.isfinite(actual).all() or worst > atol + rtol * scale:
        raise OriginalFormatError(
            f"{what}: logits differ by up to {worst:.3g} (allowed {atol + rtol * scale:.3g} for logits up to {scale:.3g}); "
            "the converted model does not compute what the original does"
        )
    return worst


# ----------------------------------------------------------------------------------------------
# Random models in the original layout (demo, tests, benchmark)
# ----------------------------------------------------------------------------------------------


def random_original_state(p: OriginalParams, seed: int, std: float = 0.02, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A seeded random consolidated.pth state dict for `p`, rope.freqs included.

    Norm weights are near 1 and q/k norm biases non-zero (not HF's ones/zeros), so a layout
    mistake in the norms changes the logits and the conversion checks can see it.
    """
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for rule in tensor_rules(p):
        shape = rule.original_shape
        if rule.original.endswith("norm.weight") or rule.original.endswith("normalization.weight"):
            values = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif rule.original.endswith("normalization.bias"):
            values = 0.1 * torch.randn(shape, generator=generator)
        else:
            values = std * torch.randn(shape, generator=generator)
        state[rule.original] = values.to(dtype)
    state[ROPE_FREQS_KEY] = rope_frequencies(p.head_dim, p.rope_theta).to(dtype)
    return state


def write_original_model(model_dir: str | Path, state: Mapping[str, torch.Tensor], p: OriginalParams) -> Path:
    """Write consolidated.pth, params.json and consolidate_params.json into models/7b-style `model_dir`."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    params_json, consolidate = params_documents(p)
    (model_dir / PARAMS_FILE).write_text(json.dumps(params_json, indent=2) + "\n")
    (model_dir / CONSOLIDATE_PARAMS_FILE).write_text(json.dumps(consolidate, indent=2) + "\n")
    tmp = model_dir / (CONSOLIDATED_FILE + ".tmp")
    torch.save(dict(state), tmp)
    tmp.replace(model_dir / CONSOLIDATED_FILE)
    return model_dir
