"""Tiny HF Chameleon models: building, checked loading, and lifting HF's image-logit mask."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.output_folder import PARTIAL_MARKER, finish_output_folder, start_output_folder
from medmax_pipeline.demo_models import build_tiny_chameleon
from medmax_pipeline.models import chameleon as H
from medmax_pipeline.models.safetensors_stream import WEIGHT_INDEX_FILE, weight_files, write_safetensors_streaming
from medmax_pipeline.core.text_tokenizer import layout_tokens

TEXT_IDS = list(range(8800, 8864))


def tiny_vocabulary_map() -> dict[str, int]:
    vocab = {name: i for i, name in enumerate(layout_tokens(modified=True))}
    vocab.update({f"tok{i}": token_id for i, token_id in enumerate(TEXT_IDS)})
    return vocab


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_chameleon(tmp_path_factory.mktemp("base"), tiny_vocabulary_map(), seed=0)


def _image_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[C.BOS_ID, TEXT_IDS[0], C.SEPARATOR_ID, C.BEGIN_IMAGE_ID]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1, C.FIRST_IMAGE_TOKEN_ID : C.LAST_IMAGE_TOKEN_ID + 1]


def _image_label_loss(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.tensor([[C.BOS_ID, TEXT_IDS[0], C.SEPARATOR_ID, C.BEGIN_IMAGE_ID, 57, C.END_IMAGE_ID]])
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])


def test_build_tiny_chameleon_writes_a_complete_hf_folder(base_dir: Path, tmp_path: Path) -> None:
    config = json.loads((base_dir / "config.json").read_text())
    assert config["model_type"] == "chameleon"
    assert config["architectures"] == ["ChameleonForConditionalGeneration"]
    assert config["vocabulary_map"]["IMGIMGFDZ"] == 57  # code 53 -> id 57
    assert config["vocab_size"] == max(tiny_vocabulary_map().values()) + 1
    assert config["vq_config"]["num_embeddings"] == C.NUM_IMAGE_CODES
    assert (base_dir / "model.safetensors").is_file()
    # Same seed, same weights; another seed, other weights.
    again = build_tiny_chameleon(tmp_path / "again", tiny_vocabulary_map(), seed=0)
    other = build_tiny_chameleon(tmp_path / "other", tiny_vocabulary_map(), seed=1)
    w0, w1, w2 = (load_file(str(d / "model.safetensors")) for d in (base_dir, again, other))
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(w0[key], w1[key])
    assert not torch.equal(w0[key], w2[key])


def test_stock_hf_masks_image_logits_so_image_labels_have_a_useless_loss(base_dir: Path) -> None:
    # Why allow_image_logits exists. If this fails, transformers dropped its mask: revisit hf_model.
    model = H.load_base_model(base_dir)
    assert bool((_image_logits(model) == torch.finfo(torch.float32).min).all())
    # -finfo.min logits: the loss is ~1e37 in fp32 (inf in bf16 or once summed), never trainable.
    loss = _image_label_loss(model)
    assert torch.isinf(loss) or loss > 1e30


def test_allow_image_logits_gives_finite_loss_and_gradients(base_dir: Path) -> None:
    model = H.allow_image_logits(H.load_base_model(base_dir))
    assert H.image_logits_allowed(model)
    H.check_image_logits(model)  # raises if the mask came back by any route
    assert bool((_image_logits(model) > -1e4).all())
    loss = _image_label_loss(model)
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(model.lm_head.weight.grad).all()
    assert model.lm_head.weight.grad[57].abs().sum() > 0  # the image token's row is learnt
    # Reversible, and pixel-value encoding helpers still see the real image vocabulary.
    assert model.model.vocabulary_mapping.convert_img2bpe(torch.tensor([0, 53])).tolist() == [4, 57]
    H.set_image_logits(model, False)
    H.check_image_logits(model, expect_allowed=False)
    assert not H.image_logits_allowed(model)


def test_allow_image_logits_reaches_through_peft(base_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(H.load_base_model(base_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    H.allow_image_logits(peft_model)
    assert torch.isfinite(_image_label_loss(peft_model))


def test_check_image_logits_fails_when_masking_moves_elsewhere(base_dir: Path) -> None:
    # Simulate a transformers version that masks image logits by another route than
    # vocabulary_mapping.image_tokens: the check must refuse, not pass silently.
    model = H.allow_image_logits(H.load_base_model(base_dir))

    def mask_again(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        output[..., C.FIRST_IMAGE_TOKEN_ID : C.LAST_IMAGE_TOKEN_ID + 1] = torch.finfo(output.dtype).min
        return output

    model.lm_head.register_forward_hook(mask_again)
    with pytest.raises(H.ImageLogitsMaskedError, match="still at the dtype minimum"):
        H.check_image_logits(model)


def test_load_base_model_refuses_bad_folders(base_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(H.ModelLayoutError, match="does not exist"):
        H.load_base_model(tmp_path / "missing")
    consolidated = tmp_path / "anole"
    (consolidated / "models" / "7b").mkdir(parents=True)
    (consolidated / "models" / "7b" / "consolidated.pth").write_bytes(b"")
    with pytest.raises(H.ModelLayoutError, match="consolidated Anole.*medmax convert-checkpoint"):
        H.load_base_model(consolidated)
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(H.ModelLayoutError, match="not an HF ChameleonForConditionalGeneration"):
        H.load_base_model(llama)


def test_sharded_weights_load_and_a_missing_shard_is_named(base_dir: Path, tmp_path: Path) -> None:
    """Anole-7B's HF folder holds sharded safetensors with an index; a partial copy fails up front."""
    sharded = tmp_path / "sharded"
    H.load_base_model(base_dir).save_pretrained(str(sharded), max_shard_size="300KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    H.check_base_model_folder(sharded)
    ids = torch.tensor([[C.BOS_ID, *TEXT_IDS[:5]]])
    with torch.no_grad():
        torch.testing.assert_close(H.load_base_model(sharded)(input_ids=ids).logits, H.load_base_model(base_dir)(input_ids=ids).logits)
    (sharded / shards[1]).unlink()
    with pytest.raises(H.ModelLayoutError, match=f"1 of the {len(shards)} weight shards listed in model.safetensors.index.json are missing, first {shards[1]}"):
        H.check_base_model_folder(sharded)


def _copy_with_vocabulary(base_dir: Path, dest: Path, vocab: dict[str, int], vocab_size: int | None = None) -> Path:
    dest.mkdir()
    config = json.loads((base_dir / "config.json").read_text())
    config["vocabulary_map"] = vocab
    if vocab_size is not None:
        config["vocab_size"] = vocab_size
    (dest / "config.json").write_text(json.dumps(config))
    (dest / "model.safetensors").symlink_to(base_dir / "model.safetensors")
    return dest


def test_load_base_model_refuses_vocabularies_that_break_the_layout(base_dir: Path, tmp_path: Path) -> None:
    vocab = tiny_vocabulary_map()
    shifted = dict(vocab)
    shifted["IMGIMGFDZ"], shifted["IMGIMGFEZ"] = vocab["IMGIMGFEZ"], vocab["IMGIMGFDZ"]  # codes 53/54 swapped
    with pytest.raises(H.ModelLayoutError, match="id 57"):
        H.load_base_model(_copy_with_vocabulary(base_dir, tmp_path / "swapped", shifted))
    with pytest.raises(H.ModelLayoutError, match="outside the model's vocab_size 8000"):
        H.check_base_model_folder(_copy_with_vocabulary(base_dir, tmp_path / "small", vocab, vocab_size=8000))
    other_text = {**vocab, "tok0": TEXT_IDS[1], "tok1": TEXT_IDS[0]}
    with pytest.raises(H.ModelLayoutError, match=f"disagree at 2 id.*id {TEXT_IDS[0]} is 'tok0'"):
        H.load_base_model(base_dir, tokenizer=other_text)
    H.check_base_model_folder(base_dir, tokenizer=vocab)  # the agreeing tokenizer passes


def test_load_model_for_generation_with_adapter_reproduces_logits(base_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    trained = get_peft_model(H.load_base_model(base_dir), LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    trained.save_pretrained(str(tmp_path / "adapter"))
    trained.eval()
    H.allow_image_logits(trained)
    loaded = H.load_model_for_generation(base_dir, tmp_path / "adapter", allow_image_output=True, device="cpu")
    ids = torch.tensor([[C.BOS_ID, *TEXT_IDS[:5], C.SEPARATOR_ID]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)
        plain = H.load_model_for_generation(base_dir, None, allow_image_output=False, device="cpu")
        assert not torch.allclose(plain(input_ids=ids).logits[..., 8800:], trained(input_ids=ids).logits[..., 8800:])
    assert bool((_image_logits(plain) == torch.finfo(torch.float32).min).all())
    with pytest.raises(H.ModelLayoutError, match="no adapter_config.json"):
        H.load_model_for_generation(base_dir, tmp_path, allow_image_output=False, device="cpu")


def test_streaming_safetensors_writer_shards_like_transformers(base_dir: Path, tmp_path: Path) -> None:
    """Tensors written one at a time into shards with an index load back with HF, bit for bit."""
    weights = load_file(str(base_dir / "model.safetensors"))
    made: list[str] = []

    def maker(name: str):
        def make() -> torch.Tensor:
            made.append(name)
            return weights[name]
        return make

    plan = [(name, t.dtype, tuple(t.shape), maker(name)) for name, t in weights.items()]
    out = tmp_path / "streamed"
    out.mkdir()
    for name in ("config.json", "tokenizer.json"):
        if (base_dir / name).is_file():
            (out / name).write_bytes((base_dir / name).read_bytes())
    files = write_safetensors_streaming(out, plan, max_shard_bytes=2_000_000)
    assert len(files) > 1 and (out / WEIGHT_INDEX_FILE).is_file()
    assert made == [name for name, *_ in plan]  # each tensor made exactly once, in order
    assert set(weight_files(out)) == set(weights)
    reloaded = H.load_base_model(out).state_dict()
    original = H.load_base_model(base_dir).state_dict()
    assert all(torch.equal(reloaded[k], original[k]) for k in original)
    bad = [("x", torch.float32, (2,), lambda: torch.zeros(3))]
    with pytest.raises(ValueError, match=r"x: made torch.float32 \(3,\), planned torch.float32 \(2,\)"):
        write_safetensors_streaming(tmp_path, bad)


def test_streamed_logits_equal_the_full_forward(base_dir: Path) -> None:
    ids = [C.BOS_ID, TEXT_IDS[0], C.SEPARATOR_ID, C.BEGIN_IMAGE_ID, 57, TEXT_IDS[5]]
    model = H.allow_image_logits(H.load_base_model(base_dir))
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids])).logits[0]
    streamed = H.streamed_logits(base_dir, ids)
    assert streamed.shape == full.shape
    assert float((streamed - full).abs().max()) < 1e-5


def test_output_folders_are_only_replaced_when_ours(tmp_path: Path) -> None:
    final = tmp_path / "out"
    tmp = start_output_folder(final, "made.json", "medmax test")
    (tmp / "a.txt").write_text("1")
    finish_output_folder(tmp, final, "made.json", {"n": 1})
    assert (final / "a.txt").read_text() == "1" and not (final / PARTIAL_MARKER).exists()
    tmp = start_output_folder(final, "made.json", "medmax test")  # ours: may be replaced
    finish_output_folder(tmp, final, "made.json", {"n": 2})
    assert not (final / "a.txt").exists() and json.loads((final / "made.json").read_text()) == {"n": 2}
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "data.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        start_output_folder(tmp_path / "user", "made.json", "medmax test")
    (tmp_path / ".tmp-other").mkdir()
    with pytest.raises(FileExistsError, match="is not a partial output"):
        start_output_folder(tmp_path / "other", "made.json", "medmax test")
    assert (tmp_path / "user" / "data.txt").read_text() == "keep" and (tmp_path / ".tmp-other").is_dir()
