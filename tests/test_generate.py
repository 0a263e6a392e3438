"""generate.py: prompts, batching, resumption on a tiny random Chameleon; full run when the VQGAN exists."""

import importlib.util
import json
import random

import pyarrow as pa
import pytest

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.sequences import ImageBlockError, image_block
from medmax_pipeline.stages.evaluate.generate import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerateError,
    GenerationSettings,
    GreedyPreset,
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
    batches = plan_batches(rows, 2, DEFAULT_MAX_NEW_TOKENS, GreedyPreset())
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert [0, 2] in batches and [4] in batches  # closed and mcq share the 8-token budget
    assert batches == plan_batches(rows, 2, DEFAULT_MAX_NEW_TOKENS, GreedyPreset())


def test_read_eval_set_errors(tmp_path):
    bad = tmp_path / "eval.jsonl"
    bad.write_text(json.dumps({"task_name": "slake", "question_type": "closed", "prompt": "Q", "answer": "yes", "image_path": "a.png"})
                   + "\n{broken\n")
    with pytest.raises(GenerateError, match=r"eval.jsonl line 2: not valid JSON"):
        read_eval_set(bad)
    bad.write_text(json.dumps({"task_name": "slake", "prompt": "Q"}) + "\n")
    with pytest.raises(GenerateError, match=r"eval.jsonl line 1: missing or non-text \['question_type'\]"):
        read_eval_set(bad)


def test_read_eval_set_names_the_line_of_a_lone_surrogate_or_invalid_utf8(tmp_path):
    import contextlib
    import io

    from medmax_pipeline.cli import main

    good = json.dumps({"task_name": "slake", "question_type": "closed", "prompt": "Q", "answer": "yes", "image_path": None})
    bad = tmp_path / "eval.jsonl"
    # json.dumps writes the lone surrogate as the escape \ud800, which json.loads gives back as it is.
    bad.write_text(good + "\n\n" + json.dumps({"task_name": "slake", "question_type": "closed", "prompt": "a\ud800b"}) + "\n")
    with pytest.raises(GenerateError, match=r"eval.jsonl line 3: column 'prompt' hold\(s\) a lone surrogate \(\\ud800"):
        read_eval_set(bad)
    bad.write_bytes(good.encode() + b"\n" + good.replace("Q", "Q\xff").encode("latin-1") + b"\n")
    with pytest.raises(GenerateError, match=r"eval.jsonl line 2: not valid UTF-8"):
        read_eval_set(bad)
    # Through the command: one error line on stderr, nothing on stdout, no traceback.
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["generate", "--eval-set", str(bad), "--image-root", str(tmp_path), "--ckpt", str(tmp_path),
                     "--base-model", str(tmp_path), "--model-name", "m", "--output", str(tmp_path / "p.parquet")])
    assert code == 1 and out.getvalue() == ""
    assert err.getvalue().count("error:") == 1 and "line 2: not valid UTF-8" in err.getvalue()
    assert "Traceback" not in err.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from medmax_pipeline.demo_models import build_tiny_chameleon
    from medmax_pipeline.models.chameleon import load_model_for_generation
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
    one = run_generation(rows, prompts, model, tokenizer, GenerationSettings(GreedyPreset(), batch_size=1, budgets=budgets))
    full = run_generation(rows, prompts, model, tokenizer, GenerationSettings(GreedyPreset(), batch_size=2, budgets=budgets))
    # Left padding with pad id 1 and an attention mask: batching does not change greedy output.
    assert [r["prediction"] for r in full] == [r["prediction"] for r in one]
    assert all(r["image_tokens"] == [] for r in full)

    partial = tmp_path / "pred.parquet.partial.jsonl"

    def stop_after_first(batch_no):
        if batch_no == 0:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run_generation(rows, prompts, model, tokenizer, GenerationSettings(GreedyPreset(), batch_size=2, budgets=budgets),
                       partial, "fp", on_batch=stop_after_first)
    assert len(partial.read_text().splitlines()) == 1 + 2  # header + one batch of two items
    counting = CountingModel(model)
    resumed = run_generation(rows, prompts, counting, tokenizer, GenerationSettings(GreedyPreset(), batch_size=2, budgets=budgets), partial, "fp")
    assert resumed == full
    assert counting.calls == len(plan_batches(rows, 2, {**DEFAULT_MAX_NEW_TOKENS, **budgets}, GreedyPreset())) - 1
    # Another fingerprint: the partial file is not trusted.
    counting.calls = 0
    run_generation(rows, prompts, counting, tokenizer, GenerationSettings(GreedyPreset(), batch_size=2, budgets=budgets), partial, "other")
    assert counting.calls == len(plan_batches(rows, 2, {**DEFAULT_MAX_NEW_TOKENS, **budgets}, GreedyPreset()))


def test_image_generation_emits_only_image_tokens(tiny):
    from medmax_pipeline.models.chameleon import image_logits_allowed
    from medmax_pipeline.core.text_tokenizer import encode_text

    model, tokenizer = tiny
    rows = [{"task_name": "image_generation", "question_type": "pmc_oa", "prompt": "a lung", "answer": "", "image_path": None}]
    prompts = [build_prompt_ids(encode_text(tokenizer, "a lung"), None, "finetuned", image_generation=True)]
    assert DEFAULT_MAX_NEW_TOKENS["image_generation"] == 1024
    # 24 tokens keep the test fast on CPU; the mechanism is the same for 1024.
    out = run_generation(rows, prompts, model, tokenizer, GenerationSettings(GreedyPreset(), batch_size=1, budgets={"image_generation": 24}))
    tokens = out[0]["image_tokens"]
    assert len(tokens) == 24 and all(C.FIRST_IMAGE_TOKEN_ID <= t <= C.LAST_IMAGE_TOKEN_ID for t in tokens)
    assert out[0]["prediction"] == ""
    assert image_logits_allowed(model)  # switched on for this batch


HAVE_VQGAN = importlib.util.find_spec("medmax_pipeline.models.vqgan") is not None and importlib.util.find_spec("medmax_pipeline.models.image_preprocess") is not None


@pytest.mark.skipif(not HAVE_VQGAN, reason="medmax_pipeline.models.vqgan / preprocess (another helper's stage 2) not present yet")
def test_generate_predictions_end_to_end(tmp_path):
    from medmax_pipeline.core.artifacts import read_artifact, read_meta
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
    assert read_meta(out).credential == "public"
    # The eval images reached through a symlink that lies in a credentialed root: credentialed.
    credentialed_root = tmp_path / "mimic"
    credentialed_root.mkdir()
    (credentialed_root / "eval").symlink_to(paths.eval_image_root)
    marked = tmp_path / "pred_credentialed.parquet"
    cred_args = [*args, "--credentialed-root", str(tmp_path / "elsewhere"), "--credentialed-root", str(paths.eval_image_root)]
    (tmp_path / "elsewhere").mkdir()
    cred_args[cred_args.index("--image-root") + 1] = str(credentialed_root / "eval")
    cred_args[cred_args.index("--output") + 1] = str(marked)
    assert main(cred_args) == 0
    meta = read_meta(marked)
    assert meta.credential == "credentialed" and meta.lineage["params"]["credentialed_image_rows"] > 0
    assert meta.lineage["inputs"][0]["credential"] == "credentialed"  # the eval set, which names the images
    assert read_artifact(marked, artifact="predictions").to_pylist() == first  # the same predictions


# ----------------------------------------------------------------------------------------------
# medmax preset
# ----------------------------------------------------------------------------------------------

from medmax_pipeline.stages.evaluate import generate as G  # noqa: E402


def _row(task, qtype, prompt="Q?", image="a.png"):
    return {"task_name": task, "question_type": qtype, "prompt": prompt, "answer": "x", "image_path": image}


def test_medmax_prompt_parts_are_the_public_sft_prompts():
    ft = "finetuned"
    assert G.medmax_prompt_parts(_row("slake", "closed", "Is it normal?"), ft) == [("image", "a.png"), ("text", "Is it normal?")]
    # Captioning asks the fixed question, whatever the row's prompt.
    assert G.medmax_prompt_parts(_row("image_captioning", "pmc_oa", "Caption this"), ft) == [("image", "a.png"), ("text", "Please describe this picture.")]
    assert G.medmax_prompt_parts(_row("image_generation", "quilt", "A slide.", None), ft) == [("text", "A slide.")]
    # mm_out: the image_path is the reference answer, not an input.
    assert G.medmax_prompt_parts(_row("mm_out", "mm_out", "Show it.", "ref.png"), ft) == [("text", "Show it.")]
    vc = G.medmax_prompt_parts(_row("visual_chat", "detailed_description", "<image>\nDescribe"), ft)
    assert vc == [("image", "a.png"), ("text", "Analyze the image in a comprehensive and detailed manner.")]
    assert G.medmax_prompt_parts(_row("visual_chat", "conversation", "What is shown? <image>"), ft) == [("text", "What is shown?"), ("image", "a.png")]
    assert G.medmax_prompt_parts(_row("visual_chat", "conversation", "<image>\nWhat is shown?"), ft) == [("image", "a.png"), ("text", "What is shown?")]


def test_medmax_prompt_parts_baseline_are_the_public_chameleon_prompts():
    base = "baseline"
    assert G.medmax_prompt_parts(_row("slake", "closed", "Is it normal?"), base)[1] == (
        "text", "Answer the question based on this image and respond 'yes' or 'no'.\nQuestion: Is it normal?\nAnswer:")
    assert G.medmax_prompt_parts(_row("mm_out", "mm_out", "Show it."), base) == [("text", "Show it. Answer the question with one picture.")]
    assert G.medmax_prompt_parts(_row("image_captioning", "quilt"), base) == [("image", "a.png"), ("text", "Please describe this picture.")]


def test_build_medmax_prompt_layout():
    codes = list(range(1024))
    ids = G.build_medmax_prompt([("image", codes), ("text", [9000, 9001])], "finetuned", image_generation=False)
    assert ids[0] == C.BOS_ID and ids[1:1027] == image_block(codes) and ids[1027:] == [9000, 9001, C.SEPARATOR_ID]
    assert G.build_medmax_prompt([("text", [9000])], "finetuned", image_generation=True) == [C.BOS_ID, 9000, C.SEPARATOR_ID, C.BEGIN_IMAGE_ID]
    assert G.build_medmax_prompt([("text", [9000])], "baseline", image_generation=True) == [C.BOS_ID, 9000, C.BEGIN_IMAGE_ID]
    text_first = G.build_medmax_prompt([("text", [9000]), ("image", codes)], "finetuned", image_generation=False)
    assert text_first[:3] == [C.BOS_ID, 9000, C.BEGIN_IMAGE_ID] and text_first[-2:] == [C.END_IMAGE_ID, C.SEPARATOR_ID]


def test_image_generation_keeps_the_first_rows_of_each_subset():
    rows = [_row("image_generation", q, str(i), None) for i, q in enumerate(["a", "b", "a", "a", "b"])] + [_row("slake", "open")]
    assert G.select_image_generation_rows(rows, 2) == [0, 1, 2, 4, 5]
    assert G.select_image_generation_rows(rows, None) == list(range(6))


def test_medmax_batches_put_each_mm_out_row_alone():
    rows = [_row("mm_out", "mm_out"), _row("mm_out", "mm_out"), _row("slake", "closed"), _row("pmc_vqa", "mcq"), _row("slake", "open")]
    batches = G.plan_batches(rows, 4, G.MEDMAX_MAX_NEW_TOKENS, G.MedmaxPreset())
    assert [0] in batches and [1] in batches and [2, 3] in batches and [4] in batches  # closed and mcq: 1 token
    assert G.MEDMAX_MAX_NEW_TOKENS["closed"] == G.MEDMAX_MAX_NEW_TOKENS["mcq"] == 1 and G.MEDMAX_MAX_NEW_TOKENS["open"] == 60


def test_split_interleaved_like_the_public_split_token_sequence():
    image = [4, 5, 6]
    texts, images = G.split_interleaved([9000, 9001, C.BEGIN_IMAGE_ID, *image, C.END_IMAGE_ID, 9002, C.EOS_ID])
    assert texts == [[9000, 9001], [9002]] and images == [image]
    assert G.split_interleaved([C.BEGIN_IMAGE_ID, 4, 5]) == ([], [[4, 5]])  # cut off inside an image


def test_interleaved_switches_to_image_mode_and_back(monkeypatch):
    calls = []
    texts = iter([[9000, C.BEGIN_IMAGE_ID], [9001, C.EOS_ID]])

    def fake_text(model, prompts, budget, settings, allow_images=False):
        calls.append(("text", list(prompts[0]), budget, allow_images))
        return [next(texts)]

    def fake_images(model, prompts, num_codes, seeds, settings):
        calls.append(("image", list(prompts[0]), num_codes, seeds))
        return [[4] * num_codes]

    monkeypatch.setattr(G, "medmax_text", fake_text)
    monkeypatch.setattr(G, "medmax_images", fake_images)
    from medmax_pipeline.models.chameleon_decoding import PublicOptions

    settings = G.GenerationSettings(G.MedmaxPreset(options=PublicOptions(), vocab={}))
    out = G.medmax_interleaved(None, [0, 9999, C.SEPARATOR_ID], 16, 3, {"prompt": "p"}, settings)
    assert out == [9000, C.BEGIN_IMAGE_ID, 4, 4, 4, C.END_IMAGE_ID, 9001, C.EOS_ID]
    assert [c[0] for c in calls] == ["text", "image", "text"]
    assert calls[1][1] == [0, 9999, C.SEPARATOR_ID, 9000, C.BEGIN_IMAGE_ID] and calls[0][3] is True
    assert calls[2][1] == [0, 9999, C.SEPARATOR_ID, 9000, C.BEGIN_IMAGE_ID, 4, 4, 4, C.END_IMAGE_ID] and calls[2][2] == 16


def test_progress_lines_without_a_terminal():
    import io

    assert G.format_progress(50, 200, 1000, 10.0) == "generate: rows 50/200 (25.0%), 100.0 tokens/s, ETA 0h00m30s"
    assert G.format_progress(150, 200, 1000, 10.0, rows_this_run=50).endswith("ETA 0h00m10s")  # 100 resumed rows cost nothing
    assert G.format_progress(0, 10, 0, 0.0).endswith("ETA unknown")
    now = [0.0]
    out = io.StringIO()
    p = G.Progress(4, interval_s=60, stream=out, clock=lambda: now[0])
    for t in (10.0, 70.0, 80.0, 90.0):
        now[0] = t
        p.update(1, 5)
    lines = out.getvalue().splitlines()
    # One line after a minute, one at the end; none in between.
    assert lines == ["generate: rows 2/4 (50.0%), 0.1 tokens/s, ETA 0h01m10s", "generate: rows 4/4 (100.0%), 0.2 tokens/s, ETA 0h00m00s"]


def test_eval_image_paths_are_confined_to_the_image_root(tmp_path):
    from medmax_pipeline.core.paths import PathEscapeError, confined_path

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(b"x")
    (tmp_path / "secret.png").write_bytes(b"x")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    assert confined_path(root, "sub/ok.png") == (root / "sub" / "ok.png").resolve()
    for bad, reason in [("/etc/passwd", "absolute"), ("sub/../../secret.png", r"'\.\.'"), ("link.png", "outside"), ("", "names no file")]:
        with pytest.raises(PathEscapeError, match=reason):
            confined_path(root, bad)
    with pytest.raises(GenerateError, match=r"eval.jsonl row 1: image_path .*outside"):
        G.check_image_paths([_row("slake", "closed", image="sub/ok.png"), _row("slake", "closed", image="link.png")], root, "eval.jsonl")
    # mm_out reference images are checked too, though they are not encoded.
    with pytest.raises(GenerateError, match="row 0: image_path '../secret.png' has a '..'"):
        G.check_image_paths([_row("mm_out", "mm_out", image="../secret.png")], root, "eval.jsonl")
    assert G.input_image_paths([_row("mm_out", "mm_out", image="r.png"), _row("slake", "open")], G.MedmaxPreset()) == {"a.png": 1}


def test_rows_whose_image_lies_under_a_credentialed_root_by_real_or_spelled_path(tmp_path):
    from medmax_pipeline.core.paths import resolve_roots
    from medmax_pipeline.stages.evaluate.predictions import credentialed_image_rows

    mimic = tmp_path / "mimic"
    (mimic / "p10").mkdir(parents=True)
    (mimic / "p10" / "s1.jpg").write_bytes(b"x")
    public = tmp_path / "public"
    public.mkdir()
    (public / "pmc.png").write_bytes(b"x")
    (public / "cxr.jpg").symlink_to(mimic / "p10" / "s1.jpg")  # a public-looking name for a MIMIC file
    (tmp_path / "mimic_link").symlink_to(mimic)
    paths = ["pmc.png", "cxr.jpg", None, "../mimic/p10/s1.jpg", str(mimic / "p10" / "s1.jpg"), "missing.png"]
    for root in (mimic, tmp_path / "mimic_link"):  # the configured root itself may be a symlink
        assert credentialed_image_rows(paths, public, resolve_roots([root])) == [1, 3, 4]
    assert credentialed_image_rows(paths, public, []) == []
    # The image root itself inside the credentialed root: every row with an image.
    assert credentialed_image_rows(["a.png", None, "b/c.png"], tmp_path / "mimic_link" / "p10", resolve_roots([mimic])) == [0, 2]
    with pytest.raises(ValueError, match="--credentialed-root .*nowhere: folder does not exist"):
        resolve_roots([tmp_path / "nowhere"])


def test_predictions_of_a_credentialed_adapter_are_credentialed(tmp_path):
    from medmax_pipeline.core.artifacts import read_meta, write_artifact, write_provenance

    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text(json.dumps(_row("slake", "closed")) + "\n")
    (tmp_path / "tok").mkdir()
    (tmp_path / "base").mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    secret = tmp_path / "rows.jsonl"
    secret.write_text("{}\n")
    write_provenance(adapter, "adapter", credentialed_inputs=[secret])
    inputs = G.lineage_inputs(eval_set, tmp_path / "tok", tmp_path / "base", adapter)
    assert [e["credential"] for e in inputs] == ["public", "public", "public", "credentialed"]
    table = pa.table({c: pa.array([None], pa.string()) for c in G.PREDICTIONS_SCHEMA.names[:-1]}
                     | {"generated_image_tokens": pa.array([[]], pa.list_(pa.int32()))}, schema=G.PREDICTIONS_SCHEMA)
    write_artifact(table, tmp_path / "pred.parquet", artifact="predictions", inputs=inputs)
    assert read_meta(tmp_path / "pred.parquet").credential == "credentialed"
    public = G.lineage_inputs(eval_set, tmp_path / "tok", tmp_path / "base", None)
    assert all(e["credential"] == "public" for e in public)


def _medmax_settings(tokenizer, **kw):
    from medmax_pipeline.models.chameleon_decoding import PublicOptions

    return GenerationSettings(G.MedmaxPreset(options=PublicOptions(), vocab=tokenizer.get_vocab(with_added_tokens=True)), **kw)


def test_medmax_text_is_text_only_and_within_budget(tiny):
    from medmax_pipeline.core.text_tokenizer import special_token_ids

    model, tokenizer = tiny
    rows, prompts = _rows_and_prompts(tokenizer)
    out = run_generation(rows, prompts, model, tokenizer, _medmax_settings(tokenizer, batch_size=2, budgets={"open": 5}))
    special = special_token_ids(tokenizer)
    for row, prompt, item in zip(rows, prompts, out):
        ids = tokenizer.encode(item["prediction"], add_special_tokens=False).ids
        assert not set(ids) & special and item["image_tokens"] == []
    # closed and mcq: one token, as the public code.
    one = G.medmax_text(model, [prompts[0]], 1, _medmax_settings(tokenizer))
    assert len(one[0]) == 1 and one[0][0] not in special - {C.EOS_ID}


def test_medmax_image_generation_is_seeded_per_row_and_resumable(tiny, tmp_path):
    from medmax_pipeline.core.text_tokenizer import encode_text

    model, tokenizer = tiny
    rows = [_row("image_generation", "pmc_oa", p, None) for p in ("a lung", "a liver", "a heart")]
    prompts = [G.build_medmax_prompt([("text", encode_text(tokenizer, r["prompt"]))], "finetuned", True) for r in rows]
    budgets = {"image_generation": 12}  # the mechanism is the same for 1024
    one = run_generation(rows, prompts, model, tokenizer, _medmax_settings(tokenizer, batch_size=1, budgets=budgets))
    two = run_generation(rows, prompts, model, tokenizer, _medmax_settings(tokenizer, batch_size=2, budgets=budgets))
    assert [r["image_tokens"] for r in one] == [r["image_tokens"] for r in two]  # batch-independent draws
    for r in one:
        assert len(r["image_tokens"]) == 12 and all(C.FIRST_IMAGE_TOKEN_ID <= t <= C.LAST_IMAGE_TOKEN_ID for t in r["image_tokens"])
    assert len({tuple(r["image_tokens"]) for r in one}) == 3
    partial = tmp_path / "p.partial.jsonl"

    def kill(batch_no):
        raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        run_generation(rows, prompts, model, tokenizer, _medmax_settings(tokenizer, batch_size=2, budgets=budgets), partial, "fp", on_batch=kill)
    resumed = run_generation(rows, prompts, model, tokenizer, _medmax_settings(tokenizer, batch_size=2, budgets=budgets), partial, "fp")
    assert resumed == two


def test_the_decoding_preset_is_chosen_once_and_answers_the_per_preset_questions():
    from medmax_pipeline.models.chameleon_decoding import PublicOptions

    assert G.DECODINGS == ("medmax", "greedy") and G.DEFAULT_DECODING == "medmax"
    with pytest.raises(GenerateError, match=r"unknown decoding 'beam'; expected one of medmax, greedy"):
        G.decoding_preset("beam")
    medmax, greedy = G.decoding_preset("medmax", image_generation_rows=2), G.decoding_preset("greedy")
    assert isinstance(medmax, G.MedmaxPreset) and isinstance(greedy, G.GreedyPreset)
    mm_out, chat = _row("mm_out", "mm_out", image="ref.png"), _row("visual_chat", "conversation")
    gen, vqa = _row("image_generation", "pmc_oa", image=None), _row("slake", "closed")
    # What the string tests answered before, now each preset's own answer.
    assert [medmax.generation_kind(r) for r in (mm_out, gen, vqa)] == ["interleaved", "image", "text"]
    assert [greedy.generation_kind(r) for r in (mm_out, gen, vqa)] == ["text", "image", "text"]
    assert medmax.batch_key(gen, 5) == ("image", 5) and greedy.batch_key(gen, 5) == (True, 5)
    assert (medmax.prompt_tokenizer_file, medmax.requires_image_placeholder) == ("text_tokenizer.json", False)
    assert (greedy.prompt_tokenizer_file, greedy.requires_image_placeholder) == ("text_tokenizer_modified.json", True)
    assert not medmax.takes_input_image(mm_out) and greedy.takes_input_image(mm_out)
    assert not medmax.takes_input_image(gen) and not greedy.takes_input_image(gen)
    assert G.GenerationSettings(medmax).all_budgets()["closed"] == 1 and G.GenerationSettings(greedy).all_budgets()["closed"] == 8
    assert G.GenerationSettings(greedy, budgets={"closed": 3}).all_budgets()["closed"] == 3
    assert medmax.prediction(chat, [7], [7], [], lambda ids: " x ") == ("x", [])  # visual chat answers are stripped
    assert greedy.prediction(chat, [7], [7], [], lambda ids: " x ") == (" x ", [])
    interleaved = [9000, C.BEGIN_IMAGE_ID, 4, 5, C.END_IMAGE_ID, 9001]
    assert medmax.prediction(mm_out, interleaved, [], [], lambda ids: str(list(ids))) == ("[9000] [9001]", [4, 5])
    assert len(medmax.select_rows([gen, gen, gen, vqa])) == 3 and len(greedy.select_rows([gen, gen, gen, vqa])) == 4
    assert greedy.lineage_params(4) == {}
    bound = G.MedmaxPreset(image_generation_rows=2, options=PublicOptions())
    assert bound.lineage_params(4) | {"decoding_options": None} == {
        "decoding_options": None, "prompt_tokenizer": "text_tokenizer.json", "image_generation_rows_per_subset": 2, "rows_after_selection": 4}


def test_run_generation_leaves_the_callers_settings_and_preset_as_they_were(tiny):
    import dataclasses

    model, tokenizer = tiny
    rows, prompts = _rows_and_prompts(tokenizer, n=2)
    settings = GenerationSettings(G.MedmaxPreset(), batch_size=2, budgets={"open": 2})
    before = repr(settings)
    out = run_generation(rows, prompts, model, tokenizer, settings)
    assert len(out) == 2 and repr(settings) == before
    assert settings.preset.options is None and settings.preset.vocab is None  # the bound copy stayed inside
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.preset.vocab = {}  # type: ignore[misc]
    # The medmax decoding functions refuse a preset that was never bound to its tokenizer.
    with pytest.raises(GenerateError, match="MedmaxPreset.with_tokenizer"):
        G.medmax_text(model, [prompts[0]], 1, settings)
