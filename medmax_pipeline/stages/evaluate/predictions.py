"""Predictions files as the evaluation jobs read them, and which scorer each row goes to.

Shared by `medmax score`, `medmax clip-scores` and `medmax judge`, so that the per-model jobs and
the score job agree on which rows are CLIP-scored and which are judged. The minimal columns of
a predictions file (parquet artifact from `medmax generate`, or a plain .parquet / .jsonl / .csv
from anywhere, e.g. GPT-4o outputs):

    task_name, question_type, answer, prediction
    model          optional; defaults to the file's stem
    prompt         needed for the LLM judge (the question) and to read MCQ option texts
    image_path     needed for captioning CLIP scores (with --image-root)
    prediction_first_token   optional; the medmax rule reads the first generated token, else
                   it approximates that token from the text (noted per row)
    generated_image_tokens   image generation and mm_out: 1024 VQGAN codes (+4 vocab offset or
                   not); empty when the model produced no image
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from medmax_pipeline.core.artifacts import ArtifactError, describe_input, is_artifact, read_artifact, read_meta
from medmax_pipeline.core.paths import image_under_roots
from medmax_pipeline.stages.evaluate.judge_protocols import MM_OUT as PROTOCOL_MM_OUT
from medmax_pipeline.stages.evaluate.judge_protocols import OPEN_VQA
from medmax_pipeline.stages.evaluate.judge_protocols import VISUAL_CHAT as PROTOCOL_VISUAL_CHAT
from medmax_pipeline.stages.evaluate.scoring_rules import OPEN, QUESTION_TYPES, VQA_TASK_SET

REQUIRED_COLUMNS = ("task_name", "question_type", "answer", "prediction")
PREDICTION_COLUMNS: dict[str, pa.DataType] = {
    "task_name": pa.string(),
    "question_type": pa.string(),
    "prompt": pa.string(),
    "answer": pa.string(),
    "image_path": pa.string(),
    "model": pa.string(),
    "prediction": pa.string(),
    "prediction_first_token": pa.string(),
    "generated_image_tokens": pa.list_(pa.int32()),
}
CAPTIONING = "image_captioning"
IMAGE_GENERATION = "image_generation"
VISUAL_CHAT = "visual_chat"
MM_OUT = "mm_out"
# What scores a row (see scorer_of).
VQA = "vqa"
UNSCORED = "unscored"


class ScoreError(ValueError):
    """A predictions file or row cannot be scored; the message names the file and row."""


def read_predictions(path: str | Path) -> pa.Table:
    """A predictions artifact, or a plain parquet / jsonl / csv file with at least REQUIRED_COLUMNS."""
    path = Path(path)
    if not path.is_file():
        raise ScoreError(f"predictions file {path} does not exist")
    try:
        if path.suffix == ".parquet":
            table = read_artifact(path, artifact="predictions") if is_artifact(path) else pq.read_table(path)
        elif path.suffix in (".jsonl", ".json"):
            import pyarrow.json as pj

            table = pj.read_json(path)
        elif path.suffix == ".csv":
            import pyarrow.csv as pcsv

            table = pcsv.read_csv(path)
        else:
            raise ScoreError(f"{path}: unsupported predictions format {path.suffix!r} (parquet, jsonl or csv)")
    except ArtifactError as exc:
        raise ScoreError(str(exc)) from exc
    except pa.ArrowInvalid as exc:
        raise ScoreError(f"{path}: unreadable predictions file: {exc}") from exc
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ScoreError(f"{path}: predictions lack the required columns {missing} (have {table.column_names})")
    columns = {}
    for name, dtype in PREDICTION_COLUMNS.items():
        if name in table.column_names:
            try:
                columns[name] = table.column(name).cast(dtype)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                raise ScoreError(f"{path}: column {name!r} cannot be read as {dtype}: {exc}") from exc
        elif name == "model":
            columns[name] = pa.array([path.stem] * table.num_rows, pa.string())
        else:
            columns[name] = pa.nulls(table.num_rows, dtype)
    return pa.table(columns)


def predictions_fingerprint(path: str | Path) -> str:
    """The lineage fingerprint of a predictions file (an artifact's own, else a hash of the file).

    Per-model artifacts record it, and `medmax score` pairs them with predictions files by it.
    """
    return describe_input(path)["fingerprint"]


def credentialed_image_rows(image_paths: Sequence[str | None], image_root: str | Path | None,
                            roots: Sequence[Path]) -> list[int]:
    """Indices of the rows whose image (input or reference) lies under one of the resolved
    credentialed `roots`, by real path (symlinks followed) or spelled path. Such a row, and all
    computed from it, is credentialed: its image path and what the model said about the image."""
    return [i for i, rel in enumerate(image_paths) if image_under_roots(image_root, rel, roots)]


def marked_input(path: str | Path, credentialed: bool) -> dict[str, Any]:
    """The lineage entry of an input (describe_input), marked credentialed when `credentialed`:
    an evaluation set or predictions file naming credentialed images is a credentialed input,
    so the artifact written from it is credentialed (artifacts.py's credential rule)."""
    entry = describe_input(path)
    return {**entry, "credential": "credentialed"} if credentialed else entry


def scorer_of(task: str | None, question_type: str | None) -> str:
    """Which scorer a row goes to: VQA (rule sets), CAPTIONING or IMAGE_GENERATION (CLIP),
    VISUAL_CHAT or MM_OUT (relative judge score; mm_out images by CLIP), or UNSCORED."""
    if task in (VISUAL_CHAT, MM_OUT):
        return task
    if (task, question_type) in VQA_TASK_SET or (question_type in QUESTION_TYPES and task not in (CAPTIONING, IMAGE_GENERATION)):
        return VQA
    if task in (CAPTIONING, IMAGE_GENERATION):
        return task
    return UNSCORED


def judge_protocol_of(row: Mapping[str, Any]) -> str | None:
    """The judge protocol a row is put to (judge_protocols.py), or None when the judge is not asked."""
    scorer = scorer_of(row["task_name"], row["question_type"])
    if scorer == VQA and row["question_type"] == OPEN:
        return OPEN_VQA
    return {VISUAL_CHAT: PROTOCOL_VISUAL_CHAT, MM_OUT: PROTOCOL_MM_OUT}.get(scorer)


def is_judged(row: Mapping[str, Any]) -> bool:
    """True for a row the LLM judge is asked about: open VQA questions, visual chat, mm_out text."""
    return judge_protocol_of(row) is not None


def read_rows_by_index(path: str | Path, artifact: str) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """A per-model artifact (clip_scores, judge_replies) as its rows by predictions row index,
    and its lineage params."""
    try:
        table = read_artifact(path, artifact=artifact)
        params = read_meta(path).lineage.get("params", {})
    except ArtifactError as exc:
        raise ScoreError(str(exc)) from exc
    return {r["row"]: r for r in table.to_pylist()}, params
