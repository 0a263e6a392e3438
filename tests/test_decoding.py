"""models/chameleon_decoding.py: the public Chameleon decoding pieces against hand-computed logits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

from medmax_pipeline.core import constants as C
from medmax_pipeline.models.chameleon_decoding import (
    AllowOnlyTokens,
    InstructCFG,
    PublicOptions,
    SeededSampling,
    combine_instruct_cfg,
    image_conditioned_prompt,
    image_processors,
    public_image_token_ids,
    public_text_token_ids,
    row_seed,
    text_processors,
)


def test_public_options_are_chameleons_defaults():
    o = PublicOptions()
    assert (o.repetition_penalty, o.guidance_scale_text, o.guidance_scale_image) == (1.2, 3.0, 1.2)
    assert (o.image_temperature, o.image_top_p, o.max_seq_len, o.seed) == (0.7, 0.9, 4096, 42)


def test_vocabulary_sets_follow_the_public_vocabinfo():
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "IMGIMGAZ": 4, "IMGIMGBZ": 5, "<": 6, "<b": 7, "a": 8, "<reserved08796>": 8800, "b>": 9}
    # Names starting with '<' are special (except '<' itself), IMGIMG names are images.
    assert public_text_token_ids(vocab) == [6, 8, 9]
    assert public_image_token_ids(vocab) == [4, 5]


def test_image_conditioned_prompt_keeps_image_tokens_and_markers_only():
    prompt = [C.PAD_ID, C.BOS_ID, 9000, C.BEGIN_IMAGE_ID, 4, 8195, C.END_IMAGE_ID, 9001, C.SEPARATOR_ID, C.BEGIN_IMAGE_ID]
    assert image_conditioned_prompt(prompt) == [C.BOS_ID, C.BEGIN_IMAGE_ID, 4, 8195, C.END_IMAGE_ID, C.BEGIN_IMAGE_ID]


def test_repetition_penalty_is_transformers_own_with_chameleons_value():
    # The public TextDecoder imports transformers' RepetitionPenaltyLogitsProcessor(1.2): seen
    # tokens with a positive logit are divided by 1.2, negative ones multiplied, prompt included.
    processors = text_processors({"<s>": 0, "<pad>": 1, "</s>": 2, "a": 3, "b": 4, "c": 5}, PublicOptions(), allow_images=False)
    assert isinstance(processors[1], RepetitionPenaltyLogitsProcessor) and processors[1].penalty == 1.2
    scores = torch.tensor([[9.0, 9.0, 2.0, 2.4, -1.0, 0.5]])
    out = processors[1](torch.tensor([[0, 3, 4]]), processors[0](torch.tensor([[0, 3, 4]]), scores.clone()))
    expected = torch.tensor([[float("-inf"), float("-inf"), 2.0, 2.0, -1.2, 0.5]])
    assert torch.allclose(out, expected)


def test_allow_only_tokens_and_the_begin_image_limit():
    proc = AllowOnlyTokens([2, 3, C.BEGIN_IMAGE_ID], limited=[C.BEGIN_IMAGE_ID], limit_from_length=4)
    scores = torch.arange(C.BEGIN_IMAGE_ID + 1, dtype=torch.float).unsqueeze(0)
    short = proc(torch.zeros((1, 3), dtype=torch.long), scores.clone())
    assert torch.isfinite(short).nonzero()[:, 1].tolist() == [2, 3, C.BEGIN_IMAGE_ID]
    assert short[0, 3] == 3.0  # allowed logits are left as they are
    long = proc(torch.zeros((1, 4), dtype=torch.long), scores.clone())
    assert torch.isfinite(long).nonzero()[:, 1].tolist() == [2, 3]
    # Text tasks: begin-of-image is refused; mm_out: allowed until max_seq_len - 1026.
    vocab = {"</s>": 2, "a": 9000, "<racm3:break>": C.BEGIN_IMAGE_ID}
    assert text_processors(vocab, PublicOptions(), allow_images=False)[0].allowed.tolist() == [2, 9000]
    mm = text_processors(vocab, PublicOptions(), allow_images=True)[0]
    assert mm.allowed.tolist() == [2, C.BEGIN_IMAGE_ID, 9000] and mm.limit_from_length == 4096 - 1026


def test_combine_instruct_cfg_by_hand():
    full = torch.tensor([[1.0, 2.0, -1.0]])
    image = torch.tensor([[0.5, 1.0, 0.0]])
    uncond = torch.tensor([[0.0, 0.5, 1.0]])
    # uncond + 1.2 * (image - uncond) + 3.0 * (full - image)
    expected = torch.tensor([[0.0 + 0.6 + 1.5, 0.5 + 0.6 + 3.0, 1.0 - 1.2 - 3.0]])
    assert torch.allclose(combine_instruct_cfg(full, image, uncond, 3.0, 1.2), expected)


class RecordingModel(torch.nn.Module):
    """A stand-in for Chameleon: the last logits of a row are sum(ids)/1000 + v * len(ids) over the
    real (unpadded) ids it has seen, its cache is the list of those ids."""

    vocab = 4

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.prompts = []

    def forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache):
        if past_key_values is None:
            seen = [[int(t) for t, m in zip(row, mask) if m] for row, mask in zip(input_ids, attention_mask)]
            self.prompts.append(seen)
            # Positions count real tokens only (left padding).
            assert [p[-1].item() for p in position_ids] == [len(s) - 1 for s in seen]
        else:
            seen = [s + [int(t)] for s, t in zip(past_key_values, input_ids[:, -1])]
            assert [p[-1].item() for p in position_ids] == [len(s) - 1 for s in seen]
        logits = torch.tensor([[sum(s) / 1000 + v * len(s) for v in range(self.vocab)] for s in seen]).unsqueeze(1)
        return SimpleNamespace(logits=logits, past_key_values=seen)


def test_instruct_cfg_runs_the_two_extra_streams_and_mixes_by_hand():
    model = RecordingModel()
    prompt = [C.BOS_ID, 9000, 20, C.SEPARATOR_ID, C.BEGIN_IMAGE_ID]  # text 9000, image token 20
    cfg = InstructCFG(model, [prompt], guidance_scale_text=3.0, guidance_scale_image=1.2)
    assert model.prompts == []  # nothing runs before generation starts
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out = cfg(torch.tensor([prompt]), scores)
    assert model.prompts == [[[C.BOS_ID, 20, C.BEGIN_IMAGE_ID], [C.BOS_ID, C.BEGIN_IMAGE_ID]]]
    # image-conditioned [0, 20, 8197]: 8.217 + 3v; unconditioned [0, 8197]: 8.197 + 2v.
    ic = torch.tensor([8.217, 11.217, 14.217, 17.217])
    un = torch.tensor([8.197, 10.197, 12.197, 14.197])
    assert torch.allclose(out[0], un + 1.2 * (ic - un) + 3.0 * (scores[0] - ic), atol=1e-5)
    assert torch.allclose(out[0, 0], torch.tensor(8.197 + 1.2 * 0.02 + 3.0 * (1.0 - 8.217)), atol=1e-5)
    # Next step: both streams get the token generate appended (30).
    out2 = cfg(torch.tensor([prompt + [30]]), scores)
    ic2 = torch.tensor([8.247 + 4 * v for v in range(4)])
    un2 = torch.tensor([8.227 + 3 * v for v in range(4)])
    assert torch.allclose(out2[0], un2 + 1.2 * (ic2 - un2) + 3.0 * (scores[0] - ic2), atol=1e-5)


def test_instruct_cfg_batches_rows_of_different_lengths():
    model = RecordingModel()
    prompts = [[C.BOS_ID, 9010, C.BEGIN_IMAGE_ID], [C.BOS_ID, 4, 5, 9011, 9012, C.BEGIN_IMAGE_ID]]
    cfg = InstructCFG(model, prompts, 3.0, 1.2)
    width = max(len(p) for p in prompts)
    padded = torch.tensor([[C.PAD_ID] * (width - len(p)) + p for p in prompts])
    cfg(padded, torch.zeros((2, 4)))
    assert model.prompts[0] == [[0, 8197], [0, 4, 5, 8197], [0, 8197], [0, 8197]]
    cfg(torch.cat([padded, torch.tensor([[7], [8]])], dim=1), torch.zeros((2, 4)))  # rows get their own token


def test_seeded_sampling_is_per_row_and_batch_independent():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]] * 3))
    alone = [SeededSampling([s])(None, logits[:1].clone()) for s in (1, 2, 3)]
    together = SeededSampling([1, 2, 3])(None, logits.clone())
    assert all(torch.equal(a[0], t) for a, t in zip(alone, together))
    for row in together:  # exactly one finite logit, at 0: greedy generate takes that token
        assert torch.isfinite(row).sum() == 1 and row.max() == 0
    # A rerun with the same seeds gives the same draws, step after step.
    first, second = SeededSampling([7, 8]), SeededSampling([7, 8])
    draws = [[int(first(None, logits[:2].clone()).argmax(-1)[i]) for i in range(2)] for _ in range(20)]
    again = [[int(second(None, logits[:2].clone()).argmax(-1)[i]) for i in range(2)] for _ in range(20)]
    assert draws == again and len({tuple(d) for d in draws}) > 1


def test_top_p_then_sampling_never_draws_a_removed_token():
    # Chameleon's image warpers (transformers' own): temperature 0.7, then top-p 0.9.
    probs = torch.tensor([[0.5, 0.45, 0.04, 0.01]])
    scores = TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(0.7)(None, probs.log()))
    assert torch.isinf(scores[0, 2:]).all() and torch.isfinite(scores[0, :2]).all()
    sampler = SeededSampling([0])
    assert {int(sampler(None, scores.clone()).argmax()) for _ in range(50)} == {0, 1}


def test_image_processors_are_the_public_order():
    model = RecordingModel()
    vocab = {"IMGIMGAZ": 4, "IMGIMGBZ": 5, "a": 9000}
    procs = image_processors(model, [[0, 8197]], vocab, PublicOptions(), seeds=[1])
    assert [type(p).__name__ for p in procs] == ["InstructCFG", "AllowOnlyTokens", "TemperatureLogitsWarper", "TopPLogitsWarper", "SeededSampling"]
    assert procs[1].allowed.tolist() == [4, 5] and procs[2].temperature == 0.7 and procs[3].top_p == 0.9


def test_row_seed_depends_on_the_row_not_its_position():
    a = {"task_name": "image_generation", "question_type": "pmc_oa", "prompt": "a lung", "image_path": None}
    assert row_seed(42, a) == row_seed(42, dict(reversed(list(a.items()))))
    assert row_seed(42, a) != row_seed(42, {**a, "prompt": "a liver"}) and row_seed(42, a) != row_seed(43, a)
    assert 0 <= row_seed(42, a) < 2**63


@pytest.mark.parametrize("bad", [0.0, -1.0])
def test_repetition_penalty_refuses_nonpositive(bad):
    with pytest.raises(ValueError):
        text_processors({"a": 9000}, PublicOptions(repetition_penalty=bad), allow_images=False)
