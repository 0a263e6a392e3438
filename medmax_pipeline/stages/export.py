"""`medmax export`: the trained LoRA adapter merged into its base, in both formats.

Out (two folders, each written whole into a temporary sibling and moved into place):
- a checkpoint folder in the original Chameleon layout, as the public MedMax release's
  src/bin_to_pth.py makes it and the public Chameleon/MedMax inference code loads it:
  models/7b/consolidated.pth (+ rope.freqs, which that loader expects to find and skip),
  params.json and consolidate_params.json (the source checkpoint's own files when they
  describe this model, else written from the HF config), and the source checkpoint's tokenizer/
  folder copied whole (text tokenizers and the full VQGAN, whose decoder HF lacks);
- the merged HF ChameleonForConditionalGeneration folder (tokenizer files of the base copied).
checklist.chk is not copied: its checksums would describe the base model's weights.

Checks: every text tensor of the merged model lands in consolidated.pth (HF q/k norms must
be the same for every head, which LoRA never changes); and the original model's forward pass on
the written consolidated.pth gives the merged HF folder's logits within fp32 tolerance.

Never overwrites what it did not create: an output folder must be absent, empty or an
earlier export (it holds medmax_export.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from medmax_pipeline.core.artifacts import describe_input, write_provenance
from medmax_pipeline.core.output_folder import finish_output_folder, start_output_folder
from medmax_pipeline.core.settings import add_setting_arguments, checked_settings, setting, values_from_args, workflow_arguments_for
from medmax_pipeline.core.text_tokenizer import MODIFIED_TOKENIZER_FILE

if TYPE_CHECKING:  # torch and the models are imported where they are used: the workflow reads ExportConfig at planning
    import torch

    from medmax_pipeline.models import chameleon_original as orig

MARKER = "medmax_export.json"
COMMAND = "medmax export"
DTYPES = ("float32", "bfloat16", "float16")  # torch dtype names


class ExportError(ValueError):
    """The trained model cannot be exported faithfully (the message says which file and why)."""


def stored_dtype(base_model: Path, requested: str) -> torch.dtype:
    """The dtype to write: `requested`, or for "auto" the dtype the base folder's config records (float32 if none)."""
    import torch

    if requested != "auto":
        return getattr(torch, requested)
    name = json.loads((base_model / "config.json").read_text()).get("dtype") or "float32"
    if name not in DTYPES:
        raise ExportError(f"{base_model}/config.json records dtype {name!r}; pass --dtype one of {sorted(DTYPES)}")
    return getattr(torch, name)


def original_state_from_hf(state: dict[str, torch.Tensor], p: orig.OriginalParams, source: str) -> dict[str, torch.Tensor]:
    """consolidated.pth contents for an HF state dict (its vqmodel.* tensors stay in tokenizer/vqgan.ckpt)."""
    from medmax_pipeline.models import chameleon_original as orig

    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for rule in orig.tensor_rules(p):
        if rule.hf not in state:
            raise ExportError(f"{source}: tensor {rule.hf} is missing")
        out[rule.original] = orig.to_original(rule, state[rule.hf].detach(), p).contiguous()
        used.add(rule.hf)
    left = sorted(k for k in state if k not in used and not k.startswith("model.vqmodel."))
    if left:
        raise ExportError(f"{source}: {len(left)} tensor(s) have no place in the original format, first {left[:5]}")
    out[orig.ROPE_FREQS_KEY] = orig.rope_frequencies(p.head_dim, p.rope_theta).to(state["lm_head.weight"].dtype)
    return out


def params_files(checkpoint: Path | None, p: orig.OriginalParams) -> dict[str, str]:
    """File name -> text of params.json and consolidate_params.json for the exported model."""
    from medmax_pipeline.models import chameleon_original as orig

    source_dir = checkpoint / orig.MODEL_SUBDIR if checkpoint is not None else None
    if source_dir is not None and (source_dir / orig.PARAMS_FILE).is_file():
        source_params = orig.read_params(source_dir)
        differences = orig.same_model_shape(source_params, p)
        if differences:
            raise ExportError(
                f"{source_dir / orig.PARAMS_FILE} describes another model than the trained one: {'; '.join(differences)}"
            )
        names = [orig.PARAMS_FILE] + ([orig.CONSOLIDATE_PARAMS_FILE] if (source_dir / orig.CONSOLIDATE_PARAMS_FILE).is_file() else [])
        return {name: (source_dir / name).read_text() for name in names}
    params_json, consolidate = orig.params_documents(p)
    return {orig.PARAMS_FILE: json.dumps(params_json, indent=2) + "\n", orig.CONSOLIDATE_PARAMS_FILE: json.dumps(consolidate, indent=2) + "\n"}


def export_model(
    base_model: str | Path,
    adapter: str | Path,
    checkpoint: str | Path | None,
    output_checkpoint: str | Path,
    output_hf: str | Path,
    dtype: str = "auto",
) -> dict[str, Any]:
    """Merge `adapter` into `base_model` and write both output folders; return the record written beside them."""
    from medmax_pipeline.models import chameleon
    from medmax_pipeline.models import chameleon_original as orig

    base_model, adapter = Path(base_model), Path(adapter)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if not (adapter / "adapter_config.json").is_file():
        raise ExportError(f"{adapter} is not a PEFT adapter folder: it has no adapter_config.json")
    tokenizer_dir = checkpoint / "tokenizer" if checkpoint is not None else None
    if tokenizer_dir is not None and not tokenizer_dir.is_dir():
        raise ExportError(f"{tokenizer_dir} does not exist; the exported checkpoint needs the source checkpoint's tokenizer folder")
    tokenizer = tokenizer_dir / MODIFIED_TOKENIZER_FILE if tokenizer_dir is not None and (tokenizer_dir / MODIFIED_TOKENIZER_FILE).is_file() else None
    out_dtype = stored_dtype(base_model, dtype)
    # Everything that can refuse without loading weights comes before the output folders are claimed.
    p = orig.params_from_hf_config(chameleon.check_base_model_folder(base_model, tokenizer), source=str(base_model / "config.json"))
    params_texts = params_files(checkpoint, p)
    tmp_checkpoint = start_output_folder(output_checkpoint, MARKER, COMMAND)
    try:
        tmp_hf = start_output_folder(output_hf, MARKER, COMMAND)
    except FileExistsError:
        shutil.rmtree(tmp_checkpoint)
        raise
    try:
        record = _write_outputs(base_model, adapter, tokenizer_dir, tokenizer, out_dtype, p, params_texts, tmp_checkpoint, tmp_hf)
        # The exported model is the adapter's: credentialed when the adapter is (its provenance record).
        lineage = [describe_input(path) for path in (base_model, adapter, *([checkpoint] if checkpoint else []))]
        for tmp in (tmp_checkpoint, tmp_hf):
            write_provenance(tmp, "exported_model", inputs=lineage)
    except BaseException:
        shutil.rmtree(tmp_checkpoint, ignore_errors=True)  # ours: made by start_output_folder above
        shutil.rmtree(tmp_hf, ignore_errors=True)
        raise
    record.update({"checkpoint": str(checkpoint) if checkpoint is not None else None, "outputs": {"checkpoint": str(output_checkpoint), "hf": str(output_hf)}})
    finish_output_folder(tmp_hf, output_hf, MARKER, record)
    finish_output_folder(tmp_checkpoint, output_checkpoint, MARKER, record)
    return record


def _write_outputs(
    base_model: Path, adapter: Path, tokenizer_dir: Path | None, tokenizer: Path | None, out_dtype: torch.dtype,
    p: orig.OriginalParams, params_texts: dict[str, str], tmp_checkpoint: Path, tmp_hf: Path,
) -> dict[str, Any]:
    """Merge, write both folders' contents into the temporary folders, check logits; return the record."""
    import torch
    from peft import PeftModel

    from medmax_pipeline.models import chameleon
    from medmax_pipeline.models import chameleon_original as orig

    # Merge in fp32 (LoRA deltas are small against bf16 steps), then store in the base's dtype.
    base = chameleon.load_base_model(base_model, dtype=torch.float32, device="cpu", tokenizer=tokenizer)
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload().eval().to(out_dtype)
    merged.save_pretrained(str(tmp_hf))
    chameleon.copy_tokenizer_files(base_model, tmp_hf)
    state = original_state_from_hf(merged.state_dict(), p, source=f"{base_model} + {adapter}")
    del merged, base
    model_dir = tmp_checkpoint / orig.MODEL_SUBDIR
    model_dir.mkdir(parents=True)
    torch.save(state, model_dir / orig.CONSOLIDATED_FILE)
    del state
    for name, text in params_texts.items():
        (model_dir / name).write_text(text)
    if tokenizer_dir is not None:
        shutil.copytree(tokenizer_dir, tmp_checkpoint / "tokenizer")

    ids = orig.check_prompt_ids(p.vocab_size)
    written = torch.load(model_dir / orig.CONSOLIDATED_FILE, map_location="cpu", weights_only=True, mmap=True)
    tensors = orig.OriginalTensors(written, p, str(model_dir / orig.CONSOLIDATED_FILE), mapped=True)
    expected = orig.reference_logits(tensors, p, ids, release=tensors.release)
    worst = orig.compare_logits(expected, chameleon.streamed_logits(tmp_hf, ids), f"{COMMAND}: original vs merged HF")
    del tensors, written
    return {
        "command": COMMAND,
        "base_model": str(base_model),
        "adapter": str(adapter),
        "dtype": str(out_dtype).removeprefix("torch."),
        "params": orig.params_documents(p)[0]["model"],
        "logits_check": {"prompt_ids": ids, "max_abs_diff": worst, "precision": "fp32"},
    }


@dataclass(frozen=True)
class ExportConfig:
    """export's settings, the one source of its command line and of the export rule's options (the
    config.yaml `export:` keys; tests/test_stage_settings.py checks the schema against it)."""

    dtype: str = setting("auto", help="weights dtype (auto: the base model's)", key="dtype", identity=True, choices=("auto", *DTYPES))


def export_config_from_args(args: argparse.Namespace) -> ExportConfig:
    return checked_settings(ExportConfig, values_from_args(ExportConfig, args), ExportError)


def workflow_arguments(section: Mapping[str, Any]) -> list[str]:
    """The export options for the config.yaml `export:` SECTION (the export rule passes these)."""
    return workflow_arguments_for(ExportConfig, section)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-model", type=Path, required=True, help="HF Chameleon folder the adapter was trained on")
    parser.add_argument("--adapter", type=Path, required=True, help="PEFT adapter folder (train stage: OUTPUT/adapter)")
    parser.add_argument("--checkpoint", type=Path, help="source checkpoint folder whose tokenizer/ and params.json go along")
    parser.add_argument("--output-checkpoint", type=Path, required=True, help="folder to create in the original layout")
    parser.add_argument("--output-hf", type=Path, required=True, help="merged HF folder to create")
    add_setting_arguments(parser, ExportConfig)


def run(args: argparse.Namespace) -> int:
    settings = export_config_from_args(args)
    record = export_model(args.base_model, args.adapter, args.checkpoint, args.output_checkpoint, args.output_hf, settings.dtype)
    print(json.dumps({k: record[k] for k in ("dtype", "outputs", "logits_check")}, sort_keys=True))
    return 0
