"""Stage 6: generate predictions on the evaluation set with the base or the trained model.

    medmax generate --eval-set eval.jsonl --image-root eval/images --ckpt CKPT_DIR \
        --base-model HF_DIR [--adapter ADAPTER_DIR] --model-name trained --output predictions.parquet \
        [--decoding medmax|greedy] [--batch-size 8] [--max-items N] [--device cpu]
        [--prompt-style auto|finetuned|baseline] [--max-new-tokens KEY=N ...] [--credentialed-root ROOT ...]

--prompt-style auto picks finetuned (the public "sft" prompt processor) when --adapter is given and
baseline (the public "chameleon" processor) otherwise.

Decoding presets (recorded in the artifact's lineage params, key "decoding"): two implementations
of one interface (DecodingPreset: MedmaxPreset, GreedyPreset), chosen once from the name by
decoding_preset(); everything that differs between them (prompt tokenizer, selected rows, prompts,
budgets, batching, how a batch is generated, the prediction text, lineage params) is the preset's.
* medmax (default): the public MedMax evaluation (evaluation/*.py, inference/inference_utils.py,
  chameleon/inference/chameleon.py `Options`; MEDMAX-FACTS.md "Evaluation"). Prompts are encoded
  with <ckpt>/tokenizer/text_tokenizer.json, as the public load_chameleon did, each starting with
  bos. finetuned: VQA image block, question, 8710; captioning image block, "Please describe this
  picture.", 8710 (the row's prompt is not used); image generation prompt, 8710, 8197; mm_out
  prompt, 8710; visual chat: `<image>` removed from the prompt, detailed_description asks "Analyze
  the image in a comprehensive and detailed manner." after the image block, conversation puts
  the image block after the question when the prompt ended with `<image>`, else before; then 8710.
  baseline: the same without 8710, VQA in the "Question: ...\nAnswer:" templates, mm_out with
  " Answer the question with one picture." appended. Text: greedy, repetition penalty 1.2, only
  eos and text tokens allowed (mm_out also begin-of-image), stop at eos, sequence at most 4096
  ids. Images: 1024 image tokens after 8197 with two-scale classifier-free guidance (text 3.0,
  image 1.2), temperature 0.7, top-p 0.9, sampled with a seed derived from 42 and the row's
  content (models/chameleon_decoding.py), so reruns, resumed runs and other batchings give the
  same tokens. mm_out switches to image mode at an 8197 and back to text after the 1024 codes and
  8196, one row at a time. Image generation keeps the first 100 rows of each subset
  (question_type), in eval order. Budgets: closed and mcq 1, open 60, captioning and visual
  chat 4096, mm_out 1024 per text segment.
* greedy: the behaviour before the presets: the modified tokenizer, the prompt as it is (bos,
  image block, text, 8710 for finetuned, 8197 for image generation), plain greedy, stop at eos or
  8710, image generation restricted to image tokens; budgets DEFAULT_MAX_NEW_TOKENS.

Images are tokenized with the checkpoint's own VQGAN (<ckpt>/tokenizer/vqgan.yaml + .ckpt) and the
exact Chameleon preprocessing, in fp32. Image paths must stay inside --image-root (no absolute
path, no '..', no symlink out); a missing, escaping or unreadable image is an error naming the
row (the public code silently used a black image).

Batched with left padding (pad id 1). Resumable (core/resume.UnitLog): every finished batch is
appended to OUTPUT.partial.jsonl under the job's fingerprint (inputs, prompts, settings); a
restarted run with the same fingerprint skips the batches found there. Batches are formed the same
way on every run (eval order within each generation kind), so the final artifact is identical to
an uninterrupted run. The partial file is removed once the artifact is written. Progress: a tqdm
bar on a terminal, else a line (rows, tokens/s, ETA) every PROGRESS_INTERVAL_S seconds.

Artifact `predictions`: task_name, question_type, prompt, answer, image_path, model, prediction
(decoded text; mm_out: its text segments joined by a space, as the public code joined them),
prediction_first_token (decoded first generated token; the medmax rule reads it),
generated_image_tokens (list<int32>: the 1024 generated image tokens as vocabulary ids, code + 4,
without the 8197/8196 markers; mm_out: its first image; empty when none). Its credential follows
the inputs: an adapter folder whose provenance record is credentialed makes it credentialed, and so
does a row whose image (input or reference) lies under a --credentialed-root (real paths compared,
symlinks followed): the row holds that image's path and what the model said about the image.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Protocol, Sequence

import pyarrow as pa

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.artifacts import write_artifact
from medmax_pipeline.core.paths import MissingRootError, PathEscapeError, confined_path, resolve_roots
from medmax_pipeline.core.progress import PROGRESS_INTERVAL_S, Progress, format_progress  # noqa: F401 (format_progress: re-exported)
from medmax_pipeline.core.resume import UnitLog, job_fingerprint
from medmax_pipeline.core.rows import lone_surrogate_problem as unicode_problem
from medmax_pipeline.core.sequences import image_block
from medmax_pipeline.core.settings import add_setting_arguments, checked_settings, setting, values_from_args, workflow_arguments_for
from medmax_pipeline.core.text_tokenizer import MODIFIED_TOKENIZER_FILE, TOKENIZER_FILE, decode_text, special_token_ids
from medmax_pipeline.stages.evaluate.predictions import credentialed_image_rows, marked_input

EVAL_COLUMNS = ("task_name", "question_type", "prompt", "answer", "image_path")
PREDICTIONS_SCHEMA = pa.schema([
    ("task_name", pa.string()), ("question_type", pa.string()), ("prompt", pa.string()), ("answer", pa.string()),
    ("image_path", pa.string()), ("model", pa.string()), ("prediction", pa.string()),
    ("prediction_first_token", pa.string()), ("generated_image_tokens", pa.list_(pa.int32())),
])
# Default new-token budgets of the greedy preset by question type / task. closed and mcq: the
# public code read one token; a few more let the sentence-level rules (strict, llava_med) see a
# short answer.
DEFAULT_MAX_NEW_TOKENS: dict[str, int] = {
    "closed": 8, "mcq": 8, "open": 60, "image_captioning": 256, "visual_chat": 256, "mm_out": 256,
    "other": 256,
    # 1024 codes, the 8197 is in the prompt; lower it only for smoke tests (the scorer then
    # refuses the image, it needs 1024 codes).
    "image_generation": C.CODES_PER_IMAGE,
}
# The public budgets (max_gen_len of each evaluation script). mm_out: per text segment.
# image_generation: codes per generated image (also in mm_out); lower only for smoke tests.
MEDMAX_MAX_NEW_TOKENS: dict[str, int] = {
    "closed": 1, "mcq": 1, "open": 60, "image_captioning": 4096, "visual_chat": 4096, "mm_out": 1024,
    "other": 60, "image_generation": C.CODES_PER_IMAGE,
}
IMAGE_GENERATION = "image_generation"
CAPTIONING = "image_captioning"
VISUAL_CHAT = "visual_chat"
MM_OUT = "mm_out"
VQA_TYPES = ("closed", "open", "mcq")
# The public prompts (evaluation/eval_utils.py, evaluation/visual_chat.py): protocol data, exact.
CAPTION_PROMPT = "Please describe this picture."
DETAILED_DESCRIPTION_PROMPT = "Analyze the image in a comprehensive and detailed manner."
MM_OUT_BASELINE_SUFFIX = " Answer the question with one picture."
IMAGE_PLACEHOLDER = "<image>"
IMAGE_GENERATION_ROWS_PER_SUBSET = 100

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
    """Rows of medmax_eval_data (jsonl or parquet) with the five contract columns. A bad row
    (invalid JSON or UTF-8, a lone surrogate, a missing or non-text column) is an error naming
    the file and its line (jsonl) or row (parquet)."""
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"evaluation set {path} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
            rows = table.to_pylist()
        except (pa.ArrowException, UnicodeDecodeError) as exc:
            raise GenerateError(f"{path}: unreadable parquet evaluation set: {exc}") from exc
        places = [f"{path} row {i}" for i in range(len(rows))]
    else:
        rows, places = [], []
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{path} line {lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise GenerateError(f"{where}: not valid UTF-8 (byte {exc.start})") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise GenerateError(f"{where}: not valid JSON: {exc}") from exc
                if not isinstance(row, dict):
                    raise GenerateError(f"{where}: expected a JSON object")
                rows.append(row)
                places.append(where)
    for where, row in zip(places, rows):
        missing = [c for c in ("task_name", "question_type", "prompt") if not isinstance(row.get(c), str)]
        if missing:
            raise GenerateError(f"{where}: missing or non-text {missing}")
        for c in ("answer", "image_path"):
            if row.get(c) is not None and not isinstance(row[c], str):
                raise GenerateError(f"{where}: {c} must be text or null, got {type(row[c]).__name__}")
        for c in EVAL_COLUMNS:
            problem = unicode_problem(c, row.get(c))
            if problem:
                raise GenerateError(f"{where}: {problem}")
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


def task_family(row: Mapping[str, Any]) -> str:
    """image_generation, image_captioning, visual_chat, mm_out, vqa (closed/open/mcq) or other."""
    if row["task_name"] in (IMAGE_GENERATION, CAPTIONING, VISUAL_CHAT, MM_OUT):
        return row["task_name"]
    return "vqa" if row["question_type"] in VQA_TYPES else "other"


def medmax_prompt_parts(row: Mapping[str, Any], style: str) -> list[tuple[str, str]]:
    """The public prompt of a row as ("image", image_path) / ("text", text) parts, in order."""
    if style not in ("finetuned", "baseline"):
        raise GenerateError(f"unknown prompt style {style!r}")
    family, prompt, image = task_family(row), row["prompt"], row["image_path"]
    image_part = [("image", image)] if image else []
    if family == IMAGE_GENERATION:
        return [("text", prompt)]
    if family == MM_OUT:
        return [("text", prompt if style == "finetuned" else prompt + MM_OUT_BASELINE_SUFFIX)]
    if family == CAPTIONING:
        return [*image_part, ("text", CAPTION_PROMPT)]
    if family == VISUAL_CHAT:
        question = prompt.replace(IMAGE_PLACEHOLDER, "").strip()
        if row["question_type"] == "detailed_description":
            return [*image_part, ("text", DETAILED_DESCRIPTION_PROMPT)]
        if prompt.endswith(IMAGE_PLACEHOLDER):
            return [("text", question), *image_part]
        return [*image_part, ("text", question)]
    if family == "vqa" and style == "baseline":
        return [*image_part, ("text", baseline_prompt_text(prompt, row["question_type"]))]
    return [*image_part, ("text", prompt)]


def build_medmax_prompt(parts: Sequence[tuple[str, Any]], style: str, image_generation: bool) -> list[int]:
    """bos, the parts (("image", codes) as an image block, ("text", ids) as they are), 8710 for
    finetuned, 8197 for image generation."""
    ids = [C.BOS_ID]
    for kind, value in parts:
        ids += image_block(value) if kind == "image" else list(value)
    if style == "finetuned":
        ids.append(C.SEPARATOR_ID)
    if image_generation:
        ids.append(C.BEGIN_IMAGE_ID)
    return ids


def select_image_generation_rows(rows: Sequence[Mapping[str, Any]], per_subset: int | None) -> list[int]:
    """Indices of the rows to generate: every row, except that image generation keeps only its first
    `per_subset` rows of each subset (question_type) in eval order (None keeps all)."""
    seen: dict[str, int] = {}
    keep = []
    for i, row in enumerate(rows):
        if row["task_name"] == IMAGE_GENERATION and per_subset is not None:
            seen[row["question_type"]] = seen.get(row["question_type"], 0) + 1
            if seen[row["question_type"]] > per_subset:
                continue
        keep.append(i)
    return keep


# ----------------------------------------------------------------------------------------------
# Decoding presets: chosen once from the --decoding name, then asked (never the name)
# ----------------------------------------------------------------------------------------------

# (all generated ids, text ids, image ids) of one row of a batch.
Generated = tuple[list[int], list[int], list[int]]


class DecodingPreset(Protocol):
    """Everything that differs between the decoding presets; the rest of the stage asks the preset."""

    name: str  # recorded in the lineage params as "decoding"
    prompt_tokenizer_file: str  # in <ckpt>/tokenizer/, encodes the prompts and decodes the predictions
    requires_image_placeholder: bool  # the prompt tokenizer must map <image> to its own id
    default_budgets: Mapping[str, int]  # new-token budgets before --max-new-tokens overrides

    def with_tokenizer(self, tokenizer: Any) -> DecodingPreset:
        """This preset ready to generate with the prompt tokenizer (a new object; self is kept)."""

    def select_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """The evaluation rows this preset generates, in eval order."""

    def generation_kind(self, row: Mapping[str, Any]) -> str:
        """text, image (image generation) or interleaved (generated one row a batch)."""

    def batch_key(self, row: Mapping[str, Any], budget: int) -> tuple[Any, int]:
        """Rows with equal keys may share a batch; batches are formed in sorted key order."""

    def takes_input_image(self, row: Mapping[str, Any]) -> bool:
        """Whether the row's image_path goes into its prompt (else it is a reference or absent)."""

    def build_prompts(self, rows: Sequence[Mapping[str, Any]], codes: Mapping[str, list[int]], tokenizer: Any, style: str,
                      encode_texts: Callable[[Any, list[str]], list[list[int]]]) -> list[list[int]]:
        """Prompt ids of every row (codes: VQGAN codes by image_path)."""

    def generate(self, model: Any, rows: Sequence[Mapping[str, Any]], batch: Sequence[int],
                 prompts: Sequence[Sequence[int]], settings: GenerationSettings, budgets: Mapping[str, int]) -> list[Generated]:
        """Generated ids of the rows of one batch."""

    def prediction(self, row: Mapping[str, Any], generated: Sequence[int], text_ids: Sequence[int], image_ids: Sequence[int],
                   decode: Callable[[Sequence[int]], str]) -> tuple[str, list[int]]:
        """(prediction text, generated image tokens) of one row."""

    def lineage_params(self, rows_after_selection: int) -> dict[str, Any]:
        """The preset's own lineage params, beside "decoding"."""


def _image_or_text(row: Mapping[str, Any]) -> str:
    return "image" if row["task_name"] == IMAGE_GENERATION else "text"


def _plain_prediction(text_ids: Sequence[int], image_ids: Sequence[int], decode: Callable[[Sequence[int]], str]) -> tuple[str, list[int]]:
    return decode(text_ids), [int(t) for t in image_ids]


@dataclass(frozen=True)
class GreedyPreset:
    """The behaviour before the presets: modified tokenizer, the prompt as it is, plain greedy."""

    name: ClassVar[str] = "greedy"
    prompt_tokenizer_file: ClassVar[str] = MODIFIED_TOKENIZER_FILE
    requires_image_placeholder: ClassVar[bool] = True
    default_budgets: ClassVar[Mapping[str, int]] = DEFAULT_MAX_NEW_TOKENS

    def with_tokenizer(self, tokenizer: Any) -> GreedyPreset:
        return self

    def select_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return list(rows)

    def generation_kind(self, row: Mapping[str, Any]) -> str:
        return _image_or_text(row)

    def batch_key(self, row: Mapping[str, Any], budget: int) -> tuple[Any, int]:
        # The original keys (and so the original batches): (is image generation, budget).
        return (self.generation_kind(row) == "image", budget)

    def takes_input_image(self, row: Mapping[str, Any]) -> bool:
        return row["task_name"] != IMAGE_GENERATION

    def build_prompts(self, rows: Sequence[Mapping[str, Any]], codes: Mapping[str, list[int]], tokenizer: Any, style: str,
                      encode_texts: Callable[[Any, list[str]], list[list[int]]]) -> list[list[int]]:
        texts = [r["prompt"] if (style == "finetuned" or r["task_name"] == IMAGE_GENERATION) else baseline_prompt_text(r["prompt"], r["question_type"])
                 for r in rows]
        prompts = []
        for r, t in zip(rows, encode_texts(tokenizer, texts)):
            block = image_block(codes[r["image_path"]]) if self.takes_input_image(r) and r["image_path"] else None
            prompts.append(build_prompt_ids(t, block, style, image_generation=r["task_name"] == IMAGE_GENERATION))
        return prompts

    def generate(self, model: Any, rows: Sequence[Mapping[str, Any]], batch: Sequence[int],
                 prompts: Sequence[Sequence[int]], settings: GenerationSettings, budgets: Mapping[str, int]) -> list[Generated]:
        image_generation = rows[batch[0]]["task_name"] == IMAGE_GENERATION
        new = generate_batch(model, [prompts[i] for i in batch], max_new_tokens_for(rows[batch[0]], budgets),
                             image_generation, settings.device)
        return [(gen, *split_generated(gen, image_generation)) for gen in new]

    def prediction(self, row: Mapping[str, Any], generated: Sequence[int], text_ids: Sequence[int], image_ids: Sequence[int],
                   decode: Callable[[Sequence[int]], str]) -> tuple[str, list[int]]:
        return _plain_prediction(text_ids, image_ids, decode)

    def lineage_params(self, rows_after_selection: int) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class MedmaxPreset:
    """The public MedMax evaluation (module docstring). options: the public Options
    (models/chameleon_decoding.PublicOptions); vocab: token name -> id of the prompt tokenizer (its
    text/image token sets). Both are filled by with_tokenizer when not given."""

    name: ClassVar[str] = "medmax"
    prompt_tokenizer_file: ClassVar[str] = TOKENIZER_FILE
    # The plain tokenizer has no <image> id: a literal "<image>" there is text, as in the public load_chameleon.
    requires_image_placeholder: ClassVar[bool] = False
    default_budgets: ClassVar[Mapping[str, int]] = MEDMAX_MAX_NEW_TOKENS
    image_generation_rows: int | None = IMAGE_GENERATION_ROWS_PER_SUBSET  # per subset; None keeps all
    options: Any = None
    vocab: Mapping[str, int] | None = None

    def with_tokenizer(self, tokenizer: Any) -> MedmaxPreset:
        from medmax_pipeline.models.chameleon_decoding import PublicOptions

        return replace(self, options=self.options or PublicOptions(),
                       vocab=self.vocab or tokenizer.get_vocab(with_added_tokens=True))

    def select_rows(self, rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        return [rows[i] for i in select_image_generation_rows(rows, self.image_generation_rows)]

    def generation_kind(self, row: Mapping[str, Any]) -> str:
        return "interleaved" if row["task_name"] == MM_OUT else _image_or_text(row)

    def batch_key(self, row: Mapping[str, Any], budget: int) -> tuple[Any, int]:
        return (self.generation_kind(row), budget)

    def takes_input_image(self, row: Mapping[str, Any]) -> bool:
        # mm_out's image_path is the reference answer, not an input.
        return row["task_name"] not in (IMAGE_GENERATION, MM_OUT)

    def build_prompts(self, rows: Sequence[Mapping[str, Any]], codes: Mapping[str, list[int]], tokenizer: Any, style: str,
                      encode_texts: Callable[[Any, list[str]], list[list[int]]]) -> list[list[int]]:
        parts = [medmax_prompt_parts(r, style) for r in rows]
        texts = [value for row_parts in parts for kind, value in row_parts if kind == "text"]
        encoded = iter(encode_texts(tokenizer, texts))
        prompts = []
        for r, row_parts in zip(rows, parts):
            resolved = [("image", codes[value]) if kind == "image" else ("text", next(encoded)) for kind, value in row_parts]
            prompts.append(build_medmax_prompt(resolved, style, image_generation=r["task_name"] == IMAGE_GENERATION))
        return prompts

    def generate(self, model: Any, rows: Sequence[Mapping[str, Any]], batch: Sequence[int],
                 prompts: Sequence[Sequence[int]], settings: GenerationSettings, budgets: Mapping[str, int]) -> list[Generated]:
        from medmax_pipeline.models.chameleon_decoding import row_seed

        kind = self.generation_kind(rows[batch[0]])
        batch_prompts = [prompts[i] for i in batch]
        if kind == "image":
            seeds = [row_seed(_bound_medmax(settings).options.seed, seed_identity(rows[i])) for i in batch]
            out = medmax_images(model, batch_prompts, budgets[IMAGE_GENERATION], seeds, settings)
            return [(ids, [], split_generated(ids, True)[1]) for ids in out]
        if kind == "interleaved":
            i = batch[0]
            ids = medmax_interleaved(model, prompts[i], max_new_tokens_for(rows[i], budgets), budgets[IMAGE_GENERATION],
                                     seed_identity(rows[i]), settings)
            return [(ids, [], [])]  # segments are split by prediction()
        out = medmax_text(model, batch_prompts, max_new_tokens_for(rows[batch[0]], budgets), settings)
        return [(ids, split_generated(ids, False)[0], []) for ids in out]

    def prediction(self, row: Mapping[str, Any], generated: Sequence[int], text_ids: Sequence[int], image_ids: Sequence[int],
                   decode: Callable[[Sequence[int]], str]) -> tuple[str, list[int]]:
        if row["task_name"] == MM_OUT:
            texts, images = split_interleaved(generated)
            # The public code joined the text segments with a space; the first image is scored.
            return " ".join(decode(t) for t in texts), [int(t) for t in images[0]] if images else []
        prediction, image = _plain_prediction(text_ids, image_ids, decode)
        if row["task_name"] == VISUAL_CHAT:
            prediction = prediction.strip()  # the public visual_chat.py strips the answer
        return prediction, image

    def lineage_params(self, rows_after_selection: int) -> dict[str, Any]:
        from dataclasses import asdict

        if self.options is None:
            raise GenerateError("the medmax preset records its options only once with_tokenizer has filled them")
        return {"decoding_options": asdict(self.options), "prompt_tokenizer": self.prompt_tokenizer_file,
                "image_generation_rows_per_subset": self.image_generation_rows, "rows_after_selection": rows_after_selection}


PRESETS: dict[str, Callable[..., DecodingPreset]] = {"medmax": MedmaxPreset, "greedy": GreedyPreset}
DECODINGS = tuple(PRESETS)
DEFAULT_DECODING = "medmax"  # the one default: the CLI's and the workflow's


def decoding_preset(name: str, image_generation_rows: int | None = IMAGE_GENERATION_ROWS_PER_SUBSET) -> DecodingPreset:
    """The preset named by --decoding, chosen here once. image_generation_rows: medmax keeps the
    first N image generation rows per subset (None: all); greedy generates every row."""
    if name == "medmax":
        return MedmaxPreset(image_generation_rows=image_generation_rows)
    if name == "greedy":
        return GreedyPreset()
    raise GenerateError(f"unknown decoding {name!r}; expected one of {', '.join(DECODINGS)}")


def _bound_medmax(settings: GenerationSettings) -> MedmaxPreset:
    """The medmax preset of settings, with its options and vocabulary (MedmaxPreset.with_tokenizer)."""
    preset = settings.preset
    if not isinstance(preset, MedmaxPreset) or preset.options is None or preset.vocab is None:
        raise GenerateError("medmax decoding needs the medmax preset with its options and vocabulary (MedmaxPreset.with_tokenizer)")
    return preset


def plan_batches(rows: Sequence[Mapping[str, Any]], batch_size: int, budgets: Mapping[str, int],
                 preset: DecodingPreset) -> list[list[int]]:
    """Row indices per batch: grouped by the preset's batch key (generation kind and budget), eval
    order inside a group; an interleaved row is a batch of its own.

    Depends only on the rows and these arguments, so a resumed run forms the same batches.
    """
    if batch_size < 1:
        raise GenerateError("batch size must be at least 1")
    groups: dict[tuple[Any, int], list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(preset.batch_key(row, max_new_tokens_for(row, budgets)), []).append(i)
    batches = []
    for key in sorted(groups):
        idx = groups[key]
        size = 1 if preset.generation_kind(rows[idx[0]]) == "interleaved" else batch_size
        batches += [idx[j : j + size] for j in range(0, len(idx), size)]
    return batches


def split_interleaved(ids: Sequence[int]) -> tuple[list[list[int]], list[list[int]]]:
    """(text segments, image segments) of an interleaved output, as the public split_token_sequence
    cuts it: an image runs from 8197 to 8196; text segments are the non-empty runs around images,
    each cut at its first eos."""
    texts: list[list[int]] = []
    images: list[list[int]] = []
    current: list[int] = []
    in_image = False
    for t in ids:
        t = int(t)
        if t == C.BEGIN_IMAGE_ID:
            if current:
                texts.append(current)
            current, in_image = [], True
        elif t == C.END_IMAGE_ID and in_image:
            images.append(current)
            current, in_image = [], False
        else:
            current.append(t)
    if current:
        (images if in_image else texts).append(current)
    return [t[: t.index(C.EOS_ID)] if C.EOS_ID in t else t for t in texts], images


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


def partial_log(output: Path, fingerprint: str) -> UnitLog:
    """OUTPUT.partial.jsonl (core/resume.UnitLog): a header with the job's fingerprint, then one
    line per finished row (_result_item, keyed by the row's index)."""
    return UnitLog(output.with_name(output.name + ".partial.jsonl"), fingerprint)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    preset: DecodingPreset
    batch_size: int = 8
    budgets: Mapping[str, int] | None = None  # overrides of the preset's default budgets
    prompt_style: str = "auto"
    device: str = "cpu"
    vqgan_batch_size: int = 4
    progress_interval_s: float = PROGRESS_INTERVAL_S
    progress_stream: Any = None

    def all_budgets(self) -> dict[str, int]:
        return {**self.preset.default_budgets, **(self.budgets or {})}


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


def input_image_paths(rows: Sequence[Mapping[str, Any]], preset: DecodingPreset) -> dict[str, int]:
    """image_path -> first row index, for the images that go into prompts (preset.takes_input_image)."""
    wanted: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row["image_path"] and preset.takes_input_image(row):
            wanted.setdefault(row["image_path"], i)
    return wanted


def check_image_paths(rows: Sequence[Mapping[str, Any]], image_root: Path, source: str) -> None:
    """Every row's image_path (input or reference) stays inside image_root."""
    for i, row in enumerate(rows):
        if row["image_path"]:
            try:
                confined_path(image_root, row["image_path"])
            except PathEscapeError as exc:
                raise GenerateError(f"{source} row {i}: image_path {exc} (image paths must stay inside --image-root {image_root})") from exc


def tokenize_eval_images(rows: Sequence[Mapping[str, Any]], image_root: Path, vqgan: Any, source: str,
                         preset: DecodingPreset, batch_size: int = 4) -> dict[str, list[int]]:
    """VQGAN codes of every distinct input image (input_image_paths), each confined to image_root."""
    from medmax_pipeline.models.image_preprocess import ImageDecodeError
    from medmax_pipeline.models.vqgan import encode_image_files

    check_image_paths(rows, image_root, source)
    wanted = input_image_paths(rows, preset)
    names = list(wanted)
    files = {name: confined_path(image_root, name) for name in names}
    for name in names:
        if not files[name].is_file():
            raise GenerateError(f"{source} row {wanted[name]}: image {image_root / name} does not exist (check --image-root)")
    by_file = {str(files[name]): name for name in names}
    try:
        encoded = encode_image_files(vqgan, [files[name] for name in names], batch_size)
    except ImageDecodeError as exc:
        name = by_file.get(str(exc.path), str(exc.path))
        raise GenerateError(f"{source} row {wanted.get(name, '?')}: image {exc.path} is unreadable: {exc.reason}") from exc
    return dict(zip(names, encoded))


def generate_batch(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, image_generation: bool,
                   device: str) -> list[list[int]]:
    """greedy preset: greedy continuation ids (new tokens only) of left-padded prompts."""
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


def _generate_with(model: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int, processors: list,
                   stop_ids: Sequence[int], device: str) -> list[list[int]]:
    """transformers' generate, greedy over `processors` (which may sample themselves), new ids only."""
    import torch
    from transformers import LogitsProcessorList

    ids, mask = left_pad(prompts)
    input_ids = torch.tensor(ids, device=device)
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.tensor(mask, device=device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=C.PAD_ID,
                             eos_token_id=list(stop_ids), logits_processor=LogitsProcessorList(processors))
    return [row[input_ids.shape[1] :].tolist() for row in out]


def medmax_text(model: Any, prompts: Sequence[Sequence[int]], budget: int, settings: GenerationSettings,
                allow_images: bool = False) -> list[list[int]]:
    """Public text decoding: greedy, repetition penalty, text tokens only (+ 8197 when allow_images,
    which then also ends the segment), at most `budget` new ids and a sequence of max_seq_len."""
    from medmax_pipeline.models.chameleon import set_image_logits
    from medmax_pipeline.models.chameleon_decoding import text_processors

    medmax = _bound_medmax(settings)
    caps = [max(0, min(budget, medmax.options.max_seq_len - len(p))) for p in prompts]
    if max(caps) == 0:
        return [[] for _ in prompts]
    set_image_logits(model, False)
    stop = [C.EOS_ID, C.BEGIN_IMAGE_ID] if allow_images else [C.EOS_ID]
    new = _generate_with(model, prompts, max(caps), text_processors(medmax.vocab, medmax.options, allow_images),
                         stop, settings.device)
    # A row's own cap: the public code stopped each prompt at its own length limit.
    return [ids[:cap] for ids, cap in zip(new, caps)]


def medmax_images(model: Any, prompts: Sequence[Sequence[int]], num_codes: int, seeds: Sequence[int],
                  settings: GenerationSettings) -> list[list[int]]:
    """Public image decoding of prompts ending in 8197: `num_codes` image tokens, CFG, seeded sampling."""
    from medmax_pipeline.models.chameleon import set_image_logits
    from medmax_pipeline.models.chameleon_decoding import image_processors

    set_image_logits(model, True)
    medmax = _bound_medmax(settings)
    processors = image_processors(model, prompts, medmax.vocab, medmax.options, seeds)
    return _generate_with(model, prompts, num_codes, processors, [C.EOS_ID], settings.device)


def medmax_interleaved(model: Any, prompt: Sequence[int], budget: int, num_codes: int, seed_identity: Mapping[str, Any],
                       settings: GenerationSettings) -> list[int]:
    """mm_out as the public Generator runs it: text (8197 allowed) until eos, the budget or an 8197;
    after an 8197, `num_codes` image tokens and 8196, then text again with a fresh budget; the
    whole sequence stays within max_seq_len. Returns the generated ids."""
    from medmax_pipeline.models.chameleon_decoding import row_seed

    sequence, generated, images = list(prompt), [], 0
    while True:
        text = medmax_text(model, [sequence], budget, settings, allow_images=True)[0]
        sequence += text
        generated += text
        if not text or text[-1] != C.BEGIN_IMAGE_ID:
            return generated
        seed = row_seed(_bound_medmax(settings).options.seed, {**seed_identity, "image": images})
        codes = medmax_images(model, [sequence], num_codes, [seed], settings)[0]
        sequence += codes + [C.END_IMAGE_ID]
        generated += codes + [C.END_IMAGE_ID]
        images += 1


def seed_identity(row: Mapping[str, Any]) -> dict[str, Any]:
    """What a row's sampling seed is derived from: its content, not its position or batch."""
    return {c: row[c] for c in ("task_name", "question_type", "prompt", "image_path")}


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
    # A copy with the preset ready for this tokenizer: the caller's settings stay as they were.
    settings = replace(settings, preset=settings.preset.with_tokenizer(tokenizer))
    preset = settings.preset
    budgets = settings.all_budgets()
    special = special_token_ids(tokenizer)
    log = UnitLog(partial, fingerprint) if partial is not None else None
    done = log.load() if log is not None else {}
    progress = Progress(len(rows), done=len(done), interval_s=settings.progress_interval_s, stream=settings.progress_stream)
    try:
        for batch_no, batch in enumerate(plan_batches(rows, settings.batch_size, budgets, preset)):
            if all(i in done for i in batch):
                continue
            generated = preset.generate(model, rows, batch, prompt_ids, settings, budgets)
            items = [_result_item(i, rows[i], gen, text_ids, image_ids, tokenizer, special, preset)
                     for i, (gen, text_ids, image_ids) in zip(batch, generated)]
            if log is not None:
                log.append(items)
            done.update({item["index"]: item for item in items})
            progress.update(len(batch), sum(len(gen) for gen, _, _ in generated))
            if on_batch is not None:
                on_batch(batch_no)
    finally:
        progress.close()
    return [done[i] for i in range(len(rows))]


def _result_item(index: int, row: Mapping[str, Any], generated: Sequence[int], text_ids: Sequence[int],
                 image_ids: Sequence[int], tokenizer: Any, special: frozenset[int], preset: DecodingPreset) -> dict[str, Any]:
    """The partial-file item of one row: prediction text, first token, image tokens."""
    image_generation = row["task_name"] == IMAGE_GENERATION
    first = "" if not generated or image_generation else decode_text(tokenizer, generated[:1], special)
    prediction, image_tokens = preset.prediction(row, generated, text_ids, image_ids, lambda ids: decode_text(tokenizer, ids, special))
    return {"index": index, "prediction": prediction, "first_token": first, "image_tokens": image_tokens}


def lineage_inputs(eval_set: Path, tokenizer_dir: Path, base_model: Path, adapter: Path | None,
                   eval_set_credentialed: bool = False) -> list[dict[str, Any]]:
    """Lineage entries of generate's inputs, each through describe_input: a model or adapter folder
    whose provenance record is credentialed makes the predictions credentialed, and so does an
    evaluation set with an image under a credentialed root (`eval_set_credentialed`)."""
    from medmax_pipeline.core.artifacts import describe_input

    return [marked_input(eval_set, eval_set_credentialed)] + [
        describe_input(p) for p in [tokenizer_dir, base_model] + ([adapter] if adapter else [])]


def generate_predictions(
    eval_set: str | Path,
    image_root: str | Path,
    ckpt: str | Path,
    base_model: str | Path,
    model_name: str,
    output: str | Path,
    preset: DecodingPreset,
    adapter: str | Path | None = None,
    batch_size: int = 8,
    max_items: int | None = None,
    device: str = "cpu",
    prompt_style: str = "auto",
    budgets: Mapping[str, int] | None = None,
    on_batch: Callable[[int], None] | None = None,
    credentialed_roots: Sequence[str | Path] = (),
) -> Path:
    """Generate predictions for an evaluation set and write the `predictions` artifact.

    preset: the decoding preset (decoding_preset(name)); its image generation rows per subset
    included. credentialed_roots: a row whose image lies under one of them (symlinks followed)
    makes the predictions credentialed."""
    from medmax_pipeline.models.chameleon import load_model_for_generation
    from medmax_pipeline.core.text_tokenizer import check_tokenizer_layout, encode_texts, load_tokenizer
    from medmax_pipeline.models.vqgan import load_vqgan

    eval_set, image_root, ckpt, output = Path(eval_set), Path(image_root), Path(ckpt), Path(output)
    try:
        roots = resolve_roots(credentialed_roots)
    except MissingRootError as exc:
        raise GenerateError(str(exc)) from None
    style = ("finetuned" if adapter else "baseline") if prompt_style == "auto" else prompt_style
    if style not in ("finetuned", "baseline"):
        raise GenerateError(f"unknown prompt style {prompt_style!r}; expected auto, finetuned or baseline")
    rows = preset.select_rows(read_eval_set(eval_set))
    selected = len(rows)
    if max_items is not None:
        rows = rows[:max_items]
    credentialed_rows = credentialed_image_rows([r["image_path"] for r in rows], image_root, roots)
    # The modified tokenizer checks the layout (<image> at 8711), whichever file the preset encodes prompts with.
    modified_path = ckpt / "tokenizer" / MODIFIED_TOKENIZER_FILE
    check_tokenizer_layout(load_tokenizer(modified_path), source=str(modified_path))
    tok_path = ckpt / "tokenizer" / preset.prompt_tokenizer_file
    tokenizer = load_tokenizer(tok_path)
    check_tokenizer_layout(tokenizer, require_image_placeholder=preset.requires_image_placeholder, source=str(tok_path))
    preset = preset.with_tokenizer(tokenizer)
    vqgan = load_vqgan(ckpt, device=device)
    codes = tokenize_eval_images(rows, image_root, vqgan, str(eval_set), preset)
    del vqgan
    prompts = preset.build_prompts(rows, codes, tokenizer, style, encode_texts)
    model = load_model_for_generation(base_model, adapter, allow_image_output=False, device=device, dtype=None, tokenizer=modified_path)
    settings = GenerationSettings(preset, batch_size=batch_size, budgets=budgets, prompt_style=style,
                                  device=str(next(model.parameters()).device))
    params: dict[str, Any] = {"model_name": model_name, "prompt_style": style, "batch_size": batch_size, "max_items": max_items,
                              "budgets": settings.all_budgets(), "decoding": preset.name, "device": device,
                              "credentialed_image_rows": len(credentialed_rows), **preset.lineage_params(selected)}
    # Lineage entries are computed once: hashing a 7B model folder takes a while.
    inputs = lineage_inputs(eval_set, ckpt / "tokenizer", Path(base_model), Path(adapter) if adapter else None,
                            eval_set_credentialed=bool(credentialed_rows))
    fingerprint = job_fingerprint({**params, "prompts": job_fingerprint({"p": prompts}),
                                   "inputs": [entry["fingerprint"] for entry in inputs[2:]]})
    partial = partial_log(output, fingerprint)
    output.parent.mkdir(parents=True, exist_ok=True)
    results = run_generation(rows, prompts, model, tokenizer, settings, partial.path, fingerprint, on_batch)
    table = pa.table({
        **{c: pa.array([r[c] for r in rows], pa.string()) for c in EVAL_COLUMNS},
        "model": pa.array([model_name] * len(rows), pa.string()),
        "prediction": pa.array([r["prediction"] for r in results], pa.string()),
        "prediction_first_token": pa.array([r["first_token"] for r in results], pa.string()),
        "generated_image_tokens": pa.array([r["image_tokens"] for r in results], pa.list_(pa.int32())),
    }, schema=PREDICTIONS_SCHEMA)
    write_artifact(table, output, artifact="predictions", inputs=inputs, params=params)
    partial.remove()
    return output


def _parse_budgets(items: Sequence[str] | None) -> dict[str, int]:
    budgets = {}
    for item in items or []:
        key, _, value = item.partition("=")
        if key not in DEFAULT_MAX_NEW_TOKENS or not value.isdigit():
            raise GenerateError(f"--max-new-tokens {item!r}: expected KEY=N with KEY in {sorted(DEFAULT_MAX_NEW_TOKENS)}")
        budgets[key] = int(value)
    return budgets


PROMPT_STYLES = ("auto", "finetuned", "baseline")


@dataclass(frozen=True)
class GenerateConfig:
    """generate's settings, the one source of its command line and of the generate rule's options
    (the config.yaml `evaluate:` keys; tests/test_stage_settings.py checks the schema against it)."""

    decoding: str = setting(DEFAULT_DECODING, help="medmax: the public MedMax evaluation protocol; greedy: plain greedy everywhere",
                            key="decoding", identity=True, choices=DECODINGS)
    batch_size: int = setting(8, help="rows per generate call", key="batch_size", minimum=1)
    max_items: int | None = setting(None, help="only the first N rows (smoke runs)", key="max_items", identity=True, minimum=1)
    image_generation_rows: int | None = setting(
        IMAGE_GENERATION_ROWS_PER_SUBSET, help="medmax: image generation rows kept per subset (the public code scored the first 100); 0 keeps all",
        key="image_generation_rows", identity=True, minimum=1, null_as=0)
    # The rule also reads evaluate.device (a GPU resource for cuda): config.yaml allows cpu and cuda.
    device: str = setting("cpu", help="cpu, cuda, or auto", key="device", config_choices=("cpu", "cuda"))
    prompt_style: str = setting("auto", help="auto: finetuned with --adapter, baseline without", key="prompt_style",
                                identity=True, choices=PROMPT_STYLES)
    max_new_tokens: dict[str, int] = setting({}, help=f"override new-token budgets; keys {sorted(DEFAULT_MAX_NEW_TOKENS)}",
                                             key="max_new_tokens", identity=True, metavar="KEY=N")


def generate_config_from_args(args: argparse.Namespace) -> GenerateConfig:
    values = values_from_args(GenerateConfig, args)
    return checked_settings(GenerateConfig, {**values, "max_new_tokens": _parse_budgets(values["max_new_tokens"])}, GenerateError)


def workflow_arguments(section: Mapping[str, Any]) -> list[str]:
    """The generate options for the config.yaml `evaluate:` SECTION (the generate rule passes these)."""
    return workflow_arguments_for(GenerateConfig, section)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-set", required=True, help="medmax_eval_data rows (jsonl or parquet)")
    parser.add_argument("--image-root", required=True, help="folder image_path values are relative to (paths may not leave it)")
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (tokenizer/ with vqgan.yaml, vqgan.ckpt, text_tokenizer.json, text_tokenizer_modified.json)")
    parser.add_argument("--base-model", required=True, help="HF-format Chameleon / Anole folder")
    parser.add_argument("--adapter", help="PEFT adapter folder of the trained model (omit for the base model)")
    parser.add_argument("--model-name", required=True, help="value of the model column (e.g. base, trained)")
    parser.add_argument("--output", required=True, help="predictions.parquet to write")
    parser.add_argument("--credentialed-root", action="append", default=[], metavar="ROOT",
                        help="a credentialed image root (repeatable): a row whose image lies under it (symlinks "
                             "followed) makes the predictions credentialed")
    add_setting_arguments(parser, GenerateConfig)


def run(args: argparse.Namespace) -> int:
    config = generate_config_from_args(args)
    out = generate_predictions(
        args.eval_set, args.image_root, args.ckpt, args.base_model, args.model_name, args.output,
        preset=decoding_preset(config.decoding, image_generation_rows=config.image_generation_rows),
        adapter=args.adapter, batch_size=config.batch_size, max_items=config.max_items, device=config.device,
        prompt_style=config.prompt_style, budgets=config.max_new_tokens, credentialed_roots=args.credentialed_root,
    )
    print(f"wrote {out}")
    return 0
