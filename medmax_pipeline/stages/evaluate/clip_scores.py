"""Stage 6, once per model: decode generated images to PNG files and compute the CLIP similarities.

    medmax clip-scores --predictions results/evaluate/predictions_trained.parquet \
        --output results/evaluate/clip_trained.parquet [--image-dir results/evaluate/images_trained] \
        [--clip CLIP_DIR [--clip-text-tower TOWER_DIR]] [--ckpt CKPT_DIR] [--image-root DIR] [--device cpu]
        [--credentialed-root ROOT ...]

Every rule set scores captioning and image generation the same way, so these similarities are
computed once per model here (not once per rule set) and `medmax score --clip-scores` reads them.
The artifact `clip_scores` has one row per captioning / image-generation / mm_out item:

    row              index of the item in the predictions file
    task_name, question_type
    unjudged         true when the item could not be scored (no CLIP folder, no VQGAN decoder)
    score            captioning: CLIP cosine(image, generated caption); image generation: CLIP
                     cosine(generated image, prompt), 0 when no image was generated; null if unjudged
    score_ref_image  image generation and mm_out: CLIP cosine(generated image, reference image)
                     (mm_out: null when the model produced no image; its text is judged, not here)
    note             how the score was made, or why there is none
    generated_image  path of the PNG decoded from the generated image tokens (with --ckpt and
                     --image-dir), else null

Footer params carry `predictions_fingerprint`: score pairs each artifact with its predictions
file by it. Without --clip the rows say "not scored" (as score did without --clip); without
--ckpt no image is decoded.

Image paths are read as generate reads them: relative to --image-root (the working folder without
one), never absolute, never through '..' or a symlink out of it. The artifact and the PNG folder
(its medmax_provenance.json) are credentialed when the predictions are, or when a row's image lies
under a --credentialed-root (real paths compared, symlinks followed). Progress lines go to stderr.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa

from medmax_pipeline.core.artifacts import describe_input, write_artifact, write_provenance
from medmax_pipeline.core.paths import MissingRootError, PathEscapeError, confined_path, resolve_roots
from medmax_pipeline.core.progress import Progress
from medmax_pipeline.core.settings import add_setting_arguments, checked_settings, setting, values_from_args, workflow_arguments_for
from medmax_pipeline.stages.evaluate.predictions import (
    CAPTIONING,
    IMAGE_GENERATION,
    MM_OUT,
    ScoreError,
    credentialed_image_rows,
    marked_input,
    predictions_fingerprint,
    read_predictions,
    read_rows_by_index,
    scorer_of,
)

ARTIFACT = "clip_scores"
CLIP_SCORES_SCHEMA = pa.schema([
    ("row", pa.int64()), ("task_name", pa.string()), ("question_type", pa.string()), ("unjudged", pa.bool_()),
    ("score", pa.float64()), ("score_ref_image", pa.float64()), ("note", pa.string()), ("generated_image", pa.string()),
])


# ----------------------------------------------------------------------------------------------
# Pure helpers
# ----------------------------------------------------------------------------------------------


def image_codes_from_tokens(tokens: Sequence[int], where: str) -> list[int]:
    """1024 VQGAN codes from generated tokens: drop begin/end markers, undo the +4 offset."""
    from medmax_pipeline.core.constants import BEGIN_IMAGE_ID, CODES_PER_IMAGE, END_IMAGE_ID, IMAGE_CODE_OFFSET, NUM_IMAGE_CODES

    body = [t for t in tokens if t not in (BEGIN_IMAGE_ID, END_IMAGE_ID)]
    if len(body) < CODES_PER_IMAGE:
        raise ScoreError(f"{where}: {len(body)} image tokens, need {CODES_PER_IMAGE}")
    body = body[:CODES_PER_IMAGE]
    codes = [t - IMAGE_CODE_OFFSET for t in body]
    if min(codes) < 0 or max(codes) >= NUM_IMAGE_CODES:
        raise ScoreError(f"{where}: image token outside {IMAGE_CODE_OFFSET}..{IMAGE_CODE_OFFSET + NUM_IMAGE_CODES - 1}")
    return codes


def clip_items(rows: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[int], list[int]]:
    """Indices of the captioning rows, of the image-generation rows and of the mm_out rows."""
    kinds = [scorer_of(r["task_name"], r["question_type"]) for r in rows]
    return tuple([i for i, k in enumerate(kinds) if k == kind] for kind in (CAPTIONING, IMAGE_GENERATION, MM_OUT))


def complete_image_tokens(tokens: Sequence[int] | None) -> bool:
    """True when generated tokens hold a whole image (1024 codes besides the begin/end markers)."""
    from medmax_pipeline.core.constants import BEGIN_IMAGE_ID, CODES_PER_IMAGE, END_IMAGE_ID

    return sum(t not in (BEGIN_IMAGE_ID, END_IMAGE_ID) for t in tokens or ()) >= CODES_PER_IMAGE


def _result(row: int, source_row: Mapping[str, Any], *, unjudged: bool, score: float | None, note: str,
            score_ref_image: float | None = None, generated_image: str | None = None) -> dict[str, Any]:
    return {"row": row, "task_name": source_row["task_name"], "question_type": source_row["question_type"],
            "unjudged": unjudged, "score": score, "score_ref_image": score_ref_image, "note": note,
            "generated_image": generated_image}


def open_image(root: str | Path | None, rel: str | None, where: str):
    """The RGB image `rel` names, confined to `root` (the working folder when None) as generate
    confines eval images: no absolute path, no '..', no symlink out of the root."""
    from PIL import Image

    if not rel:
        raise ScoreError(f"{where}: image_path is empty")
    try:
        path = confined_path(root or ".", rel)
    except PathEscapeError as exc:
        raise ScoreError(f"{where}: image_path {exc} (image paths must stay inside --image-root {root or '.'})") from None
    if not path.is_file():
        raise ScoreError(f"{where}: image {path} does not exist (check --image-root)")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError as exc:
        raise ScoreError(f"{where}: image {path} is unreadable: {exc}") from exc


def _decode_image(vqgan: Any, codes: list[int]):
    import torch

    from medmax_pipeline.models.vqgan import codes_to_pil

    with torch.no_grad():
        pixels = vqgan.decode_codes(torch.tensor([codes], dtype=torch.long))
    return codes_to_pil(pixels)[0]


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def clip_score_rows(rows: Sequence[Mapping[str, Any]], clip: Any = None, vqgan: Any = None,
                    image_root: str | Path | None = None, source: str = "predictions",
                    image_dir: str | Path | None = None, progress: Progress | None = None) -> list[dict[str, Any]]:
    """CLIP_SCORES_SCHEMA rows for the captioning and image-generation rows, in row order.

    Captions of one file are embedded in one batch and generated images one at a time, as score
    always did, so the similarities are the same numbers bit for bit. `progress` (when given)
    counts the rows as they are done.
    """
    captions, generations, mm_outs = clip_items(rows)
    tick = progress.update if progress is not None else (lambda rows, amount: None)
    out: dict[int, dict[str, Any]] = {}
    if clip is None:
        for i in captions:
            out[i] = _result(i, rows[i], unjudged=True, score=None, note="not scored: captioning needs --clip")
    elif captions:
        images = [open_image(image_root, rows[i]["image_path"], f"{source} row {i}") for i in captions]
        sims = clip.image_text_similarity(images, [rows[i]["prediction"] or "" for i in captions])
        for i, s in zip(captions, sims):
            out[i] = _result(i, rows[i], unjudged=False, score=float(s), note="CLIP cosine(image, generated caption)")
    tick(len(captions), len(captions))
    if image_dir is not None:
        Path(image_dir).mkdir(parents=True, exist_ok=True)
    for i in generations:
        where = f"{source} row {i}"
        tokens = rows[i]["generated_image_tokens"] or []
        image, png = None, None
        if tokens and vqgan is not None:
            image = _decode_image(vqgan, image_codes_from_tokens(tokens, where))
            if image_dir is not None:
                png = str(Path(image_dir) / f"row{i:05d}.png")
                image.save(png)
        if clip is None or vqgan is None:
            out[i] = _result(i, rows[i], unjudged=True, score=None, generated_image=png,
                             note="not scored: image generation needs --clip and --ckpt (VQGAN decoder)")
        elif image is None:
            out[i] = _result(i, rows[i], unjudged=False, score=0.0, note="no image generated: scored 0")
        else:
            sim = float(clip.image_text_similarity([image], [rows[i]["prompt"] or ""])[0])
            ref = None
            note = "CLIP cosine(generated image, prompt)"
            if rows[i]["image_path"]:
                ref_image = open_image(image_root, rows[i]["image_path"], where)
                ref = float(clip.image_image_similarity([image], [ref_image])[0])
                note += "; score_ref_image = CLIP cosine(generated, reference image)"
            out[i] = _result(i, rows[i], unjudged=False, score=sim, score_ref_image=ref, note=note, generated_image=png)
        tick(1, 1)
    for i in mm_outs:
        out[i] = _mm_out_image_result(i, rows[i], clip, vqgan, image_root, f"{source} row {i}", image_dir)
        tick(1, 1)
    return [out[i] for i in sorted(out)]


def _mm_out_image_result(i: int, row: Mapping[str, Any], clip: Any, vqgan: Any, image_root: str | Path | None, where: str,
                         image_dir: str | Path | None) -> dict[str, Any]:
    """mm_out.py: CLIP cosine(generated image, reference image) when the model produced an image.

    `score` stays null (the text is scored by the judge); an image cut short by the token budget
    counts as no image.
    """
    tokens = row["generated_image_tokens"] or []
    if not complete_image_tokens(tokens):
        note = "no image generated" if not tokens else f"no complete image generated ({len(tokens)} image tokens)"
        return _result(i, row, unjudged=False, score=None, note=note)
    if vqgan is None:
        return _result(i, row, unjudged=True, score=None, note="image not scored: needs --ckpt (VQGAN decoder) and --clip")
    image = _decode_image(vqgan, image_codes_from_tokens(tokens, where))
    png = None
    if image_dir is not None:
        png = str(Path(image_dir) / f"row{i:05d}.png")
        image.save(png)
    if clip is None:
        return _result(i, row, unjudged=True, score=None, generated_image=png, note="image not scored: needs --clip")
    reference = open_image(image_root, row["image_path"], where)
    sim = float(clip.image_image_similarity([image], [reference])[0])
    return _result(i, row, unjudged=False, score=None, score_ref_image=sim, generated_image=png,
                   note="score_ref_image = CLIP cosine(generated image, reference image)")


def load_models(clip_dir: str | Path | None, ckpt_dir: str | Path | None, device: str = "cpu",
                clip_text_tower: str | Path | None = None) -> tuple[Any, Any]:
    """The CLIP scorer and the VQGAN (its decoder turns image tokens into pixels); None where not given."""
    clip = vqgan = None
    if clip_dir is not None:
        from medmax_pipeline.models.clip import load_clip

        clip = load_clip(clip_dir, text_tower=clip_text_tower, device=device)
    if ckpt_dir is not None:
        from medmax_pipeline.models.vqgan import load_vqgan

        vqgan = load_vqgan(ckpt_dir, device=device)
    return clip, vqgan


def write_clip_scores(predictions: str | Path, output: str | Path, clip_dir: str | Path | None = None,
                      ckpt_dir: str | Path | None = None, image_root: str | Path | None = None,
                      image_dir: str | Path | None = None, device: str = "cpu",
                      clip_text_tower: str | Path | None = None, credentialed_roots: Sequence[str | Path] = (),
                      progress_stream: Any = None) -> Path:
    """Score one predictions file's captioning / image-generation rows; write the clip_scores artifact
    (and a provenance record into image_dir, so the PNGs carry the predictions' credential)."""
    if clip_text_tower is not None and clip_dir is None:
        raise ScoreError("--clip-text-tower is the text tower of --clip; give --clip too")
    try:
        roots = resolve_roots(credentialed_roots)
    except MissingRootError as exc:
        raise ScoreError(str(exc)) from None
    rows = read_predictions(predictions).to_pylist()
    credentialed_rows = credentialed_image_rows([r["image_path"] for r in rows], image_root, roots)
    inputs = [marked_input(predictions, bool(credentialed_rows))]
    inputs += [describe_input(p) for p in (clip_dir, clip_text_tower, ckpt_dir) if p is not None]
    clip, vqgan = load_models(clip_dir, ckpt_dir, device, clip_text_tower)
    total = sum(map(len, clip_items(rows)))
    stream = progress_stream if progress_stream is not None else sys.stderr
    print(f"clip-scores: {total} of {len(rows)} rows to score ({predictions})", file=stream, flush=True)
    progress = Progress(total, stream=stream, label="clip-scores", items="rows", unit="rows")
    try:
        results = clip_score_rows(rows, clip, vqgan, image_root, str(predictions), image_dir, progress)
    finally:
        progress.close()
    if image_dir is not None:
        write_provenance(image_dir, "generated_images", inputs=inputs, params={"predictions_rows": len(rows)})
    table = pa.Table.from_pylist(results, schema=CLIP_SCORES_SCHEMA)
    params = {"predictions_fingerprint": predictions_fingerprint(predictions), "predictions_rows": len(rows),
              "clip": str(clip_dir) if clip_dir else None,
              "clip_text_tower": str(clip_text_tower) if clip_text_tower else None,
              "ckpt": str(ckpt_dir) if ckpt_dir else None,
              "image_root": str(image_root) if image_root else None, "image_dir": str(image_dir) if image_dir else None,
              "device": device, "credentialed_image_rows": len(credentialed_rows)}
    write_artifact(table, output, artifact=ARTIFACT, inputs=inputs, params=params)
    return Path(output)


# ----------------------------------------------------------------------------------------------
# Reading back (for score)
# ----------------------------------------------------------------------------------------------


def read_clip_scores(path: str | Path) -> tuple[dict[int, dict[str, Any]], dict[str, Any]]:
    """The artifact's rows by predictions row index, and its lineage params."""
    return read_rows_by_index(path, ARTIFACT)


def check_clip_scores(results: Mapping[int, Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], artifact: str | Path,
                      predictions: str | Path) -> None:
    """The artifact must cover exactly the captioning / image-generation rows of its predictions file."""
    expected = set().union(*clip_items(rows))
    for i in sorted(set(results) ^ expected):
        why = "is not a captioning / image-generation / mm_out row" if i in results else "has no entry"
        raise ScoreError(f"{artifact}: row {i} of {predictions} {why}; rerun medmax clip-scores on it")
    for i in sorted(expected):
        r = results[i]
        if (r["task_name"], r["question_type"]) != (rows[i]["task_name"], rows[i]["question_type"]):
            raise ScoreError(f"{artifact}: row {i} is {r['task_name']}/{r['question_type']} but {predictions} row {i} "
                             f"is {rows[i]['task_name']}/{rows[i]['question_type']}")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipScoresConfig:
    """clip-scores' settings, the one source of its command line and of the clip_scores rule's
    options (the config.yaml `evaluate:` key clip_device; tests/test_stage_settings.py checks the
    schema against it). The CLIP folders, checkpoint and images are the rule's inputs."""

    # The rule also reads evaluate.clip_device (a GPU resource for cuda): config.yaml allows cpu and cuda.
    device: str = setting("cpu", help="torch device of the CLIP and the VQGAN decoder, e.g. cpu or cuda", key="clip_device",
                          config_choices=("cpu", "cuda"))


def clip_scores_config_from_args(args: argparse.Namespace) -> ClipScoresConfig:
    return checked_settings(ClipScoresConfig, values_from_args(ClipScoresConfig, args), ScoreError)


def workflow_arguments(section: Mapping[str, Any]) -> list[str]:
    """The clip-scores options for the config.yaml `evaluate:` SECTION (the clip_scores rule passes these)."""
    return workflow_arguments_for(ClipScoresConfig, section)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--predictions", required=True, help="one model's predictions file (artifact, parquet, jsonl, csv)")
    parser.add_argument("--output", required=True, help="the clip_scores artifact to write (.parquet)")
    parser.add_argument("--image-dir", help="folder for the decoded generated images (PNG, one per row)")
    parser.add_argument("--clip", help="local BiomedCLIP folder in hub layout (open_clip_config.json, weights, tokenizer files)")
    parser.add_argument("--clip-text-tower", help="folder with the config.json of the CLIP's HF text tower (BiomedBERT)")
    parser.add_argument("--ckpt", help="checkpoint folder whose VQGAN decodes generated image tokens")
    parser.add_argument("--image-root", help="root that image_path values are relative to (paths may not leave it)")
    add_setting_arguments(parser, ClipScoresConfig)
    parser.add_argument("--credentialed-root", action="append", default=[], metavar="ROOT",
                        help="a credentialed image root (repeatable): a row whose image lies under it (symlinks "
                             "followed) makes the scores and PNGs credentialed")


def run(args: argparse.Namespace) -> int:
    settings = clip_scores_config_from_args(args)
    path = write_clip_scores(args.predictions, args.output, args.clip, args.ckpt, args.image_root, args.image_dir,
                             settings.device, args.clip_text_tower, args.credentialed_root)
    print(f"wrote {path}")
    return 0
