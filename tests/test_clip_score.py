"""The local CLIP loader: random folder round trip, similarities, and clear errors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from medmax_pipeline.models.clip import CONFIG_NAME, WEIGHT_NAMES, ClipLoadError, load_clip, make_random_clip


def _image(seed, size=(48, 40)):
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return make_random_clip(tmp_path_factory.mktemp("clip"), seed=0)


def test_loads_and_scores(clip_dir):
    scorer = load_clip(clip_dir)
    images = [_image(1), _image(2)]
    sims = scorer.image_text_similarity(images, ["a chest x-ray", "an H&E slide"])
    assert sims.shape == (2,) and np.all(np.abs(sims) <= 1.0 + 1e-6)
    same = scorer.image_image_similarity(images, images)
    assert np.allclose(same, 1.0, atol=1e-5)  # cosine of an embedding with itself
    other = scorer.image_image_similarity([images[0]], [images[1]])
    assert other[0] < 1.0 - 1e-4
    assert scorer.text_text_similarity(["lung"], ["lung"])[0] == pytest.approx(1.0, abs=1e-5)
    # Long texts are truncated, never fail; the end token stays in.
    ids, eot = scorer.tokenize(["x" * 500])
    assert int(ids[0, eot[0]]) == scorer.eot_id


def test_same_seed_same_weights(tmp_path, clip_dir):
    other = make_random_clip(tmp_path / "again", seed=0)
    a = load_clip(clip_dir).image_text_similarity([_image(3)], ["liver"])
    b = load_clip(other).image_text_similarity([_image(3)], ["liver"])
    assert np.allclose(a, b)
    c = load_clip(make_random_clip(tmp_path / "seed1", seed=1)).image_text_similarity([_image(3)], ["liver"])
    assert not np.allclose(a, c)


def test_missing_and_malformed_folders(tmp_path, clip_dir):
    with pytest.raises(ClipLoadError, match="does not exist"):
        load_clip(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ClipLoadError, match=CONFIG_NAME):
        load_clip(empty)
    broken = make_random_clip(tmp_path / "broken", seed=0)
    (broken / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ClipLoadError, match="not valid JSON"):
        load_clip(broken)
    biomed = make_random_clip(tmp_path / "biomed", seed=0)
    cfg = json.loads((biomed / CONFIG_NAME).read_text())
    cfg["model_cfg"]["text_cfg"]["hf_model_name"] = "microsoft/BiomedNLP-PubMedBERT"
    (biomed / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ClipLoadError, match="timm / HuggingFace tower"):
        load_clip(biomed)
    mismatch = make_random_clip(tmp_path / "mismatch", seed=0)
    cfg = json.loads((mismatch / CONFIG_NAME).read_text())
    cfg["model_cfg"]["vision_cfg"]["layers"] = 3
    (mismatch / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ClipLoadError, match="missing"):
        load_clip(mismatch)
    noweights = make_random_clip(tmp_path / "noweights", seed=0)
    (noweights / WEIGHT_NAMES[0]).unlink()
    with pytest.raises(ClipLoadError, match="has none of"):
        load_clip(noweights)


def test_reads_pytorch_bin(tmp_path):
    from safetensors.torch import load_file

    folder = make_random_clip(tmp_path / "bin", seed=2)
    state = load_file(str(folder / WEIGHT_NAMES[0]))
    torch.save(state, folder / "open_clip_pytorch_model.bin")
    expected = load_clip(folder).text_text_similarity(["a"], ["b"])
    (folder / WEIGHT_NAMES[0]).unlink()
    assert np.allclose(load_clip(folder).text_text_similarity(["a"], ["b"]), expected)


def test_captioning_rows_scored_through_score(tmp_path, clip_dir):
    from medmax_pipeline.stages.evaluate.score import ScoreError, score_rows

    _image(5).save(tmp_path / "x.png")
    row = {"task_name": "image_captioning", "question_type": "pmc_oa", "prompt": "Describe.", "answer": "ref",
           "image_path": "x.png", "model": "m", "prediction": "a chest x-ray", "prediction_first_token": None,
           "generated_image_tokens": []}
    scorer = load_clip(clip_dir)
    out = score_rows([row], "medmax", clip=scorer, image_root=tmp_path)
    expected = scorer.image_text_similarity([Image.open(tmp_path / "x.png")], ["a chest x-ray"])[0]
    assert out[0]["score"] == pytest.approx(expected, abs=1e-6) and out[0]["unjudged"] is False
    with pytest.raises(ScoreError, match=r"row 0: image .*missing.png does not exist"):
        score_rows([{**row, "image_path": "missing.png"}], "medmax", clip=scorer, image_root=tmp_path)


def test_image_generation_rows_decoded_and_scored(tmp_path, clip_dir):
    vqgan_module = pytest.importorskip("medmax_pipeline.models.vqgan", reason="stage 2 VQGAN module not present")
    from medmax_pipeline.stages.evaluate.score import score_rows

    vqgan, _ = vqgan_module.make_random_vqgan(ch=32, seed=0)
    _image(6).save(tmp_path / "ref.png")
    tokens = [int(t) + 4 for t in np.random.default_rng(0).integers(0, 8192, 1024)]
    row = {"task_name": "image_generation", "question_type": "pmc_oa", "prompt": "a lung", "answer": "",
           "image_path": "ref.png", "model": "m", "prediction": "", "prediction_first_token": None,
           "generated_image_tokens": tokens}
    empty = {**row, "generated_image_tokens": [], "image_path": None}
    out = score_rows([row, empty], "medmax", clip=load_clip(clip_dir), vqgan=vqgan.eval(), image_root=tmp_path)
    assert -1.0 <= out[0]["score"] <= 1.0 and out[0]["score_ref_image"] is not None
    assert out[1]["score"] == 0.0 and "no image generated" in out[1]["note"]
