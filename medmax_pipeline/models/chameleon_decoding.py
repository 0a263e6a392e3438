"""Chameleon's decoding, as the public MedMax evaluation ran it, on top of transformers' `generate`.

The public code (chameleon/inference/chameleon.py, `Options` defaults; logits_processor.py) does:
* text: allow only eos + text tokens (+ begin-of-image when images are allowed; never at or after
  length max_seq_len - 1026), then transformers' RepetitionPenaltyLogitsProcessor(1.2) over the
  whole sequence so far (prompt included), then argmax. Its temperature 1.0 and top-p 0.9 warpers
  cannot change an argmax, so they are left out here. Stops at eos only.
* image: three streams (the full prompt, the prompt's image tokens only, bos + begin-of-image)
  mixed as uncond + 1.2 * (image_cond - uncond) + 3.0 * (full - image_cond), then image tokens
  only, temperature 0.7, top-p 0.9, one multinomial sample shared by the three streams.

The repetition penalty, temperature and top-p are transformers' own classes (the public code
imports the same ones). What transformers lacks is written here: an allow-only mask with a
length limit, the two-scale classifier-free guidance (transformers' CFG is one-scale and on
log-softmaxed scores), and sampling seeded per row, so a row gets the same tokens whatever batch
it is in and on every rerun. Sampling happens inside the logits processors (the chosen token is
left as the only finite logit), so `generate` itself runs greedy.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from transformers import LogitsProcessor, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

from medmax_pipeline.core import constants as C

IMAGE_TOKEN_PREFIX = "IMGIMG"


@dataclass(frozen=True)
class PublicOptions:
    """chameleon/inference/chameleon.py `Options` defaults, as the MedMax evaluation used them."""

    repetition_penalty: float = 1.2
    guidance_scale_text: float = 3.0
    guidance_scale_image: float = 1.2
    image_temperature: float = 0.7
    image_top_p: float = 0.9
    max_seq_len: int = 4096
    seed: int = 42


# ----------------------------------------------------------------------------------------------
# Vocabulary sets (VocabInfo of the public code)
# ----------------------------------------------------------------------------------------------


def public_image_token_ids(vocab: Mapping[str, int]) -> list[int]:
    return sorted(i for name, i in vocab.items() if name.startswith(IMAGE_TOKEN_PREFIX))


def public_text_token_ids(vocab: Mapping[str, int]) -> list[int]:
    """VocabInfo.text_tokens: every id except IMGIMG names and names starting with '<' (but '<' itself)."""
    special = {i for name, i in vocab.items() if name.startswith("<") and name != "<"}
    image = set(public_image_token_ids(vocab))
    return sorted(set(vocab.values()) - special - image)


def image_conditioned_prompt(ids: Sequence[int]) -> list[int]:
    """The prompt with its text removed: image tokens, bos, begin- and end-of-image (pads drop out too)."""
    keep = {C.BOS_ID, C.BEGIN_IMAGE_ID, C.END_IMAGE_ID}
    return [int(t) for t in ids if C.FIRST_IMAGE_TOKEN_ID <= t <= C.LAST_IMAGE_TOKEN_ID or t in keep]


UNCONDITIONED_PROMPT = (C.BOS_ID, C.BEGIN_IMAGE_ID)


def row_seed(base_seed: int, identity: Mapping[str, Any]) -> int:
    """A 63-bit seed from the base seed and a row's identity (its content, not its position)."""
    text = json.dumps({"seed": base_seed, "row": identity}, sort_keys=True, default=str)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


# ----------------------------------------------------------------------------------------------
# Logits processors
# ----------------------------------------------------------------------------------------------


class AllowOnlyTokens(LogitsProcessor):
    """Every logit outside `allowed` becomes -inf; `limited` ids are also refused once the sequence
    is `limit_from_length` long or longer (public: begin-of-image at or after max_seq_len - 1026)."""

    def __init__(self, allowed: Sequence[int], limited: Sequence[int] = (), limit_from_length: int | None = None):
        self.allowed = torch.tensor(sorted(set(int(i) for i in allowed)), dtype=torch.long)
        self.limited = torch.tensor(sorted(set(int(i) for i in limited)), dtype=torch.long)
        self.limit_from_length = limit_from_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        allowed = self.allowed.to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        out[:, allowed] = scores[:, allowed]
        if self.limit_from_length is not None and input_ids.shape[1] >= self.limit_from_length and len(self.limited):
            out[:, self.limited.to(scores.device)] = float("-inf")
        return out


def combine_instruct_cfg(full: torch.Tensor, image_conditioned: torch.Tensor, unconditioned: torch.Tensor,
                         guidance_scale_text: float, guidance_scale_image: float) -> torch.Tensor:
    """The public InBatchInstructCFGLogitsProcessor's mix of raw logits, term for term."""
    return (
        unconditioned
        + guidance_scale_image * (image_conditioned - unconditioned)
        + guidance_scale_text * (full - image_conditioned)
    )


class _Stream:
    """Extra sequences run through the model beside `generate`, one token per step, with their own cache."""

    def __init__(self, model: Any, prompts: Sequence[Sequence[int]]):
        self.model = model
        width = max(len(p) for p in prompts)
        device = next(model.parameters()).device
        self.input_ids = torch.tensor([[C.PAD_ID] * (width - len(p)) + list(p) for p in prompts], device=device)
        self.attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        self.past = None

    def next_logits(self, last_tokens: torch.LongTensor | None) -> torch.Tensor:
        if self.past is None:
            ids, mask = self.input_ids, self.attention_mask
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
        else:
            ids = last_tokens.view(-1, 1).to(self.input_ids.device)
            self.attention_mask = torch.cat([self.attention_mask, torch.ones_like(ids)], dim=1)
            mask = self.attention_mask
            positions = (mask.sum(-1, keepdim=True) - 1)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=self.past,
                         use_cache=True)
        self.past = out.past_key_values
        return out.logits[:, -1, :].float()


class InstructCFG(LogitsProcessor):
    """Chameleon's two-scale classifier-free guidance for a batch that `generate` runs conditioned.

    `generate` gives the full-prompt logits; this processor runs the image-conditioned and the
    unconditioned prompts itself (one batch of 2B rows, own KV cache), feeding each step the token
    `generate` appended, and returns the mixed logits.
    """

    def __init__(self, model: Any, prompts: Sequence[Sequence[int]], guidance_scale_text: float,
                 guidance_scale_image: float):
        self.batch = len(prompts)
        extra = [image_conditioned_prompt(p) for p in prompts] + [list(UNCONDITIONED_PROMPT)] * self.batch
        self.stream = _Stream(model, extra)
        self.guidance_scale_text = guidance_scale_text
        self.guidance_scale_image = guidance_scale_image
        self.steps = 0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        last = None if self.steps == 0 else input_ids[:, -1].repeat(2)
        self.steps += 1
        extra = self.stream.next_logits(last).to(scores.device)
        image_conditioned, unconditioned = extra[: self.batch], extra[self.batch :]
        return combine_instruct_cfg(scores.float(), image_conditioned, unconditioned, self.guidance_scale_text,
                                    self.guidance_scale_image).to(scores.dtype)


def sample_rows(scores: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.LongTensor:
    """One multinomial draw per row from softmax(scores), row i with generators[i] (on the CPU)."""
    probs = scores.float().softmax(dim=-1).cpu()
    return torch.stack([torch.multinomial(probs[i], 1, generator=g)[0] for i, g in enumerate(generators)])


class SeededSampling(LogitsProcessor):
    """Samples each row with its own seeded generator and leaves the chosen token as the only finite
    logit, so greedy `generate` takes it; the draw does not depend on the batch a row is in."""

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        chosen = sample_rows(scores, self.generators).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(scores.shape[0], device=scores.device), chosen] = 0.0
        return out


# ----------------------------------------------------------------------------------------------
# The public processor lists
# ----------------------------------------------------------------------------------------------


def text_processors(vocab: Mapping[str, int], options: PublicOptions, allow_images: bool) -> list[LogitsProcessor]:
    """TextDecoder._logits_processors of the public code, for greedy text."""
    allowed = [C.EOS_ID, *public_text_token_ids(vocab)]
    if allow_images:
        allowed.append(C.BEGIN_IMAGE_ID)
    limit = options.max_seq_len - C.IMAGE_BLOCK_LEN if allow_images else None
    return [
        AllowOnlyTokens(allowed, limited=[C.BEGIN_IMAGE_ID], limit_from_length=limit),
        RepetitionPenaltyLogitsProcessor(options.repetition_penalty),
    ]


def image_processors(model: Any, prompts: Sequence[Sequence[int]], vocab: Mapping[str, int], options: PublicOptions,
                     seeds: Sequence[int]) -> list[LogitsProcessor]:
    """ImageDecoder's processors of the public code (CFG, image tokens only, temperature, top-p), then
    the seeded draw. `prompts` end with begin-of-image."""
    return [
        InstructCFG(model, prompts, options.guidance_scale_text, options.guidance_scale_image),
        AllowOnlyTokens(public_image_token_ids(vocab)),
        TemperatureLogitsWarper(options.image_temperature),
        TopPLogitsWarper(options.image_top_p),
        SeededSampling(seeds),
    ]
