"""BiomedCLIP through open_clip from local folders: the tiny random model's layout, the public
similarity procedure, and clear errors."""

import json

import numpy as np
import pytest
from PIL import Image

from medmax_pipeline.models.clip import (
    BIOMEDCLIP_TEXT_TOWER,
    CONFIG_NAME,
    PUBLIC_CONTEXT_LENGTH,
    ClipLoadError,
    load_clip,
)
from medmax_pipeline.demo_models import make_random_biomedclip


def _image(seed, size=(48, 40), mode="RGB"):
    pixels = (np.random.default_rng(seed).random((size[1], size[0], len(mode))) * 255).astype("uint8")
    return Image.fromarray(pixels, mode)


@pytest.fixture(scope="module")
def biomedclip(tmp_path_factory):
    root = tmp_path_factory.mktemp("biomedclip")
    return make_random_biomedclip(root / "clip", root / "biomedbert", seed=0), root / "biomedbert"


@pytest.fixture(scope="module")
def scorer(biomedclip):
    return load_clip(*biomedclip)


def test_the_tiny_model_has_biomedclips_hub_layout_and_config_structure(biomedclip):
    folder, tower = biomedclip
    assert sorted(p.name for p in folder.iterdir()) == [
        "open_clip_config.json", "open_clip_pytorch_model.bin", "special_tokens_map.json", "tokenizer_config.json", "vocab.txt"]
    assert sorted(p.name for p in tower.iterdir()) == ["config.json"]
    config = json.loads((folder / CONFIG_NAME).read_text())
    # The keys of microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224's open_clip_config.json.
    assert set(config) == {"model_cfg", "preprocess_cfg"}
    assert set(config["model_cfg"]) == {"embed_dim", "vision_cfg", "text_cfg"}
    assert set(config["model_cfg"]["vision_cfg"]) == {"timm_model_name", "timm_model_pretrained", "timm_pool", "timm_proj", "image_size"}
    assert config["model_cfg"]["text_cfg"] == {
        "hf_model_name": BIOMEDCLIP_TEXT_TOWER, "hf_tokenizer_name": BIOMEDCLIP_TEXT_TOWER, "hf_proj_type": "mlp",
        "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256}
    assert json.loads((tower / "config.json").read_text())["model_type"] == "bert"


def test_loaded_through_open_clip_with_the_local_text_tower(scorer, biomedclip):
    import open_clip
    from open_clip.hf_model import HFTextEncoder
    from open_clip.timm_model import TimmModel

    assert isinstance(scorer.model, open_clip.CustomTextCLIP)
    assert isinstance(scorer.model.visual, TimmModel) and isinstance(scorer.model.text, HFTextEncoder)
    # The tower was built from the local config.json, not from the hub id the config names.
    assert scorer.model.text.config.hidden_size == json.loads((biomedclip[1] / "config.json").read_text())["hidden_size"]
    assert isinstance(scorer.tokenizer, open_clip.tokenizer.HFTokenizer)


def test_similarities_are_the_public_procedure(scorer):
    """Each pair scored one at a time as the public CLIPSimilarity does: preprocess (RGBA -> RGB),
    encode, divide by the norm, dot product; the scorer batches and must agree."""
    import torch

    images = [_image(1), _image(2, mode="RGBA")]
    texts = ["a chest x-ray", "An H&E slide of the liver, 40x."]

    def public_image(img):
        if img.mode == "RGBA":
            img = img.convert("RGB")
        with torch.no_grad():
            f = scorer.model.encode_image(scorer.preprocess(img).unsqueeze(0))
        return f / f.norm(dim=-1, keepdim=True)

    def public_text(text):
        with torch.no_grad():
            f = scorer.model.encode_text(scorer.tokenizer([text], context_length=256))
        return f / f.norm(dim=-1, keepdim=True)

    expected = [(public_image(i) @ public_text(t).t()).item() for i, t in zip(images, texts)]
    assert np.allclose(scorer.image_text_similarity(images, texts), expected, atol=1e-5)
    expected_ii = (public_image(images[0]) @ public_image(images[1]).t()).item()
    assert scorer.image_image_similarity([images[0]], [images[1]])[0] == pytest.approx(expected_ii, abs=1e-5)
    assert np.allclose(scorer.image_image_similarity(images, images), 1.0, atol=1e-5)
    assert scorer.text_text_similarity(["lung"], ["lung"])[0] == pytest.approx(1.0, abs=1e-5)
    assert scorer.text_text_similarity(["lung"], ["a slide"])[0] < 1.0 - 1e-4


def test_texts_use_the_public_context_length_and_long_texts_are_truncated(scorer):
    ids = scorer.tokenize(["x " * 1000, "short"])
    assert tuple(ids.shape) == (2, PUBLIC_CONTEXT_LENGTH)
    assert np.isfinite(scorer.image_text_similarity([_image(3)], ["liver " * 1000])).all()


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, biomedclip):
    again = make_random_biomedclip(tmp_path / "again", tmp_path / "again_tower", seed=0)
    for name in ("open_clip_pytorch_model.bin", CONFIG_NAME, "vocab.txt"):
        assert (again / name).read_bytes() == (biomedclip[0] / name).read_bytes(), name
    other = make_random_biomedclip(tmp_path / "seed1", tmp_path / "seed1_tower", seed=1)
    assert (other / "open_clip_pytorch_model.bin").read_bytes() != (biomedclip[0] / "open_clip_pytorch_model.bin").read_bytes()
    a = load_clip(*biomedclip).image_text_similarity([_image(3)], ["liver"])
    b = load_clip(other, tmp_path / "seed1_tower").image_text_similarity([_image(3)], ["liver"])
    assert not np.allclose(a, b)


def test_missing_and_malformed_folders(tmp_path):
    tower = tmp_path / "tower"
    with pytest.raises(ClipLoadError, match="does not exist"):
        load_clip(tmp_path / "nowhere", tower)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ClipLoadError, match=CONFIG_NAME):
        load_clip(empty, tower)

    broken = make_random_biomedclip(tmp_path / "broken", tower, seed=0)
    (broken / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ClipLoadError, match="not valid JSON"):
        load_clip(broken, tower)

    noweights = make_random_biomedclip(tmp_path / "noweights", tower, seed=0)
    (noweights / "open_clip_pytorch_model.bin").unlink()
    with pytest.raises(ClipLoadError, match="has none of open_clip_model.safetensors"):
        load_clip(noweights, tower)

    hub_id = make_random_biomedclip(tmp_path / "hub_id", tower, seed=0)
    with pytest.raises(ClipLoadError, match=r"not a local folder: set evaluate.clip_text_tower \(--clip-text-tower\)"):
        load_clip(hub_id)  # the config names the tower by hub id; nothing may be downloaded
    with pytest.raises(ClipLoadError, match=r"has no config.json"):
        load_clip(hub_id, tmp_path / "empty")

    notok = make_random_biomedclip(tmp_path / "notok", tower, seed=0)
    (notok / "vocab.txt").unlink()
    with pytest.raises(ClipLoadError, match="none of the tokenizer files"):
        load_clip(notok, tower)

    mismatch = make_random_biomedclip(tmp_path / "mismatch", tower, seed=0)
    cfg = json.loads((mismatch / CONFIG_NAME).read_text())
    cfg["model_cfg"]["embed_dim"] = 24  # the checkpoint was saved with 16
    (mismatch / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ClipLoadError, match=rf"open_clip could not load {mismatch}"):
        load_clip(mismatch, tower)


def test_captioning_rows_scored_through_score(tmp_path, scorer):
    from medmax_pipeline.stages.evaluate.score import ScoreError, score_rows

    _image(5).save(tmp_path / "x.png")
    row = {"task_name": "image_captioning", "question_type": "pmc_oa", "prompt": "Describe.", "answer": "ref",
           "image_path": "x.png", "model": "m", "prediction": "a chest x-ray", "prediction_first_token": None,
           "generated_image_tokens": []}
    out = score_rows([row], "medmax", clip=scorer, image_root=tmp_path)
    expected = scorer.image_text_similarity([Image.open(tmp_path / "x.png")], ["a chest x-ray"])[0]
    assert out[0]["score"] == pytest.approx(expected, abs=1e-6) and out[0]["unjudged"] is False
    with pytest.raises(ScoreError, match=r"row 0: image .*missing.png does not exist"):
        score_rows([{**row, "image_path": "missing.png"}], "medmax", clip=scorer, image_root=tmp_path)


def test_image_generation_rows_decoded_and_scored(tmp_path, scorer):
    from medmax_pipeline.demo_models import make_random_vqgan
    from medmax_pipeline.stages.evaluate.score import score_rows

    vqgan, _ = make_random_vqgan(ch=32, seed=0)
    _image(6).save(tmp_path / "ref.png")
    tokens = [int(t) + 4 for t in np.random.default_rng(0).integers(0, 8192, 1024)]
    row = {"task_name": "image_generation", "question_type": "pmc_oa", "prompt": "a lung", "answer": "",
           "image_path": "ref.png", "model": "m", "prediction": "", "prediction_first_token": None,
           "generated_image_tokens": tokens}
    empty = {**row, "generated_image_tokens": [], "image_path": None}
    out = score_rows([row, empty], "medmax", clip=scorer, vqgan=vqgan.eval(), image_root=tmp_path)
    assert -1.0 <= out[0]["score"] <= 1.0 and out[0]["score_ref_image"] is not None
    assert out[1]["score"] == 0.0 and "no image generated" in out[1]["note"]


# ----------------------------------------------------------------------------------------------
# Image paths confined to --image-root, as generate confines them (clip-scores and score)
# ----------------------------------------------------------------------------------------------


def _escape_case(tmp_path):
    """An image root with one good image, a secret image beside it and a symlink out to it."""
    root = tmp_path / "images"
    root.mkdir()
    _image(7).save(root / "ok.png")
    _image(8).save(tmp_path / "secret.png")
    (root / "link.png").symlink_to(tmp_path / "secret.png")
    return root, tmp_path / "secret.png"


def _caption_row(image_path):
    return {"task_name": "image_captioning", "question_type": "pmc_oa", "prompt": "Describe.", "answer": "ref",
            "image_path": image_path, "model": "m", "prediction": "a chest x-ray", "prediction_first_token": None,
            "generated_image_tokens": []}


ESCAPES = [("absolute", r"is an absolute path"), ("parent", r"has a '\.\.' component"), ("symlink", r"outside")]


def _escaping_path(kind, secret):
    return {"absolute": str(secret), "parent": "../secret.png", "symlink": "link.png"}[kind]


@pytest.mark.parametrize("kind,message", ESCAPES)
def test_clip_scores_and_score_refuse_image_paths_outside_the_root(tmp_path, scorer, kind, message):
    from medmax_pipeline.stages.evaluate.clip_scores import clip_score_rows
    from medmax_pipeline.stages.evaluate.score import ScoreError, score_rows

    root, secret = _escape_case(tmp_path)
    rows = [_caption_row("ok.png"), _caption_row(_escaping_path(kind, secret))]
    with pytest.raises(ScoreError, match=rf"preds row 1: image_path .*{message}"):
        clip_score_rows(rows, clip=scorer, image_root=root, source="preds")
    with pytest.raises(ScoreError, match=rf"preds row 1: image_path .*{message}"):
        score_rows(rows, "medmax", clip=scorer, image_root=root, source="preds")
    # The same image inside the root is scored.
    assert clip_score_rows(rows[:1], clip=scorer, image_root=root)[0]["unjudged"] is False


@pytest.mark.parametrize("kind,message", ESCAPES)
def test_clip_scores_and_score_commands_name_the_escaping_row_on_stderr(tmp_path, biomedclip, kind, message, capsys):
    from medmax_pipeline.cli import main

    root, secret = _escape_case(tmp_path)
    predictions = tmp_path / "preds.jsonl"
    predictions.write_text("".join(json.dumps(r) + "\n" for r in [_caption_row("ok.png"), _caption_row(_escaping_path(kind, secret))]))
    clip_dir, tower = biomedclip
    commands = {
        "clip-scores": ["clip-scores", "--predictions", str(predictions), "--output", str(tmp_path / "clip.parquet")],
        "score": ["score", "--predictions", str(predictions), "--output", str(tmp_path / "scores")],
    }
    for name, command in commands.items():
        code = main([*command, "--clip", str(clip_dir), "--clip-text-tower", str(tower), "--image-root", str(root)])
        out, err = capsys.readouterr()
        assert code == 1, name
        assert err.count("error:") == 1 and "error:" not in out, name
        assert "preds.jsonl row 1" in err and "Traceback" not in err, name
        assert any(__import__("re").search(message, line) for line in err.splitlines()), name
    assert not (tmp_path / "clip.parquet").exists() and not (tmp_path / "scores" / "scores.parquet").exists()
