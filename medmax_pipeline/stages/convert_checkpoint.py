"""`medmax convert-checkpoint`: a published checkpoint folder (original Chameleon layout) -> HF folder.

In:  <ckpt>/models/7b/consolidated.pth + params.json (+ consolidate_params.json),
     <ckpt>/tokenizer/text_tokenizer_modified.json (or text_tokenizer.json), vqgan.yaml, vqgan.ckpt.
Out: an HF ChameleonForConditionalGeneration folder: config.json (vocabulary_map from the
     tokenizer, vq_config from vqgan.yaml), generation_config.json, safetensors shards,
     tokenizer.json, and medmax_conversion.json recording what was converted and checked.

The VQ-VAE weights of the HF folder are the checkpoint's own VQGAN (its encoder half and the
quant convs, as HF's ChameleonVQVAE holds them), not new random ones.

Memory: both weight files are opened with torch.load(weights_only=True, mmap=True) and every
output tensor is made from its source, written and dropped before the next, so the process holds
about one copy of the weights (the mapped file) plus one tensor.

Refuses, with the file and tensor named, when: a tensor of consolidated.pth is not used or one is
missing, a shape disagrees with params.json, the q/k normalization is absent, rope.freqs
disagrees with rope_theta, the tokenizer breaks the Chameleon id layout, the VQGAN does not fit
HF's VQ-VAE, or the written HF model's logits on a short prompt differ from the original
model's (both in fp32: models.chameleon_original.reference_logits against
models.chameleon.streamed_logits).

Progress goes to stderr: a line per phase, and while the tensors are written a progress line
(tensors done, MB/s, ETA) every `progress_interval_s` seconds, as generate reports rows.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import yaml

from medmax_pipeline.core.constants import VQGAN_CKPT, VQGAN_YAML
from medmax_pipeline.core.output_folder import finish_output_folder, start_output_folder
from medmax_pipeline.core.progress import PROGRESS_INTERVAL_S, Progress
from medmax_pipeline.core.settings import add_setting_arguments, checked_settings, setting, values_from_args, workflow_arguments_for
from medmax_pipeline.core.text_tokenizer import MODIFIED_TOKENIZER_FILE, TOKENIZER_FILE, vocabulary_map

if TYPE_CHECKING:  # torch and the models are imported where they are used: the workflow reads ConvertConfig at planning
    import torch

MARKER = "medmax_conversion.json"
COMMAND = "medmax convert-checkpoint"
VQ_PREFIX = "model.vqmodel."
VQ_SKIPPED_PREFIXES = ("decoder.", "loss.")  # HF's ChameleonVQVAE has no decoder; the loss is training-only


class ConversionError(ValueError):
    """The checkpoint cannot be converted faithfully (the message names the file, tensor and reason)."""


def tokenizer_vocabulary(tokenizer_dir: Path) -> tuple[dict[str, int], Path]:
    """The vocabulary_map for config.json and the tokenizer file it came from.

    text_tokenizer_modified.json when present (what MedMax uses); else text_tokenizer.json with
    <reserved08707> read as <image>, as HF's own conversion did.
    """
    modified, plain = tokenizer_dir / MODIFIED_TOKENIZER_FILE, tokenizer_dir / TOKENIZER_FILE
    if modified.is_file():
        return vocabulary_map(modified), modified
    if plain.is_file():
        vocab = vocabulary_map(plain)
        renamed = {("<image>" if name == "<reserved08707>" else name): i for name, i in vocab.items()}
        return renamed, plain
    raise ConversionError(f"{tokenizer_dir}: neither {MODIFIED_TOKENIZER_FILE} nor {TOKENIZER_FILE}")


def load_vq_source(tokenizer_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(HF vq_config, the VQGAN tensors HF keeps, under their taming names) from vqgan.yaml + vqgan.ckpt."""
    from medmax_pipeline.models.vqgan import VQGANLoadError, check_vqgan_params, hf_vq_config

    yaml_path, ckpt_path = tokenizer_dir / VQGAN_YAML, tokenizer_dir / VQGAN_CKPT
    for path in (yaml_path, ckpt_path):
        if not path.is_file():
            raise ConversionError(f"{path} does not exist (the checkpoint's VQGAN becomes the HF model's VQ-VAE)")
    try:
        params = check_vqgan_params(yaml.safe_load(yaml_path.read_text())["model"]["params"], str(yaml_path))
    except (yaml.YAMLError, KeyError, TypeError) as exc:
        raise ConversionError(f"{yaml_path}: not a taming vqgan config with model.params ({exc})") from None
    except VQGANLoadError as exc:
        raise ConversionError(str(exc)) from None
    document, _ = _load_weights(ckpt_path)
    if not isinstance(document, dict) or not isinstance(document.get("state_dict"), dict):
        raise ConversionError(f"{ckpt_path}: expected a dict with the weights under 'state_dict'")
    state = {k: v for k, v in document["state_dict"].items() if not k.startswith(VQ_SKIPPED_PREFIXES)}
    return hf_vq_config(params), state


def _load_weights(path: Path) -> tuple[Any, bool]:
    """(torch.load with weights_only=True, whether it is memory-mapped: when the file allows it, zip format)."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
    except RuntimeError as exc:
        if "mmap" not in str(exc):  # old non-zip files cannot be mapped: read them whole
            raise ConversionError(f"{path}: cannot load with torch.load(weights_only=True): {exc}") from None
    except Exception as exc:  # torch raises several types for damaged or unsafe pickles
        raise ConversionError(f"{path}: cannot load with torch.load(weights_only=True): {exc}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as exc:
        raise ConversionError(f"{path}: cannot load with torch.load(weights_only=True): {exc}") from None


def _expected_hf_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every parameter of ChameleonForConditionalGeneration for `config`, built on the meta device (no memory)."""
    import torch
    from transformers import ChameleonForConditionalGeneration

    with torch.device("meta"):
        model = ChameleonForConditionalGeneration(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _check_names_and_shapes(planned: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source: str) -> None:
    missing = sorted(expected.keys() - planned.keys())
    extra = sorted(planned.keys() - expected.keys())
    wrong = [f"{n} {planned[n]} != {expected[n]}" for n in sorted(planned.keys() & expected.keys()) if planned[n] != expected[n]]
    problems = []
    if missing:
        problems.append(f"HF model tensors with no source: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''} ({len(missing)})")
    if extra:
        problems.append(f"source tensors HF has no place for: {', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''} ({len(extra)})")
    if wrong:
        problems.append(f"shapes: {'; '.join(wrong[:5])}")
    if problems:
        raise ConversionError(f"{source}: {' | '.join(problems)}")


def _say(stream: Any, line: str) -> None:
    print(f"{COMMAND.removeprefix('medmax ')}: {line}", file=stream, flush=True)


def convert_checkpoint(checkpoint: str | Path, output: str | Path, max_shard_bytes: int = 2 * 1024**3,
                       progress_stream: Any = None, progress_interval_s: float = PROGRESS_INTERVAL_S) -> dict[str, Any]:
    """Convert an original checkpoint folder into the HF folder `output`; return the record it writes.

    `output` must be absent, empty or an earlier conversion's output; it appears only when
    every check passed. Progress lines go to `progress_stream` (default stderr).
    """
    import torch
    from transformers import ChameleonConfig, GenerationConfig

    from medmax_pipeline.models import chameleon
    from medmax_pipeline.models import chameleon_original as orig
    from medmax_pipeline.models import safetensors_stream

    stream = progress_stream if progress_stream is not None else sys.stderr
    checkpoint, output = Path(checkpoint), Path(output)
    model_dir, tokenizer_dir = checkpoint / orig.MODEL_SUBDIR, checkpoint / "tokenizer"
    consolidated = model_dir / orig.CONSOLIDATED_FILE
    if not consolidated.is_file():
        shards = sorted(p.name for p in model_dir.glob("consolidated.*.pth"))
        hint = f" (found {', '.join(shards)}: sharded checkpoints are not supported)" if shards else ""
        raise ConversionError(f"{consolidated} does not exist{hint}; expected the original layout <ckpt>/models/7b/consolidated.pth")
    p = orig.read_params(model_dir)
    vocab, tokenizer_source = tokenizer_vocabulary(tokenizer_dir)
    try:
        chameleon.check_model_vocabulary(vocab, p.vocab_size, source=str(tokenizer_source))
    except chameleon.ModelLayoutError as exc:
        raise ConversionError(f"{exc} (params.json vocab_size {p.vocab_size})") from None
    vq_config, vq_state = load_vq_source(tokenizer_dir)
    config = ChameleonConfig(**orig.hf_config_kwargs(p, vocab, vq_config))
    config.architectures = ["ChameleonForConditionalGeneration"]

    _say(stream, f"reading {consolidated}")
    state, mapped = _load_weights(consolidated)
    if not isinstance(state, dict):
        raise ConversionError(f"{consolidated}: expected a state dict, found {type(state).__name__}")
    tensors = orig.OriginalTensors(state, p, str(consolidated), mapped=mapped)
    source_of = {rule.hf: rule.original for rule in orig.tensor_rules(p)}
    plan: list[tuple[str, torch.dtype, tuple[int, ...], Any]] = []
    for rule in orig.tensor_rules(p):
        source = tensors(rule.original)
        if tuple(source.shape) != rule.original_shape:
            raise ConversionError(f"{consolidated}: {rule.original} has shape {tuple(source.shape)}, params.json implies {rule.original_shape}")
        plan.append((rule.hf, source.dtype, rule.hf_shape, lambda rule=rule: orig.to_hf(rule, tensors(rule.original), p)))
    unused = tensors.unused()
    if unused:
        raise ConversionError(f"{consolidated}: {len(unused)} tensor(s) the conversion does not use, first {unused[:5]}; refusing to drop weights")
    orig.check_rope_freqs(state, p, str(consolidated))
    for name, tensor in vq_state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ConversionError(f"{tokenizer_dir / VQGAN_CKPT}: {name} is not a tensor")
        plan.append((VQ_PREFIX + name, tensor.dtype, tuple(tensor.shape), lambda tensor=tensor: tensor))
    _check_names_and_shapes({name: shape for name, _, shape, _ in plan}, _expected_hf_shapes(config), str(checkpoint))
    text_dtype = state["tok_embeddings.weight"].dtype if "tok_embeddings.weight" in state else torch.float32
    config.dtype = text_dtype

    tensor_bytes = {name: safetensors_stream.tensor_bytes(shape, dtype) for name, dtype, shape, _ in plan}
    _say(stream, f"writing {len(plan)} tensors ({sum(tensor_bytes.values()) / 1e9:.2f} GB) to {output}")
    progress = Progress(len(plan), interval_s=progress_interval_s, stream=stream, label=COMMAND.removeprefix("medmax "),
                        items="tensors", unit="MB")
    tmp = start_output_folder(output, MARKER, COMMAND)
    try:
        config.save_pretrained(str(tmp))
        GenerationConfig.from_model_config(config).save_pretrained(str(tmp))
        def after_write(hf_name: str) -> None:  # the source's pages go once written: the file is never held whole
            if hf_name in source_of:
                tensors.release(tensors(source_of[hf_name]))
            progress.update(1, tensor_bytes[hf_name] / 1e6)

        try:
            files = safetensors_stream.write_safetensors_streaming(tmp, plan, max_shard_bytes=max_shard_bytes, after_write=after_write)
        finally:
            progress.close()
        shutil.copyfile(tokenizer_source, tmp / "tokenizer.json")
        _say(stream, "checking the written model's logits against the original model's (fp32)")
        ids = orig.check_prompt_ids(p.vocab_size)
        expected = orig.reference_logits(tensors, p, ids, release=tensors.release)
        actual = chameleon.streamed_logits(tmp, ids)
        worst = orig.compare_logits(expected, actual, f"{COMMAND} {checkpoint} -> {output}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # ours: made by start_output_folder above
        raise
    record = {
        "command": COMMAND,
        "source": str(checkpoint),
        "params": orig.params_documents(p)[0]["model"],
        "tokenizer": tokenizer_source.name,
        "dtype": str(text_dtype).removeprefix("torch."),
        "tensors": len(plan),
        "weight_bytes": sum(safetensors_stream.tensor_bytes(shape, dtype) for _, dtype, shape, _ in plan),
        "files": files,
        "logits_check": {"prompt_ids": ids, "max_abs_diff": worst, "precision": "fp32"},
    }
    finish_output_folder(tmp, output, MARKER, record)
    return record


@dataclass(frozen=True)
class ConvertConfig:
    """convert-checkpoint's settings, the one source of its command line and of the convert_checkpoint
    rule's options (the config.yaml `convert:` keys; tests/test_stage_settings.py checks the schema)."""

    # How the weights are split into files, not what they are (the tensors are the same).
    max_shard_gb: float = setting(2.0, help="safetensors shard size limit (GB)", key="max_shard_gb", minimum=0, exclusive_minimum=True)


def convert_config_from_args(args: argparse.Namespace) -> ConvertConfig:
    return checked_settings(ConvertConfig, values_from_args(ConvertConfig, args), ConversionError)


def workflow_arguments(section: Mapping[str, Any]) -> list[str]:
    """The convert-checkpoint options for the config.yaml `convert:` SECTION (the rule passes these)."""
    return workflow_arguments_for(ConvertConfig, section)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="original layout: models/7b/consolidated.pth + params.json, tokenizer/")
    parser.add_argument("--output", type=Path, required=True, help="HF folder to create (absent, empty, or an earlier conversion)")
    add_setting_arguments(parser, ConvertConfig)


def run(args: argparse.Namespace) -> int:
    settings = convert_config_from_args(args)
    record = convert_checkpoint(args.checkpoint, args.output, max_shard_bytes=int(settings.max_shard_gb * 1024**3))
    print(json.dumps({k: record[k] for k in ("tensors", "weight_bytes", "files", "logits_check")}, sort_keys=True))
    return 0
