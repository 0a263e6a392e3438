"""Stage 6: generate predictions on the evaluation set with the base or the trained model.

    medmax generate --eval-set eval.jsonl --image-root eval/images --ckpt CKPT_DIR \
        --base-model HF_DIR [--adapter ADAPTER_DIR] --model-name trained --output predictions.parquet \
        [--batch-size 8] [--max-items N] [--device cpu] [--prompt-style auto|finetuned|baseline]

Prompts (MEDMAX-FACTS.md, and the public evaluation code):
* finetuned: bos, the image block (8197, codes+4 x1024, 8196), the question, 8710.
* baseline (the base model): bos, the image block, then "Answer the question based on this image
  and respond 'yes' or 'no'.\\nQuestion: {q}\\nAnswer:" (open: "...based on this image.\\n";
  mcq: "...respond 'A', 'B', 'C', or 'D'.\\n"); other tasks: the prompt as it is.
* image generation: the text prompt (then 8710 for finetuned), then 8197; exactly 1024 image
  tokens are generated with every non-image logit masked, as the public code did (txt = False).
--prompt-style auto picks finetuned when --adapter is given and baseline otherwise.

Images are tokenized with the checkpoint's own VQGAN (<ckpt>/tokenizer/vqgan.yaml + .ckpt) and the
exact Chameleon preprocessing, in fp32; the text tokenizer is <ckpt>/tokenizer/
text_tokenizer_modified.json. A missing or unreadable image is an error naming the row (the
public code silently used a black image).

Greedy decoding, batched with left padding (pad id 1). Resumable: every finished batch is
appended to OUTPUT.partial.jsonl; a restarted run skips the batches found there. Batches are
formed the same way on every run (eval order within each generation kind), so the final artifact
is identical to an uninterrupted run. The partial file is removed once the artifact is written.

Artifact `predictions`: task_name, question_type, prompt, answer, image_path, model, prediction
(decoded text), prediction_first_token (decoded first generated token; the medmax rule reads
it), generated_image_tokens (list<int32>: the 1024 generated image tokens as vocabulary ids,
code + 4, without the 8197/8196 markers; empty when none).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import pyarrow as pa

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.artifacts import write_artifact
from medmax_pipeline.core.sequences import image_block

EVAL_COLUMNS = ("task_name", "question_type", "prompt", "answer", "image_path")
PREDICTIONS_SCHEMA = pa.schema([
    ("task_name", pa.string()), ("question_type", pa.string()), ("prompt", pa.string()), ("answer", pa.string()),
    ("image_path", pa.string()), ("model", pa.string()), ("prediction", pa.string()),
    ("prediction_first_token", pa.string()), ("generated_image_tokens", pa.list_(pa.int32())),
])
# Default new-token budgets by question type / task. closed and mcq: the public code read one
# token; a few more let the sentence-level rules (strict, llava_med) see a short answer.
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {
    "closed": 8, "mcq": 8, "open": 60, "image_captioning": 256, "visual_chat": 256, "mm_out": 256,
    "other": 256,
    # 1024 codes, the 8197 is in the prompt; lower it only for smoke tests (the scorer then
    # refuses the image, it needs 1024 codes).
    "image_generation": C.CODES_PER_IMAGE,
}
IMAGE_GENERATION = "image_generation"

BASELINE_TEMPLATES = {
    "closed": "Answer the question based on this image and respond 'yes' or 'no'.\n",
    "open": "Answer the question based on this image.\n",
    "mcq": "Answer the question based on this image and respond 'A', 'B', 'C', or 'D'.\n",
}


class GenerateError(ValueError):
    """The evaluation set, an image or an option is unusable; the message names file and row."""


# ----------------------------------------------------------------------------------------------
# Evaluation set and prompts: pure functions
# ----------------------------------------------------------------------------------------------


def read_eval_set(path: str | Path) -> list[dict[str, Any]]:
    """Rows of medmax_eval_data (jsonl or parquet) with the five contract columns."""
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"evaluation set {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise GenerateError(f"{path} line {lineno}: not valid JSON: {exc}") from exc
                if not isinstance(row, dict):
                    raise GenerateError(f"{path} line {lineno}: expected a JSON object")
                rows.append(row)
    for i, row in enumerate(rows):
        missing = [c for c in ("task_name", "question_type", "prompt") if not isinstance(row.get(c), str)]
        if missing:
            raise GenerateError(f"{path} row {i}: missing or non-text {missing}")
        for c in ("answer", "image_path"):
            if row.get(c) is not None and not isinstance(row[c], str):
                raise GenerateError(f"{path} row {i}: {c} must be text or null, got {type(row[c]).__name__}")
    return [{c: row.get(c) for c in EVAL_COLUMNS} for row in rows]


def baseline_prompt_text(question: str, question_type: str) -> str:
    """The public baseline (chameleon_prompt_processor) text for a VQA question."""
    if question_type not in BASELINE_TEMPLATES:
        return question
    if not question.endswith("\n"):
        question += "\n"
    return f"{BASELINE_TEMPLATES[question_type]}Question: {question}Answer:"


def build_prompt_ids(text_ids: Sequence[int], block: Sequence[int] | None, style: str, image_generation: bool = False) -> list[int]:
    """bos, [image block], text, [8710 for finetuned], [8197 to start an image]."""
    if style not in ("finetuned", "baseline"):
        raise GenerateError(f"unknown prompt style {style!r}")
    ids = [C.BOS_ID, *(block or []), *text_ids]
    if style == "finetuned":
        ids.append(C.SEPARATOR_ID)
    if image_generation:
        ids.append(C.BEGIN_IMAGE_ID)
    return ids


def max_new_tokens_for(row: Mapping[str, Any], budgets: Mapping[str, int]) -> int:
    if row["task_name"] == IMAGE_GENERATION:
        return budgets[IMAGE_GENERATION]
    if row["question_type"] in ("closed", "open", "mcq") and row["task_name"] not in ("image_captioning", "visual_chat", "mm_out"):
        return budgets[row["question_type"]]
    return budgets.get(row["task_name"], budgets["other"])


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int = C.PAD_ID) -> tuple[list[list[int]], list[list[int]]]:
    """Left-padded ids and attention masks (generation continues at the right end)."""
    width = max(len(s) for s in sequences)
    ids = [[pad_id] * (width - len(s)) + list(s) for s in sequences]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    return ids, mask


def plan_batches(rows: Sequence[Mapping[str, Any]], batch_size: int, budgets: Mapping[str, int]) -> list[list[int]]:
    """Row indices per batch: grouped by generation kind and budget, eval order inside a group.

    Depends only on the rows and these arguments, so a resumed run forms the same batches.
    """
    if batch_size < 1:
        raise GenerateError("batch size must be at least 1")
    groups: dict[tuple[bool, int], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault((row["task_name"] == IMAGE_GENERATION, max_new_tokens_for(row, budgets)), []).append(i)
    batches = []
    for key in sorted(groups):
        idx = groups[key]
        batches += [idx[j : j + batch_size] for j in range(0, len(idx), batch_size)]
    return batches


def split_generated(ids: Sequence[int], image_generation: bool) -> tuple[list[int], list[int]]:
    """(text ids up to the first eos / end of turn, image token ids) of one generated sequence."""
    if image_generation:
        image = [int(t) for t in ids if C.FIRST_IMAGE_TOKEN_ID <= t <= C.LAST_IMAGE_TOKEN_ID][: C.CODES_PER_IMAGE]
        return [], image
    text = []
    for t in ids:
        if t in (C.EOS_ID, C.SEPARATOR_ID, C.PAD_ID):
            break
        text.append(int(t))
    return text, []


# ----------------------------------------------------------------------------------------------
# Resumable partial output
# ----------------------------------------------------------------------------------------------


def _partial_path(output: Path) -> Path:
    return output.with_name(output.name + ".partial.jsonl")


def load_partial(path: Path, fingerprint: str) -> dict[int, dict[str, Any]]:
    """Finished items of an interrupted run with the same fingerprint; a torn last line is ignored."""
    if not path.exists():
        return {}
    lines = path.read_text().splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if header.get("fingerprint") != fingerprint:
        print(f"note: {path} was made with other inputs or options; starting afresh")
        path.unlink()
        return {}
    done = {}
    for line in lines[1:]:
        try:
            item = json.loads(line)
            done[int(item["index"])] = item
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
    return done


def _append_partial(path: Path, fingerprint: str, items: list[dict[str, Any]]) -> None:
    new = not path.exists()
    with open(path, "a") as f:
        if new:
            f.write(json.dumps({"fingerprint": fingerprint}) + "\n")
        f.write("".join(json.dumps(item) + "\n" for item in items))
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


@dataclass
class GenerationSettings:
    batch_size: int = 8
    budgets: Mapping[str, int] | None = None
    prompt_style: str = "auto"
    device: str = "cpu"
    vqgan_batch_size: int = 4


def _image_only_processor():
    import torch
    from transformers import LogitsProcessor

    class ImageTokensOnly(LogitsProcessor):
        """Every logit outside the image-code ids is set to -inf (the public image-gen mode)."""

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            keep = torch.full_like(scores, float("-inf"))
            keep[:, C.FIRST_IMAGE_TOKEN_ID : C.LAST_IMAGE_TOKEN_ID + 1] = 0
            return scores + keep

    return ImageTokensOnly()


def tokenize_eval_images(rows: Sequence[Mapping[str, Any]], image_root: Path, vqgan: Any, source: str,
                         batch_size: int = 4) -> dict[str, list[int]]:
    """VQGAN codes of every distinct input image (image generation rows have no input image)."""
    from medmax_pipeline.models.image_preprocess import ImageDecodeError
    from medmax_pipeline.models.vqgan import encode_image_files

    wanted: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row["task_name"] != IMAGE_GENERATION and row["image_path"]:
            wanted.setdefault(row["image_path"], i)
    names = list(wanted)
    for name in names:
        if not (image_root / name).is_file():
            raise GenerateError(f"{source} row {wanted[name]}: image {image_root / name} does not exist (check --image-root)")
    try:
        encoded = encode_image_files(vqgan, [image_root / name for name in names], batch_size)
    except ImageDecodeError as exc:
        name = Path(exc.path).relative_to(image_root).as_posix()
        raise GenerateError(f"{source} row {wanted[name]}: image {exc.path} is unreadable: {exc.reason}") from exc
    return dict(zip(names, encoded))


def generate_batch(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, image_generation: bool,
                   device: str) -> list[list[int]]:
    """Greedy continuation ids (new tokens only) of left-padded prompts."""
    import torch

    from medmax_pipeline.models.chameleon import set_image_logits

    ids, mask = left_pad(prompts)
    input_ids = torch.tensor(ids, device=device)
    attention = torch.tensor(mask, device=device)
    set_image_logits(model, image_generation)
    kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=C.PAD_ID)
    if image_generation:
        kwargs.update(min_new_tokens=max_new_tokens, logits_processor=[_image_only_processor()])
    else:
        kwargs.update(eos_token_id=[C.EOS_ID, C.SEPARATOR_ID])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
    return [row[input_ids.shape[1] :].tolist() for row in out]


def decode_text(tokenizer: Any, ids: Sequence[int]) -> str:
    """Text of generated ids; ids of the special/image/reserved block are left out."""
    return tokenizer.decode([i for i in ids if i > C.LAST_RESERVED_ID], skip_special_tokens=False)


def run_generation(
    rows: Sequence[Mapping[str, Any]],
    prompt_ids: Sequence[Sequence[int]],
    model: Any,
    tokenizer: Any,
    settings: GenerationSettings,
    partial: Path | None = None,
    fingerprint: str = "",
    on_batch: Callable[[int], None] | None = None,
) -> list[dict[str, Any]]:
    """Generate for every row (prompt_ids already built); resumes from `partial` when given."""
    budgets = {**DEFAULT_MAX_NEW_TOKENS, **(settings.budgets or {})}
    done = load_partial(partial, fingerprint) if partial is not None else {}
    for batch_no, batch in enumerate(plan_batches(rows, settings.batch_size, budgets)):
        if all(i in done for i in batch):
            continue
        image_generation = rows[batch[0]]["task_name"] == IMAGE_GENERATION
        new = generate_batch(model, [prompt_ids[i] for i in batch], max_new_tokens_for(rows[batch[0]], budgets),
                             image_generation, settings.device)
        items = []
        for i, gen in zip(batch, new):
            text_ids, image_ids = split_generated(gen, image_generation)
            first = "" if not gen or image_generation else decode_text(tokenizer, gen[:1])
            items.append({"index": i, "prediction": decode_text(tokenizer, text_ids), "first_token": first,
                          "image_tokens": image_ids})
        if partial is not None:
            _append_partial(partial, fingerprint, items)
        done.update({item["index"]: item for item in items})
        if on_batch is not None:
            on_batch(batch_no)
    return [done[i] for i in range(len(rows))]


def _fingerprint(parts: Mapping[str, Any]) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def generate_predictions(
    eval_set: str | Path,
    image_root: str | Path,
    ckpt: str | Path,
    base_model: str | Path,
    model_name: str,
    output: str | Path,
    adapter: str | Path | None = None,
    batch_size: int = 8,
    max_items: int | None = None,
    device: str = "cpu",
    prompt_style: str = "auto",
    budgets: Mapping[str, int] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Path:
    """Generate predictions for an evaluation set and write the `predictions` artifact."""
    from medmax_pipeline.models.chameleon import load_model_for_generation
    from medmax_pipeline.core.text_tokenizer import MODIFIED_TOKENIZER_FILE, check_tokenizer_layout, encode_texts, load_tokenizer
    from medmax_pipeline.models.vqgan import load_vqgan

    eval_set, image_root, ckpt, output = Path(eval_set), Path(image_root), Path(ckpt), Path(output)
    style = ("finetuned" if adapter else "baseline") if prompt_style == "auto" else prompt_style
    if style not in ("finetuned", "baseline"):
        raise GenerateError(f"unknown prompt style {prompt_style!r}; expected auto, finetuned or baseline")
    rows = read_eval_set(eval_set)
    if max_items is not None:
        rows = rows[:max_items]
    tok_path = ckpt / "tokenizer" / MODIFIED_TOKENIZER_FILE
    tokenizer = load_tokenizer(tok_path)
    check_tokenizer_layout(tokenizer, source=str(tok_path))
    vqgan = load_vqgan(ckpt, device=device)
    codes = tokenize_eval_images(rows, image_root, vqgan, str(eval_set))
    texts = [r["prompt"] if (style == "finetuned" or r["task_name"] == IMAGE_GENERATION) else baseline_prompt_text(r["prompt"], r["question_type"])
             for r in rows]
    text_ids = encode_texts(tokenizer, texts)
    prompts = []
    for r, t in zip(rows, text_ids):
        block = image_block(codes[r["image_path"]]) if r["task_name"] != IMAGE_GENERATION and r["image_path"] else None
        prompts.append(build_prompt_ids(t, block, style, image_generation=r["task_name"] == IMAGE_GENERATION))
    del vqgan
    model = load_model_for_generation(base_model, adapter, allow_image_output=False, device=device, dtype=None, tokenizer=tok_path)
    settings = GenerationSettings(batch_size=batch_size, budgets=budgets, prompt_style=style, device=str(next(model.parameters()).device))
    all_budgets = {**DEFAULT_MAX_NEW_TOKENS, **(budgets or {})}
    params = {"model_name": model_name, "prompt_style": style, "batch_size": batch_size, "max_items": max_items,
              "budgets": all_budgets, "decoding": "greedy", "device": device}
    # Lineage entries are computed once: hashing a 7B model folder takes a while.
    from medmax_pipeline.core.artifacts import describe_input

    inputs = [describe_input(p) for p in [eval_set, ckpt / "tokenizer", base_model] + ([adapter] if adapter else [])]
    fingerprint = _fingerprint({**params, "prompts": _fingerprint({"p": prompts}),
                                "inputs": [entry["fingerprint"] for entry in inputs[2:]]})
    partial = _partial_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    results = run_generation(rows, prompts, model, tokenizer, settings, partial, fingerprint, on_batch)
    table = pa.table({
        **{c: pa.array([r[c] for r in rows], pa.string()) for c in EVAL_COLUMNS},
        "model": pa.array([model_name] * len(rows), pa.string()),
        "prediction": pa.array([r["prediction"] for r in results], pa.string()),
        "prediction_first_token": pa.array([r["first_token"] for r in results], pa.string()),
        "generated_image_tokens": pa.array([r["image_tokens"] for r in results], pa.list_(pa.int32())),
    }, schema=PREDICTIONS_SCHEMA)
    write_artifact(table, output, artifact="predictions", inputs=inputs, params=params)
    partial.unlink(missing_ok=True)
    return output


def _parse_budgets(items: Sequence[str] | None) -> dict[str, int]:
    budgets = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if key not in DEFAULT_MAX_NEW_TOKENS or not value.isdigit():
            raise GenerateError(f"--max-new-tokens {item!r}: expected KEY=N with KEY in {sorted(DEFAULT_MAX_NEW_TOKENS)}")
        budgets[key] = int(value)
    return budgets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-set", required=True, help="medmax_eval_data rows (jsonl or parquet)")
    parser.add_argument("--image-root", required=True, help="folder image_path values are relative to")
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (tokenizer/ with vqgan.yaml, vqgan.ckpt, text_tokenizer_modified.json)")
    parser.add_argument("--base-model", required=True, help="HF-format Chameleon / Anole folder")
    parser.add_argument("--adapter", help="PEFT adapter folder of the trained model (omit for the base model)")
    parser.add_argument("--model-name", required=True, help="value of the model column (e.g. base, trained)")
    parser.add_argument("--output", required=True, help="predictions.parquet to write")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-items", type=int, help="only the first N rows (smoke runs)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, or auto")
    parser.add_argument("--prompt-style", choices=("auto", "finetuned", "baseline"), default="auto")
    parser.add_argument("--max-new-tokens", nargs="*", metavar="KEY=N",
                        help=f"override new-token budgets; keys {sorted(DEFAULT_MAX_NEW_TOKENS)}")


def run(args: argparse.Namespace) -> int:
    try:
        out = generate_predictions(
            args.eval_set, args.image_root, args.ckpt, args.base_model, args.model_name, args.output,
            adapter=args.adapter, batch_size=args.batch_size, max_items=args.max_items, device=args.device,
            prompt_style=args.prompt_style, budgets=_parse_budgets(args.max_new_tokens),
        )
    except GenerateError as exc:
        print(f"error: {exc}")
        return 1
    print(f"wrote {out}")
    return 0
