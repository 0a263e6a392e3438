"""medmax export: a trained adapter merged and written in the original layout and as HF.

Round trip: original -> HF (convert) -> adapter -> export -> convert the export again: the
re-converted model computes what the merged HF model computes, and the original model code (the
tests' own forward pass, test_convert.original_forward) on the exported consolidated.pth agrees.
The adapter is a PEFT LoRA adapter with non-zero random B matrices, the same folder format the
train stage writes (the demo workflow runs the real train -> export chain).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from medmax_pipeline.models import chameleon as H
from medmax_pipeline.models import chameleon_original as O
from medmax_pipeline.stages.convert_checkpoint import convert_checkpoint
from medmax_pipeline.stages.export import ExportError, export_model
from test_convert import PROMPT, assert_close, hf_logits, make_checkpoint, original_forward, tokenizer_dir  # noqa: F401  (fixture)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(H.load_base_model(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # zero after init: give the adapter an effect
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path):  # noqa: F811
    root = tmp_path_factory.mktemp("export")
    checkpoint, _, p = make_checkpoint(root / "ckpt", tokenizer_dir, seed=21)
    convert_checkpoint(checkpoint, root / "hf")
    adapter = make_adapter(root / "hf", root / "adapter", seed=3)
    record = export_model(root / "hf", adapter, checkpoint, root / "out_ckpt", root / "out_hf")
    return root, checkpoint, p, record


def test_round_trip_original_hf_adapter_export_convert_gives_the_same_logits(exported) -> None:
    root, _, _, record = exported
    merged = hf_logits(root / "out_hf", PROMPT)
    assert float((merged - hf_logits(root / "hf", PROMPT)).abs().max()) > 0.1  # the adapter changed the model
    convert_checkpoint(root / "out_ckpt", root / "again")
    assert_close(hf_logits(root / "again", PROMPT), merged)
    # The original model code loads the exported checkpoint and computes the same.
    params_json = json.loads((root / "out_ckpt/models/7b/params.json").read_text())
    state = torch.load(root / "out_ckpt/models/7b/consolidated.pth", weights_only=True)
    assert_close(original_forward(state, {**params_json, **params_json["model"]}, PROMPT), merged)
    assert record["logits_check"]["max_abs_diff"] < 1e-4


def test_export_has_the_published_layout(exported) -> None:
    root, checkpoint, _, _ = exported
    out = root / "out_ckpt"
    for name in ("models/7b/consolidated.pth", "models/7b/params.json", "models/7b/consolidate_params.json",
                 "tokenizer/text_tokenizer.json", "tokenizer/text_tokenizer_modified.json", "tokenizer/vqgan.yaml", "tokenizer/vqgan.ckpt"):
        assert (out / name).is_file(), name
    # The source checkpoint's params files and tokenizer folder go along unchanged.
    for name in ("models/7b/params.json", "models/7b/consolidate_params.json", "tokenizer/vqgan.ckpt"):
        assert (out / name).read_bytes() == (checkpoint / name).read_bytes(), name
    state = torch.load(out / "models/7b/consolidated.pth", weights_only=True)
    # The public loader asserts that rope.freqs is its one unexpected key: it must be there.
    assert O.ROPE_FREQS_KEY in state and not any(k.startswith("model.") for k in state)
    assert (root / "out_hf" / "config.json").is_file() and (root / "out_hf" / "tokenizer.json").is_file()


def test_export_never_overwrites_what_it_did_not_create(exported, tmp_path: Path) -> None:
    root, checkpoint, _, _ = exported
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "weights.bin").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="was not written by medmax export"):
        export_model(root / "hf", root / "adapter", checkpoint, theirs, tmp_path / "hf_out")
    assert (theirs / "weights.bin").read_bytes() == b"precious" and not (tmp_path / "hf_out").exists()
    # Its own outputs are replaced on a rerun.
    export_model(root / "hf", root / "adapter", checkpoint, tmp_path / "ck", tmp_path / "hf")
    export_model(root / "hf", root / "adapter", checkpoint, tmp_path / "ck", tmp_path / "hf")
    assert (tmp_path / "ck" / "medmax_export.json").is_file()


def test_the_exported_model_carries_the_adapters_credential(exported, tmp_path: Path) -> None:
    import shutil

    from medmax_pipeline.core.artifacts import describe_input, read_provenance, write_provenance

    root, checkpoint, _, _ = exported
    assert [read_provenance(root / out)["credential"] for out in ("out_ckpt", "out_hf")] == ["public", "public"]
    adapter = tmp_path / "adapter"
    shutil.copytree(root / "adapter", adapter)
    (tmp_path / "mimic_rows.parquet").write_bytes(b"credentialed rows")
    write_provenance(adapter, "adapter", credentialed_inputs=[tmp_path / "mimic_rows.parquet"])  # trained on them
    export_model(root / "hf", adapter, checkpoint, tmp_path / "ck", tmp_path / "hf")
    for out in (tmp_path / "ck", tmp_path / "hf"):
        assert read_provenance(out)["kind"] == "exported_model"
        assert describe_input(out)["credential"] == "credentialed"


def test_export_refuses_a_checkpoint_params_json_of_another_model(exported, tmp_path: Path) -> None:
    import shutil

    root, checkpoint, _, _ = exported
    other = tmp_path / "other"
    shutil.copytree(checkpoint / "tokenizer", other / "tokenizer")
    (other / "models/7b").mkdir(parents=True)
    document = json.loads((checkpoint / "models/7b/params.json").read_text())
    document["model"]["n_layers"] = 32
    (other / "models/7b/params.json").write_text(json.dumps(document))
    with pytest.raises(ExportError, match="describes another model than the trained one: n_layers: 32 != 2"):
        export_model(root / "hf", root / "adapter", other, tmp_path / "ck", tmp_path / "hf")
    assert not (tmp_path / "ck").exists() and not (tmp_path / "hf").exists()
