"""The embedded demo: deterministic from its seed, in the real layouts, with every kind of image and row."""

from __future__ import annotations

import hashlib
import re
import json
from pathlib import Path

import pytest
from PIL import Image

import torch

from medmax_pipeline.core import constants as C
from medmax_pipeline.models.chameleon_original import read_params
from medmax_pipeline.demo import TASKS, VQA_TASKS, DemoPaths, default_paths, generate_demo
from medmax_pipeline.core.rows import read_row_batches
from medmax_pipeline.core.text_tokenizer import check_tokenizer_layout, load_tokenizer


def file_digest(path: Path) -> str:
    if path.name == "medmax_conversion.json":  # its record names the source folder, which differs by location on purpose
        record = json.loads(path.read_text())
        record.pop("source")
        return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DemoPaths, dict]:
    root = tmp_path_factory.mktemp("demo")
    paths = default_paths(root)
    counts = generate_demo(paths, seed=3, vqgan_channels=32, rows_per_task=2)
    return root, paths, counts


def test_same_seed_same_bytes_other_seed_other_bytes(demo, tmp_path: Path) -> None:
    root, _, _ = demo
    again = tmp_path / "again"
    generate_demo(default_paths(again), seed=3, vqgan_channels=32, rows_per_task=2)
    first, second = tree_digest(root), tree_digest(again)
    assert first.keys() == second.keys()
    different = [name for name in first if first[name] != second[name]]
    assert different == [], f"not deterministic: {different[:5]}"
    other = tmp_path / "other"
    generate_demo(default_paths(other), seed=4, vqgan_channels=32, rows_per_task=2)
    assert tree_digest(other)[ "data/train.jsonl"] != first["data/train.jsonl"]


def test_checkpoint_folder_has_the_original_layout(demo) -> None:
    _, paths, _ = demo
    tokenizer_dir = paths.checkpoint / "tokenizer"
    for name in ("vqgan.yaml", "vqgan.ckpt", "text_tokenizer.json", "text_tokenizer_modified.json"):
        assert (tokenizer_dir / name).is_file(), name
    model_dir = paths.checkpoint / "models" / "7b"
    params = read_params(model_dir)  # the original loader's merge of params.json + consolidate_params.json
    assert (params.dim, params.n_heads, params.qk_normalization, params.ffn_dim) == (64, 4, True, 256)
    state = torch.load(model_dir / "consolidated.pth", weights_only=True)
    assert "rope.freqs" in state and state["tok_embeddings.weight"].shape == (params.vocab_size, 64)
    check_tokenizer_layout(load_tokenizer(tokenizer_dir / "text_tokenizer_modified.json"), require_image_placeholder=True)
    plain = load_tokenizer(tokenizer_dir / "text_tokenizer.json")
    check_tokenizer_layout(plain, require_image_placeholder=False)
    assert plain.id_to_token(C.IMAGE_PLACEHOLDER_ID) == "<reserved08707>"
    config = json.loads((paths.base_model / "config.json").read_text())
    assert config["vocabulary_map"]["<image>"] == C.IMAGE_PLACEHOLDER_ID
    assert config["vocabulary_map"]["IMGIMGFDZ"] == 57
    # The HF base model is the checkpoint converted (and checked) by convert-checkpoint.
    assert json.loads((paths.base_model / "medmax_conversion.json").read_text())["logits_check"]["max_abs_diff"] < 1e-4


def test_without_a_base_model_only_the_checkpoint_holds_the_model(tmp_path: Path) -> None:
    paths = default_paths(tmp_path)
    paths.base_model = None
    generate_demo(paths, seed=3, vqgan_channels=32, rows_per_task=1)
    assert (paths.checkpoint / "models" / "7b" / "consolidated.pth").is_file()
    assert not (tmp_path / "base_model").exists()


def test_rows_cover_every_task_with_public_and_credentialed_rows(demo) -> None:
    _, paths, _ = demo
    rows, problems = [], []
    for split_path, split in ((paths.train, "train"), (paths.validation, "validation")):
        for batch, batch_problems in read_row_batches(split_path, split):
            rows += batch.to_pylist()
            problems += batch_problems
    assert {r["task"] for r in rows} == set(TASKS)
    public = [r for r in rows if r["credential"] == "no"]
    credentialed = [r for r in rows if r["credential"] == "yes"]
    assert credentialed and all(r["tokens"] == [] and r["image_path"] is None for r in credentialed)
    assert all(json.loads(r["extra"]).keys() == {"subject_id", "study_id", "dicom_id"} for r in credentialed)
    filled = [r for r in public if r["image_path"] and "<image>" in r["text"]]
    assert filled and all(r["tokens"][0] == C.BOS_ID and r["tokens"][-1] == C.EOS_ID for r in filled)
    assert all(C.BEGIN_IMAGE_ID in r["tokens"] and C.END_IMAGE_ID in r["tokens"] for r in filled)
    assert len(problems) == 2  # the truncated JSON line and the wrong type


def test_images_of_every_kind_and_broken_credentialed_files(demo) -> None:
    _, paths, _ = demo
    modes, sizes, formats = set(), set(), set()
    for path in paths.public_root.rglob("*"):
        if path.is_file():
            with Image.open(path) as image:
                modes.add(image.mode)
                sizes.add(image.size)
                formats.add(image.format)
    assert {"L", "RGB", "RGBA", "P", "I;16"} <= modes
    assert {"JPEG", "PNG"} <= formats
    assert any(w < 128 for w, _ in sizes) and any(w > 1000 for w, _ in sizes) and any(h > 2 * w for w, h in sizes)
    credentialed = [p for p in paths.credentialed_root.rglob("*") if p.is_file()]
    assert all(p.relative_to(paths.credentialed_root).parts[0] == "files" for p in credentialed)
    assert any(p.stat().st_size == 0 for p in credentialed)
    assert any(p.read_bytes().startswith(b"this is a text file") for p in credentialed)
    unreadable = 0
    for p in credentialed:
        try:
            with Image.open(p) as image:
                image.load()
        except Exception:
            unreadable += 1
    assert unreadable == 3


def test_eval_set_covers_the_twelve_vqa_tasks(demo) -> None:
    _, paths, counts = demo
    rows = [json.loads(line) for line in paths.eval_set.read_text().splitlines()]
    assert len(rows) == counts["eval_rows"]
    assert {(r["task_name"], r["question_type"]) for r in rows} >= set(VQA_TASKS)
    assert {"image_captioning", "image_generation"} <= {r["task_name"] for r in rows}
    assert set(rows[0]) == {"task_name", "question_type", "prompt", "answer", "image_path"}
    assert all((paths.eval_image_root / r["image_path"]).is_file() for r in rows)


def test_the_demo_never_replaces_what_it_did_not_create(tmp_path: Path) -> None:
    """A folder or file at a demo path that the demo did not make is refused before anything is
    written; the demo's own folders (marked) are replaced on the next run."""
    from medmax_pipeline.cli import main as cli_main
    from medmax_pipeline.demo import DemoOwnershipError, demo_marker

    paths = default_paths(tmp_path / "demo")
    user_checkpoint = tmp_path / "demo" / "checkpoint"
    (user_checkpoint / "models" / "7b").mkdir(parents=True)
    (user_checkpoint / "models" / "7b" / "consolidated.pth").write_bytes(b"the user's weights")
    with pytest.raises(DemoOwnershipError, match=rf"{re.escape(str(user_checkpoint))} exists and was not made by `medmax demo`"):
        generate_demo(paths, seed=0, vqgan_channels=32, rows_per_task=1)
    assert (user_checkpoint / "models" / "7b" / "consolidated.pth").read_bytes() == b"the user's weights"
    assert not paths.train.exists() and not paths.public_root.exists()  # refused before writing anything

    user_rows = tmp_path / "mine" / "train.jsonl"
    user_rows.parent.mkdir()
    user_rows.write_text('{"text": "mine"}\n')
    code = cli_main(["demo", str(tmp_path / "other"), "--train", str(user_rows)])
    assert code == 1 and user_rows.read_text() == '{"text": "mine"}\n'

    fresh = default_paths(tmp_path / "fresh")
    generate_demo(fresh, seed=0, vqgan_channels=32, rows_per_task=1)
    assert demo_marker(fresh.checkpoint).is_file() and demo_marker(fresh.train).is_file()
    assert not any(p.name.endswith('.medmax-demo') for p in fresh.public_root.rglob('*'))  # image roots hold only images
    generate_demo(fresh, seed=0, vqgan_channels=32, rows_per_task=1)  # its own output: replaced


def test_eval_set_has_visual_chat_rows_in_the_qa50_schema_and_mm_out_rows(demo) -> None:
    import ast

    _, paths, _ = demo
    rows = [json.loads(line) for line in paths.eval_set.read_text().splitlines()]
    chat = [r for r in rows if r["task_name"] == "visual_chat"]
    assert {r["question_type"] for r in chat} == {"conversation", "detailed_description"}
    # Both public prompt layouts: ending with <image>, and not.
    assert any(r["prompt"].endswith("<image>") for r in chat) and any(not r["prompt"].endswith("<image>") for r in chat)
    for r in chat:
        answer = ast.literal_eval(r["answer"])  # a Python-literal dict string, as the public code reads it
        assert {"gpt4_answer", "fig_label", "fig_caption", "in_text_mention", "domain"} <= answer.keys()
        assert set(answer["domain"]) == {"chest_xray", "mri", "histology", "gross", "ct_scan"}
        assert all(isinstance(flag, bool) for flag in answer["domain"].values())
        assert (paths.eval_image_root / r["image_path"]).is_file()
    mm_out = [r for r in rows if r["task_name"] == "mm_out"]
    assert len(mm_out) >= 2
    assert all(r["prompt"] and r["answer"] and (paths.eval_image_root / r["image_path"]).is_file() for r in mm_out)


def test_the_demo_biomedclip_loads_through_open_clip_from_its_two_folders(demo) -> None:
    from medmax_pipeline.models.clip import BIOMEDCLIP_TEXT_TOWER, ClipLoadError, load_clip

    _, paths, _ = demo
    assert json.loads((paths.clip / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]["hf_model_name"] == BIOMEDCLIP_TEXT_TOWER
    scorer = load_clip(paths.clip, paths.clip_text_tower)
    image = Image.open(sorted(paths.eval_image_root.rglob("*.png"))[0])
    assert -1.0 <= scorer.image_text_similarity([image], ["a chest x-ray"])[0] <= 1.0
    with pytest.raises(ClipLoadError, match="clip_text_tower"):
        load_clip(paths.clip)  # the hub id alone is never looked up
