"""The embedded demo: a small, seeded MedMax in the real on-disk layouts.

`medmax demo` writes, at the paths it is given (the config's paths, when the workflow runs it):
- a checkpoint folder in the original layout: tokenizer/vqgan.yaml + vqgan.ckpt (random taming
  VQGAN, small `ch`, still 32x32 codes for 512x512), tokenizer/text_tokenizer.json and
  text_tokenizer_modified.json (real BPE files with the Chameleon id layout), and
  models/7b/consolidated.pth + params.json + consolidate_params.json (a tiny random Chameleon in
  the 7B's layout: q/k normalization, the 7B's FFN rounding, rope.freqs);
- optionally an HF-format base model folder, converted from that checkpoint by the same code
  as `medmax convert-checkpoint` (the workflow converts it itself when base_model is unset);
- medmax_data rows (train.jsonl, validation.jsonl) for every task, credential = no rows as
  published (image_path and tokens filled, tokens made with the demo VQGAN and tokenizer) and
  credential = yes rows as published (no image_path, no tokens; subject_id / study_id / dicom_id
  name their MIMIC-CXR-JPG image), plus a few malformed lines;
- public images of every kind real data has, and a credentialed image root laid out like
  MIMIC-CXR-JPG with a few broken files and one missing image;
- an evaluation set in medmax_eval_data's columns with its images, and a random CLIP folder.

Everything is derived from the seed: the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.image_keys import TEMPLATE_PRESETS, CredentialedSource, image_key_for_row
from medmax_pipeline.core.sequences import build_sequence, image_block
from medmax_pipeline.core.text_tokenizer import (
    MODIFIED_TOKENIZER_FILE,
    build_chameleon_tokenizer,
    encode_texts,
    load_tokenizer,
    vocabulary_map,
)

SEP = C.SEPARATOR_TOKEN
IMG = C.IMAGE_PLACEHOLDER_TOKEN
TASKS = ["Visual Chat", "VQA", "Image Captioning", "Multimodal Generation", "Image Generation", "Report Understanding"]
PUBLIC_SOURCES = {
    "VQA": ["slake", "vqa_rad", "pathvqa"],
    "Visual Chat": ["llava_med"],
    "Image Captioning": ["pmc_oa", "quilt"],
    "Multimodal Generation": ["medinstruct"],
    "Image Generation": ["pmc_oa"],
    "Report Understanding": ["medpix"],
}
CREDENTIALED_SOURCE = "mimic_cxr"

FINDINGS = [
    "no acute cardiopulmonary process",
    "a small left pleural effusion",
    "mild cardiomegaly without edema",
    "a right lower lobe opacity concerning for pneumonia",
    "clear lungs and a normal cardiac silhouette",
    "a healed rib fracture on the left",
]
TISSUES = ["colon mucosa", "lymph node", "breast ductal tissue", "liver parenchyma", "skin epidermis"]
ORGANS = ["lung", "heart", "liver", "kidney", "brain", "colon"]
MODALITIES = ["chest X-ray", "CT scan", "MRI", "histology slide", "ultrasound"]


# ----------------------------------------------------------------------------------------------
# Images: every kind real data has.
# ----------------------------------------------------------------------------------------------


def _radiograph(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """8-bit grayscale chest-film-like picture: dark lungs in a bright body, ribs, noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy = width / 2, height / 2
    body = np.exp(-(((x - cx) / (0.45 * width)) ** 2 + ((y - cy) / (0.55 * height)) ** 2) * 2.0)
    lungs = sum(
        np.exp(-(((x - cx + s * 0.18 * width) / (0.13 * width)) ** 2 + ((y - cy) / (0.3 * height)) ** 2) * 2.0)
        for s in (-1, 1)
    )
    ribs = 0.08 * np.sin(y / max(height, 1) * np.pi * rng.uniform(10, 16))
    picture = 0.25 + 0.6 * body - 0.45 * lungs + ribs + rng.normal(0, 0.04, size=(height, width))
    return (np.clip(picture, 0, 1) * 255).astype(np.uint8)


def _histology(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """RGB H&E-like picture: pink stroma with purple nuclei."""
    picture = np.empty((height, width, 3), dtype=np.float32)
    picture[...] = (0.93, 0.72, 0.82)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(int(rng.integers(20, 60))):
        nx, ny, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(3, max(4, min(width, height) / 12))
        mask = ((x - nx) ** 2 + (y - ny) ** 2) < r * r
        picture[mask] = (0.45, 0.25, 0.6)
    picture += rng.normal(0, 0.03, size=picture.shape)
    return (np.clip(picture, 0, 1) * 255).astype(np.uint8)


@dataclass(frozen=True)
class ImageSpec:
    name: str  # file name without folder
    kind: str  # radiograph | histology | rgba | palette | gray16
    width: int
    height: int
    fmt: str  # JPEG | PNG


def render_image(spec: ImageSpec, seed: int) -> bytes:
    """The encoded bytes of one demo image (deterministic for a spec and seed)."""
    rng = np.random.default_rng(seed)
    if spec.kind == "radiograph":
        image = Image.fromarray(_radiograph(rng, spec.width, spec.height), mode="L")
    elif spec.kind == "histology":
        image = Image.fromarray(_histology(rng, spec.width, spec.height), mode="RGB")
    elif spec.kind == "rgba":
        rgb = _histology(rng, spec.width, spec.height)
        alpha = np.full((spec.height, spec.width), 255, dtype=np.uint8)
        alpha[: spec.height // 3] = 0  # fully transparent band
        alpha[spec.height // 3 : spec.height // 2] = 128  # half transparent band
        image = Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")
    elif spec.kind == "palette":
        image = Image.fromarray(_histology(rng, spec.width, spec.height), mode="RGB").quantize(colors=16, method=Image.Quantize.MEDIANCUT)
        image.info["transparency"] = 0  # palette entry 0 is transparent, as in many PNG figures
    elif spec.kind == "gray16":
        image = Image.fromarray(_radiograph(rng, spec.width, spec.height).astype(np.uint16) * 257)
        image = image.convert("I;16") if image.mode != "I;16" else image
    else:
        raise ValueError(f"unknown demo image kind {spec.kind!r}")
    buffer = io.BytesIO()
    if spec.fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=90)
    else:
        png_info = PngImagePlugin.PngInfo()  # no timestamps: the bytes depend on the seed alone
        save_args: dict[str, Any] = {"format": "PNG", "pnginfo": png_info}
        if spec.kind == "palette":
            save_args["transparency"] = 0
        image.save(buffer, **save_args)
    return buffer.getvalue()


PUBLIC_IMAGE_KINDS = [
    ("radiograph", "JPEG", (640, 512)),
    ("histology", "PNG", (512, 768)),
    ("rgba", "PNG", (600, 400)),
    ("palette", "PNG", (300, 300)),
    ("gray16", "PNG", (520, 700)),
    ("radiograph", "PNG", (96, 64)),  # small: upscaled
    ("histology", "JPEG", (1400, 900)),  # large and wide
    ("radiograph", "JPEG", (400, 1100)),  # tall
]


# ----------------------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------------------


def _vqa_pair(rng: random.Random) -> tuple[str, str]:
    organ = rng.choice(ORGANS)
    kind = rng.choice(["closed", "open"])
    if kind == "closed":
        return f"Is the {organ} abnormal in this image?", rng.choice(["Yes", "No"])
    return f"Which organ is shown in this {rng.choice(MODALITIES)}?", f"The {organ}."


def row_text(task: str, rng: random.Random) -> str:
    """A row's `text` in the medmax_data form: prompt, separator, response; <image> where images go."""
    finding = rng.choice(FINDINGS)
    if task == "VQA":
        question, answer = _vqa_pair(rng)
        return f"{IMG}\n{question}{SEP}{answer}"
    if task == "Visual Chat":
        return (
            f"{IMG}\nWhat do you see in this {rng.choice(MODALITIES)}?{SEP}"
            f"The image shows {finding}.{SEP}Is follow-up needed?{SEP}"
            f"{rng.choice(['Yes, a repeat study is advised.', 'No further imaging is needed.'])}"
        )
    if task == "Image Captioning":
        return f"{IMG}\nDescribe the image briefly.{SEP}A {rng.choice(MODALITIES)} of the {rng.choice(ORGANS)} showing {finding}."
    if task == "Multimodal Generation":
        return (
            f"Explain what {finding} looks like and show an example.{SEP}"
            f"It appears as follows. {IMG} Note the typical distribution."
        )
    if task == "Image Generation":
        return f"Generate a {rng.choice(MODALITIES)} of {rng.choice(TISSUES)} with {finding}.{SEP}{IMG}"
    if task == "Report Understanding":
        return f"{IMG}\nWrite the findings section of the report.{SEP}Findings: {finding}. Impression: {rng.choice(FINDINGS)}."
    raise ValueError(task)


def corpus_for_tokenizer(rng: random.Random, n: int = 400) -> list[str]:
    texts = [row_text(task, rng) for _ in range(n // len(TASKS)) for task in TASKS]
    texts += [f"Answer the question based on this image and respond 'yes' or 'no'.\nQuestion: {_vqa_pair(rng)[0]}\nAnswer:"]
    texts += ["respond 'A', 'B', 'C', or 'D'. Options: (A) lung (B) heart (C) liver (D) kidney"]
    return texts


# ----------------------------------------------------------------------------------------------
# The generator
# ----------------------------------------------------------------------------------------------


@dataclass
class DemoPaths:
    checkpoint: Path
    base_model: Path | None  # None: no HF folder (the workflow converts the checkpoint itself)
    train: Path
    validation: Path
    public_root: Path
    credentialed_root: Path
    eval_set: Path
    eval_image_root: Path
    clip: Path
    clip_text_tower: Path


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# Every folder or file the demo makes has a marker beside it (in its parent folder, so that image
# roots and model folders hold only what a real download holds). The demo replaces a path only when
# its marker is there: it never deletes or overwrites what it did not create.
DEMO_MARKER_SUFFIX = ".medmax-demo"


class DemoOwnershipError(RuntimeError):
    """A path the demo would write holds data the demo did not create."""


def demo_marker(path: Path) -> Path:
    """The marker beside PATH that says the demo made it: PARENT/.NAME.medmax-demo."""
    return path.parent / f".{path.name}{DEMO_MARKER_SUFFIX}"


def check_demo_targets(paths: DemoPaths) -> None:
    """Refuse before writing anything when a target holds data the demo did not create: an
    unmarked non-empty folder or an unmarked existing file."""
    # The HF base model is written by convert_checkpoint, which guards its own output the same way.
    folders = [paths.checkpoint, paths.public_root, paths.credentialed_root, paths.eval_image_root, paths.clip,
               paths.clip_text_tower]
    files = [paths.train, paths.validation, paths.eval_set]
    for target in folders + files:
        if not target.exists() or demo_marker(target).is_file():
            continue
        if target in folders and target.is_dir() and not any(target.iterdir()):
            continue  # an empty folder holds nothing to lose
        raise DemoOwnershipError(f"{target} exists and was not made by `medmax demo` (no {demo_marker(target).name} beside it): "
                                 "the demo never replaces data it did not create; keep demo paths inside the results folder "
                                 "or set demo.enabled: false for a real run")


def _mark(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    demo_marker(path).write_text("made by `medmax demo`, which may replace it\n")


def _fresh_dir(path: Path) -> Path:
    """An empty folder of the demo's own at `path` (check_demo_targets has vouched for it)."""
    if path.exists():
        shutil.rmtree(path)
    _mark(path)
    path.mkdir(parents=True)
    return path


def generate_demo(paths: DemoPaths, seed: int = 0, vqgan_channels: int = 32, rows_per_task: int = 4) -> dict[str, int]:
    """Write the whole demo; returns counts of what was written.

    The steps draw from one random stream in a fixed order (credentialed ids, rows, the eval set),
    so the same seed gives the same bytes."""
    import torch

    from medmax_pipeline.demo_models import make_random_biomedclip
    from medmax_pipeline.models.vqgan import encode_image_files

    check_demo_targets(paths)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    for folder in (paths.checkpoint, paths.public_root, paths.credentialed_root, paths.eval_image_root, paths.clip,
                   paths.clip_text_tower):
        _fresh_dir(folder)

    vqgan, tokenizer = _write_checkpoint(paths, seed, vqgan_channels)
    public_images = _write_public_images(paths.public_root, seed, rows_per_task)
    public_codes = encode_image_files(vqgan, public_images)
    public_blocks = {p.relative_to(paths.public_root).as_posix(): image_block(c) for p, c in zip(public_images, public_codes)}
    credentialed_ids = _write_credentialed_images(paths.credentialed_root, rng, seed, rows_per_task)
    split_rows = _build_rows(rng, sorted(public_blocks), credentialed_ids, rows_per_task)
    _add_published_tokens(split_rows, tokenizer, public_blocks, paths.credentialed_root)
    counts = _write_row_files(paths, split_rows, sorted(public_blocks))
    counts.update(_write_eval_set(paths, rng, seed))
    make_random_biomedclip(paths.clip, paths.clip_text_tower, seed=seed)
    counts["public_images"] = len(public_images)
    counts["credentialed_images"] = len(credentialed_ids)
    return counts


def _write_checkpoint(paths: DemoPaths, seed: int, vqgan_channels: int) -> tuple[Any, Any]:
    """The checkpoint folder in the original layout (and the HF base model when asked for);
    returns (the VQGAN, the modified text tokenizer)."""
    from medmax_pipeline.models import chameleon_original
    from medmax_pipeline.demo_models import make_random_vqgan
    from medmax_pipeline.models.vqgan import save_original_checkpoint
    from medmax_pipeline.stages.convert_checkpoint import convert_checkpoint

    tokenizer_dir = paths.checkpoint / "tokenizer"
    build_chameleon_tokenizer(tokenizer_dir, corpus_for_tokenizer(random.Random(seed + 1)), text_vocab_size=1500)
    vqgan, vqgan_yaml = make_random_vqgan(ch=vqgan_channels, seed=seed)
    save_original_checkpoint(tokenizer_dir, vqgan, vqgan_yaml)
    tokenizer = load_tokenizer(tokenizer_dir / MODIFIED_TOKENIZER_FILE)
    # The LLM in the original layout: the 7B's params.json fields with tiny sizes; vocab_size is
    # the demo tokenizer's (its text vocabulary is small).
    params = chameleon_original.OriginalParams(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=max(vocabulary_map(tokenizer).values()) + 1
    )
    # A wider initialisation than HF's 0.02 gives a 64-wide model logits with room to learn in a few steps.
    state = chameleon_original.random_original_state(params, seed=seed, std=0.2)
    chameleon_original.write_original_model(paths.checkpoint / chameleon_original.MODEL_SUBDIR, state, params)
    del state
    if paths.base_model is not None:
        convert_checkpoint(paths.checkpoint, paths.base_model)
    return vqgan, tokenizer


def _write_public_images(public_root: Path, seed: int, rows_per_task: int) -> list[Path]:
    """Public images of every kind real data has, under their sources' folders."""
    public_images: list[Path] = []
    for i in range(max(len(PUBLIC_IMAGE_KINDS), rows_per_task * 3)):
        kind, fmt, (w, h) = PUBLIC_IMAGE_KINDS[i % len(PUBLIC_IMAGE_KINDS)]
        source = ["slake", "vqa_rad", "pathvqa", "pmc_oa", "quilt"][i % 5]
        spec = ImageSpec(f"{source}/img_{i:03d}.{'jpg' if fmt == 'JPEG' else 'png'}", kind, w, h, fmt)
        path = public_root / spec.name
        _write_bytes(path, render_image(spec, seed * 1000 + i))
        public_images.append(path)
    return public_images


def _write_credentialed_images(credentialed_root: Path, rng: random.Random, seed: int, rows_per_task: int) -> list[dict[str, str]]:
    """Credentialed images in the MIMIC-CXR-JPG layout, the last four broken or missing; returns
    each image's ids (subject_id, study_id, dicom_id)."""
    credentialed_ids: list[dict[str, str]] = []
    n_credentialed = rows_per_task * 2 + 4
    for i in range(n_credentialed):
        subject = f"1{rng.randrange(10**7):07d}"
        ids = {"subject_id": subject, "study_id": f"5{rng.randrange(10**7):07d}", "dicom_id": f"{rng.getrandbits(64):016x}-{i:02d}"}
        credentialed_ids.append(ids)
        relative = TEMPLATE_PRESETS["mimic_cxr_jpg"].format(**ids)
        path = credentialed_root / relative
        good = render_image(ImageSpec(relative, "radiograph", 512 + 32 * (i % 3), 512 + 16 * (i % 4), "JPEG"), seed * 2000 + i)
        if i == n_credentialed - 1:
            continue  # missing image: its row is reported, never dropped
        elif i == n_credentialed - 2:
            _write_bytes(path, good[: len(good) // 3])  # truncated JPEG
        elif i == n_credentialed - 3:
            _write_bytes(path, b"")  # zero bytes
        elif i == n_credentialed - 4:
            _write_bytes(path, b"this is a text file, not a JPEG\n")  # text with an image extension
        else:
            _write_bytes(path, good)
    return credentialed_ids


def _build_rows(
    rng: random.Random, public_names: list[str], credentialed_ids: list[dict[str, str]], rows_per_task: int,
) -> dict[str, list[dict[str, Any]]]:
    """The rows of each split without tokens: public rows of every task (their images in `_images`),
    then credentialed Report Understanding and Image Captioning rows over the MIMIC-CXR-JPG images."""
    split_rows: dict[str, list[dict[str, Any]]] = {"train": [], "validation": []}
    image_counter = 0
    for split, per_task in (("train", rows_per_task), ("validation", max(1, rows_per_task // 2))):
        for task in TASKS:
            for _ in range(per_task):
                text = row_text(task, rng)
                names = []
                for _ in range(text.count(IMG)):
                    names.append(public_names[image_counter % len(public_names)])
                    image_counter += 1
                source = rng.choice(PUBLIC_SOURCES[task])
                split_rows[split].append({"text": text, "image_path": names[0] if names else None, "_images": names, "task": task, "source": source, "credential": "no"})
    for i, ids in enumerate(credentialed_ids):
        split = "validation" if i % 4 == 3 else "train"
        task = "Report Understanding" if i % 2 == 0 else "Image Captioning"
        split_rows[split].append({"text": row_text(task, rng), "tokens": [], "task": task, "source": CREDENTIALED_SOURCE, "credential": "yes", **ids})
    return split_rows


def _add_published_tokens(
    split_rows: dict[str, list[dict[str, Any]]], tokenizer: Any, public_blocks: dict[str, Any], credentialed_root: Path,
) -> None:
    """Fill the public rows' tokens as medmax_data publishes them, and check that the template
    names each credentialed row's image. Rows with several images reuse image_path for the first
    only, as medmax_data does; the demo gives its multi-image rows one image."""
    sources = {CREDENTIALED_SOURCE: CredentialedSource(CREDENTIALED_SOURCE, str(credentialed_root), "mimic_cxr_jpg")}
    for rows in split_rows.values():
        public = [r for r in rows if r["credential"] == "no"]
        for row, text_ids in zip(public, encode_texts(tokenizer, [r["text"] for r in public])):
            images = row.pop("_images")
            assert len(images) == 1, "demo rows hold one image each"
            row["tokens"] = build_sequence(text_ids, public_blocks[images[0]]).tolist()
        for row in rows:
            if row["credential"] == "yes":
                extra = json.dumps({k: row[k] for k in ("subject_id", "study_id", "dicom_id")})
                key = image_key_for_row({**row, "extra": extra}, sources)
                assert key.key is not None, key.problem


def _write_row_files(paths: DemoPaths, split_rows: dict[str, list[dict[str, Any]]], public_names: list[str]) -> dict[str, int]:
    """train.jsonl (with the malformed lines a real download can hold) and validation.jsonl;
    returns their line counts."""
    counts = {}
    for split, path in (("train", paths.train), ("validation", paths.validation)):
        lines = [json.dumps(r, ensure_ascii=False) for r in split_rows[split]]
        if split == "train":
            # Malformed lines a real download can hold; each must be reported with its line number.
            lines.insert(3, '{"text": "truncated line", "task": "VQA", ')
            lines.insert(7, json.dumps({"text": 42, "tokens": [], "task": "VQA", "source": "slake", "credential": "no"}))
            lines.insert(9, json.dumps({"text": f"{IMG}\nIs this normal?{SEP}Yes", "tokens": [0, 5, 2], "image_path": None, "task": "VQA", "source": "slake", "credential": "no"}))
            lines.insert(11, json.dumps({"text": f"Is this normal?{SEP}Yes", "tokens": [0, 5, 2], "image_path": public_names[0], "task": "VQA", "source": "slake", "credential": "no"}))
        _mark(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        counts[f"{split}_lines"] = len(lines)
    return counts


VQA_TASKS = [
    ("vqa_rad", "closed"), ("slake", "closed"), ("pathvqa", "closed"), ("quilt_vqa", "closed"), ("probmed", "closed"),
    ("vqa_rad", "open"), ("slake", "open"), ("pathvqa", "open"), ("quilt_vqa", "open"),
    ("pmc_vqa", "mcq"), ("omnimed_vqa", "mcq"), ("path_mmu", "mcq"),
]


# visual_chat rows: (question_type, prompt ends with <image>, flagged domain or None). Both public
# prompt layouts (image after the question when the prompt ends with <image>, else before it)
# and a row with no domain flag.
VISUAL_CHAT_ROWS = [
    ("conversation", True, "chest_xray"),
    ("conversation", False, None),
    ("detailed_description", True, "histology"),
    ("detailed_description", False, "ct_scan"),
]
VISUAL_CHAT_DOMAINS = ("chest_xray", "mri", "histology", "gross", "ct_scan")  # LLaVA-Med qa50 flags
MM_OUT_ROWS = 3


def _visual_chat_row(rng: random.Random, question_type: str, trailing_image: bool, domain: str | None, image_path: str) -> dict[str, Any]:
    """A LLaVA-Med qa50 row: `answer` is a Python-literal dict string (repr), as in medmax_eval_data."""
    organ, finding = rng.choice(ORGANS), rng.choice(FINDINGS)
    if question_type == "conversation":
        question = f"What does the image show in the {organ}?"
    else:
        question = "Describe the image in detail."
    prompt = f"{question}\n{IMG}" if trailing_image else f"{IMG}\n{question}" if question_type == "conversation" else question
    answer = {
        "gpt4_answer": f"The image shows the {organ} with {finding}.",
        "fig_label": f"Figure {rng.randrange(1, 9)}",
        "fig_caption": f"{rng.choice(MODALITIES)} of the {organ} showing {finding}.",
        # qa50 holds a list of sentences here; the judge prompt formats it with str(), so one row keeps a list.
        "in_text_mention": [f"The {organ} shows {finding}."] if question_type == "detailed_description" else f"The {organ} shows {finding}.",
        "domain": {flag: flag == domain for flag in VISUAL_CHAT_DOMAINS},
    }
    return {"task_name": "visual_chat", "question_type": question_type, "prompt": prompt, "answer": repr(answer), "image_path": image_path}


def _mm_out_row(rng: random.Random, image_path: str) -> dict[str, Any]:
    """An interleaved-output row: the question, the reference text, the reference image."""
    organ, modality = rng.choice(ORGANS), rng.choice(MODALITIES)
    article = "an" if modality[0] in "AEIOUaeiou" else "a"
    return {"task_name": "mm_out", "question_type": "mm_out", "prompt": f"What does a normal {organ} look like on {article} {modality}?",
            "answer": f"On {article} {modality} a normal {organ} has smooth borders and even texture, as in this image.", "image_path": image_path}


def _write_eval_set(paths: DemoPaths, rng: random.Random, seed: int) -> dict[str, int]:
    rows: list[dict[str, Any]] = []
    index = 0

    def eval_image(kind: str) -> str:
        nonlocal index
        fmt = "PNG" if index % 2 else "JPEG"
        name = f"{kind}/eval_{index:03d}.{'png' if fmt == 'PNG' else 'jpg'}"
        _write_bytes(paths.eval_image_root / name, render_image(ImageSpec(name, kind, 512 + 8 * (index % 5), 512, fmt), seed * 3000 + index))
        index += 1
        return name

    for task_name, question_type in VQA_TASKS:
        for _ in range(2):
            organ = rng.choice(ORGANS)
            if question_type == "closed":
                prompt, answer = f"Is there evidence of disease in the {organ}?", rng.choice(["yes", "no"])
            elif question_type == "open":
                prompt, answer = f"Which organ is shown in this image?", organ
            else:
                options = rng.sample([o for o in ORGANS if o != organ], 3) + [organ]
                rng.shuffle(options)
                letter = "ABCD"[options.index(organ)]
                options_text = " ".join(f"({l}) {o}" for l, o in zip("ABCD", options))
                prompt, answer = f"Which organ is shown? Options: {options_text}", letter
            rows.append({"task_name": task_name, "question_type": question_type, "prompt": prompt, "answer": answer, "image_path": eval_image("histology" if "path" in task_name else "radiograph")})
    for question_type in ("pmc_oa", "quilt", "report"):
        rows.append({"task_name": "image_captioning", "question_type": question_type, "prompt": "Describe the image briefly.", "answer": f"A {rng.choice(MODALITIES)} showing {rng.choice(FINDINGS)}.", "image_path": eval_image("radiograph")})
    for question_type in ("pmc_oa", "quilt"):
        rows.append({"task_name": "image_generation", "question_type": question_type, "prompt": f"Generate a {rng.choice(MODALITIES)} of {rng.choice(TISSUES)}.", "answer": "", "image_path": eval_image("histology")})
    # Appended after the older families so their rows, images and rng draws stay as they were.
    for question_type, trailing_image, domain in VISUAL_CHAT_ROWS:
        rows.append(_visual_chat_row(rng, question_type, trailing_image, domain, eval_image("histology" if domain == "histology" else "radiograph")))
    for _ in range(MM_OUT_ROWS):
        rows.append(_mm_out_row(rng, eval_image("radiograph")))
    _mark(paths.eval_set)
    paths.eval_set.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return {"eval_rows": len(rows)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", nargs="?", help="write everything under this folder (default layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vqgan-channels", type=int, default=32)
    parser.add_argument("--rows-per-task", type=int, default=4)
    for name in ("checkpoint", "base-model", "train", "validation", "public-root", "eval-set", "eval-image-root", "clip",
                 "clip-text-tower"):
        parser.add_argument(f"--{name}")
    parser.add_argument("--no-base-model", action="store_true", help="write no HF base model (the workflow converts the checkpoint)")
    parser.add_argument("--credentialed", action="append", default=[], help="SOURCE=ROOT=TEMPLATE; the demo fills the mimic_cxr root")


def default_paths(out_dir: str | Path) -> DemoPaths:
    out = Path(out_dir)
    return DemoPaths(
        checkpoint=out / "checkpoint",
        base_model=out / "base_model",
        train=out / "data" / "train.jsonl",
        validation=out / "data" / "validation.jsonl",
        public_root=out / "images" / "public",
        credentialed_root=out / "images" / "credentialed" / "mimic-cxr-jpg",
        eval_set=out / "eval" / "eval.jsonl",
        eval_image_root=out / "eval" / "images",
        clip=out / "biomedclip",
        clip_text_tower=out / "biomedbert",
    )


def run(args: argparse.Namespace) -> int:
    paths = default_paths(args.out_dir or "results/demo")
    for field in ("checkpoint", "base_model", "train", "validation", "public_root", "eval_set", "eval_image_root", "clip",
                  "clip_text_tower"):
        value = getattr(args, field)
        if value:
            setattr(paths, field, Path(value))
    if args.no_base_model:
        if args.base_model:
            raise ValueError("--base-model and --no-base-model contradict each other")
        paths.base_model = None
    for entry in args.credentialed:
        source, root, template = entry.split("=", 2)
        if source != CREDENTIALED_SOURCE or template != "mimic_cxr_jpg":
            raise ValueError(f"the demo makes only the {CREDENTIALED_SOURCE} source with template mimic_cxr_jpg, not {entry!r}")
        paths.credentialed_root = Path(root)
    counts = generate_demo(paths, seed=args.seed, vqgan_channels=args.vqgan_channels, rows_per_task=args.rows_per_task)
    print(json.dumps(counts, sort_keys=True))
    return 0
