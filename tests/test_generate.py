"""generate.py: prompts, batching, resumption on a tiny random Chameleon; full run when the VQGAN exists."""

import importlib.util
import json
import random

import pytest

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.sequences import ImageBlockError, image_block
from medmax_pipeline.stages.evaluate.generate import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerateError,
    GenerationSettings,
    baseline_prompt_text,
    build_prompt_ids,
    left_pad,
    plan_batches,
    read_eval_set,
    run_generation,
    split_generated,
)


def test_baseline_prompts_match_public_templates():
    assert baseline_prompt_text("Is it normal?", "closed") == (
        "Answer the question based on this image and respond 'yes' or 'no'.\nQuestion: Is it normal?\nAnswer:")
    assert baseline_prompt_text("Which organ?\n", "open") == "Answer the question based on this image.\nQuestion: Which organ?\nAnswer:"
    assert baseline_prompt_text("Pick", "mcq").startswith("Answer the question based on this image and respond 'A', 'B', 'C', or 'D'.\n")
    assert baseline_prompt_text("Describe.", "pmc_oa") == "Describe."


def test_prompt_ids_layout():
    block = image_block(list(range(1024)))
    assert len(block) == C.IMAGE_BLOCK_LEN and block[0] == C.BEGIN_IMAGE_ID and block[1] == 4 and block[-1] == C.END_IMAGE_ID
    ft = build_prompt_ids([9000, 9001], block, "finetuned")
    assert ft[0] == C.BOS_ID and ft[1:1027] == block and ft[-3:] == [9000, 9001, C.SEPARATOR_ID]
    base = build_prompt_ids([9000], block, "baseline")
    assert base[-1] == 9000 and C.SEPARATOR_ID not in base
    gen = build_prompt_ids([9000], None, "finetuned", image_generation=True)
    assert gen == [C.BOS_ID, 9000, C.SEPARATOR_ID, C.BEGIN_IMAGE_ID]
    with pytest.raises(ImageBlockError):
        image_block([1, 2, 3])


def test_left_pad_and_split():
    ids, mask = left_pad([[5, 6, 7], [8]])
    assert ids == [[5, 6, 7], [1, 1, 8]] and mask == [[1, 1, 1], [0, 0, 1]]
    assert split_generated([9001, 9002, C.EOS_ID, 9003], False) == ([9001, 9002], [])
    assert split_generated([9001, C.SEPARATOR_ID, 9003], False) == ([9001], [])
    assert split_generated([10, 11, 9000], True) == ([], [10, 11])


def test_plan_batches_groups_by_kind_and_is_stable():
    rows = [{"task_name": t, "question_type": q} for t, q in
            [("slake", "closed"), ("slake", "open"), ("pmc_vqa", "mcq"), ("slake", "closed"), ("image_generation", "pmc_oa")]]
    batches = plan_batches(rows, 2, DEFAULT_MAX_NEW_TOKENS)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert [0, 2] in batches and [4] in batches  # closed and mcq share the 8-token budget
    assert batches == plan_batches(rows, 2, DEFAULT_MAX_NEW_TOKENS)


def test_read_eval_set_errors(tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps({"task_name": "slake", "question_type": "closed", "prompt": "Q", "answer": "yes", "image_path": "a.png"})
                   + "\n{broken\n")
    with pytest.raises(GenerateError, match=r"eval.jsonl line 2: not valid JSON"):
        read_eval_set(bad)
    bad.write_text(json.dumps({"task_name": "slake", "prompt": "Q"}) + "\n")
    with pytest.raises(GenerateError, match=r"row 0: missing or non-text \['question_type'\]"):
        read_eval_set(bad)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from medmax_pipeline.models.chameleon import build_tiny_chameleon, load_model_for_generation
    from medmax_pipeline.core.text_tokenizer import build_chameleon_tokenizer, load_tokenizer, vocabulary_map

    root = tmp_path_factory.mktemp("tiny")
    corpus = ["Is there a lesion in the lung? yes no", "Which organ is shown? liver heart lung aorta"] * 20
    _, modified = build_chameleon_tokenizer(root / "tok", corpus, text_vocab_size=300)
    tokenizer = load_tokenizer(modified)
    model_dir = build_tiny_chameleon(root / "model", vocabulary_map(tokenizer), seed=0, hidden_size=32, num_layers=1, num_heads=2)
    model = load_model_for_generation(model_dir, None, allow_image_output=False, device="cpu", tokenizer=modified)
    return model, tokenizer


class CountingModel:
    def __init__(self, model):
        self.model = model
        self.calls = 0

    def generate(self, **kwargs):
        self.calls += 1
        return self.model.generate(**kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)


def _rows_and_prompts(tokenizer, n=5):
    from medmax_pipeline.core.text_tokenizer import encode_text

    rng = random.Random(0)
    rows, prompts = [], []
    for i in range(n):
        qtype = ["closed", "open", "mcq"][i % 3]
        rows.append({"task_name": "slake", "question_type": qtype, "prompt": "Is there a lesion?", "answer": "yes", "image_path": f"{i}.png"})
        codes = [rng.randrange(8192) for _ in range(1024)]
        prompts.append(build_prompt_ids(encode_text(tokenizer, "Is there a lesion" + "?" * (i % 2)), image_block(codes), "finetuned"))
    return rows, prompts


def test_batched_equals_unbatched_and_resume_is_identical(tiny, tmp_path):
    model, tokenizer = tiny
    rows, prompts = _rows_and_prompts(tokenizer)
    budgets = {"closed": 3, "mcq": 3, "open": 4}
    one = run_generation(rows, prompts, model, tokenizer, GenerationSettings(batch_size=1, budgets=budgets))
    full = run_generation(rows, prompts, model, tokenizer, GenerationSettings(batch_size=2, budgets=budgets))
    # Left padding with pad id 1 and an attention mask: batching does not change greedy output.
    assert [r["prediction"] for r in full] == [r["prediction"] for r in one]
    assert all(r["image_tokens"] == [] for r in full)

    partial = tmp_path / "pred.parquet.partial.jsonl"

    def stop_after_first(batch_no):
        if batch_no == 0:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run_generation(rows, prompts, model, tokenizer, GenerationSettings(batch_size=2, budgets=budgets),
                       partial, "fp", on_batch=stop_after_first)
    assert len(partial.read_text().splitlines()) == 1 + 2  # header + one batch of two items
    counting = CountingModel(model)
    resumed = run_generation(rows, prompts, counting, tokenizer, GenerationSettings(batch_size=2, budgets=budgets), partial, "fp")
    assert resumed == full
    assert counting.calls == len(plan_batches(rows, 2, {**DEFAULT_MAX_NEW_TOKENS, **budgets})) - 1
    # Another fingerprint: the partial file is not trusted.
    counting.calls = 0
    run_generation(rows, prompts, counting, tokenizer, GenerationSettings(batch_size=2, budgets=budgets), partial, "other")
    assert counting.calls == len(plan_batches(rows, 2, {**DEFAULT_MAX_NEW_TOKENS, **budgets}))


def test_image_generation_emits_only_image_tokens(tiny):
    from medmax_pipeline.models.chameleon import image_logits_allowed
    from medmax_pipeline.core.text_tokenizer import encode_text

    model, tokenizer = tiny
    rows = [{"task_name": "image_generation", "question_type": "pmc_oa", "prompt": "a lung", "answer": "", "image_path": None}]
    prompts = [build_prompt_ids(encode_text(tokenizer, "a lung"), None, "finetuned", image_generation=True)]
    assert DEFAULT_MAX_NEW_TOKENS["image_generation"] == 1024
    # 24 tokens keep the test fast on CPU; the mechanism is the same for 1024.
    out = run_generation(rows, prompts, model, tokenizer, GenerationSettings(batch_size=1, budgets={"image_generation": 24}))
    tokens = out[0]["image_tokens"]
    assert len(tokens) == 24 and all(C.FIRST_IMAGE_TOKEN_ID <= t <= C.LAST_IMAGE_TOKEN_ID for t in tokens)
    assert out[0]["prediction"] == ""
    assert image_logits_allowed(model)  # switched on for this batch


HAVE_VQGAN = importlib.util.find_spec("medmax_pipeline.models.vqgan") is not None and importlib.util.find_spec("medmax_pipeline.models.image_preprocess") is not None


@pytest.mark.skipif(not HAVE_VQGAN, reason="medmax_pipeline.models.vqgan / preprocess (another helper's stage 2) not present yet")
def test_generate_predictions_end_to_end(tmp_path):
    from medmax_pipeline.core.artifacts import read_artifact
    from medmax_pipeline.cli import main
    from medmax_pipeline.demo import default_paths, generate_demo

    paths = default_paths(tmp_path / "demo")
    generate_demo(paths, seed=0)
    out = tmp_path / "pred.parquet"
    args = ["generate", "--eval-set", str(paths.eval_set), "--image-root", str(paths.eval_image_root), "--ckpt",
            str(paths.checkpoint), "--base-model", str(paths.base_model), "--model-name", "base", "--output", str(out),
            "--batch-size", "2", "--max-items", "3", "--max-new-tokens", "closed=2", "open=3"]
    assert main(args) == 0
    table = read_artifact(out, artifact="predictions")
    assert table.num_rows == 3 and set(table.column("model").to_pylist()) == {"base"}
    assert not out.with_name(out.name + ".partial.jsonl").exists()
    first = table.to_pylist()
    out.unlink()
    assert main(args) == 0
    assert read_artifact(out, artifact="predictions").to_pylist() == first  # deterministic
