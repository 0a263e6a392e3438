"""HF-format Chameleon / Anole models: vocabulary checks, checked loading, image logits.

What lives here because both training (stage 5) and evaluation (stage 6) need it (the demo's
tiny random model is in demo_models.py, the streaming safetensors writer and reader in
models/safetensors_stream.py, output-folder transactions in core/output_folder.py):

* `load_base_model` refuses a folder that is not an HF Chameleon model, or whose
  `vocabulary_map` breaks the Chameleon id layout of MEDMAX-FACTS.md, or disagrees with the
  tokenizer the rest of the pipeline used.
* `allow_image_logits`: HF's `ChameleonForConditionalGeneration.forward` sets the logits of
  every image token (ids 4..8195) to the dtype minimum in EVERY forward pass, training included.
  A label that is an image token then has an infinite loss and the model can never learn to
  emit images, which MedMax trains on purpose. We lift that mask per model instance, and
  `check_image_logits` verifies with a real forward pass that it is lifted, so a change in
  transformers that masks by some other means fails loudly instead of silently.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from medmax_pipeline.core import constants as C
from medmax_pipeline.models.safetensors_stream import read_tensor, weight_files

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "preprocessor_config.json", "processor_config.json", "chat_template.json")


class ModelLayoutError(ValueError):
    """A model folder is not an HF Chameleon model or its vocabulary breaks the Chameleon layout."""


class ImageLogitsMaskedError(RuntimeError):
    """Image-token logits are still masked after allow_image_logits (transformers changed how)."""


# ----------------------------------------------------------------------------------------------
# Vocabulary checks
# ----------------------------------------------------------------------------------------------


def check_model_vocabulary(vocab_map: Mapping[str, int], vocab_size: int, source: str) -> None:
    """Raise ModelLayoutError when `vocab_map` breaks the Chameleon layout or leaves the embedding.

    The layout (image names spell id - 4; 0/1/2, 8196, 8197, 8710 as MEDMAX-FACTS) is checked by
    text_tokenizer.check_vocabulary_map, the same rule the tokenizer stage applies. `<image>`
    (8711) is not required: training data has every placeholder already expanded.
    """
    from medmax_pipeline.core.text_tokenizer import TokenizerLayoutError, check_vocabulary_map

    if not vocab_map:
        raise ModelLayoutError(f"{source}: config.json has no vocabulary_map; it is not a Chameleon/Anole HF model")
    try:
        check_vocabulary_map(dict(vocab_map), require_image_placeholder=False, source=source)
    except TokenizerLayoutError as exc:
        raise ModelLayoutError(str(exc)) from exc
    too_big = {name: i for name, i in vocab_map.items() if not 0 <= int(i) < vocab_size}
    if too_big:
        name, token_id = min(too_big.items(), key=lambda kv: kv[1])
        raise ModelLayoutError(
            f"{source}: vocabulary_map puts {name!r} at id {token_id}, outside the model's vocab_size "
            f"{vocab_size} ({len(too_big)} such token(s))"
        )


def compare_vocabularies(model_map: Mapping[str, int], tokenizer_map: Mapping[str, int], source: str) -> None:
    """Raise ModelLayoutError when a token id names a different token in the model and the tokenizer.

    Compared by id, over the ids both sides have. Id 8711 is exempt: it is <reserved08707> in
    text_tokenizer.json and <image> in text_tokenizer_modified.json, and either may sit beside
    the model.
    """
    model_by_id = {int(i): name for name, i in model_map.items()}
    tok_by_id = {int(i): name for name, i in tokenizer_map.items()}
    diffs = sorted(
        i for i in model_by_id.keys() & tok_by_id.keys() if i != C.IMAGE_PLACEHOLDER_ID and model_by_id[i] != tok_by_id[i]
    )
    if diffs:
        i = diffs[0]
        raise ModelLayoutError(
            f"{source}: the model's vocabulary_map and the tokenizer disagree at {len(diffs)} id(s); first: id {i} is "
            f"{model_by_id[i]!r} in the model but {tok_by_id[i]!r} in the tokenizer"
        )
    missing = sorted(i for i in tok_by_id if i not in model_by_id and i <= C.SEPARATOR_ID)
    if missing:
        raise ModelLayoutError(
            f"{source}: the tokenizer has id(s) {missing[:5]} of the Chameleon layout that the model's vocabulary_map lacks"
        )


def _tokenizer_vocabulary(tokenizer: str | Path | Mapping[str, int]) -> dict[str, int]:
    if isinstance(tokenizer, Mapping):
        return {str(k): int(v) for k, v in tokenizer.items()}
    from medmax_pipeline.core.text_tokenizer import vocabulary_map

    return vocabulary_map(tokenizer)


def read_model_config(folder: str | Path) -> dict[str, Any]:
    """config.json of an HF Chameleon folder, or ModelLayoutError saying what the folder is instead."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLayoutError(f"base model folder {folder} does not exist")
    config_path = folder / "config.json"
    if not config_path.is_file():
        hint = ""
        if (folder / "models" / "7b" / "consolidated.pth").exists():
            hint = (
                " It looks like the original consolidated Anole/MedMax checkpoint; convert it to HF format first "
                "(`medmax convert-checkpoint`, or leave base_model unset in the config and the workflow converts it)."
            )
        raise ModelLayoutError(f"{folder} is not an HF model folder: it has no config.json.{hint}")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLayoutError(f"{config_path} is not valid JSON: {exc}") from exc
    architectures = config.get("architectures") or []
    if config.get("model_type") != "chameleon" or (architectures and "ChameleonForConditionalGeneration" not in architectures):
        raise ModelLayoutError(
            f"{folder} is not an HF ChameleonForConditionalGeneration model: config.json has model_type "
            f"{config.get('model_type')!r} and architectures {architectures}"
        )
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
        raise ModelLayoutError(f"{folder} has a Chameleon config.json but no weight files (*.safetensors)")
    for index_path in sorted(folder.glob("*.index.json")):  # sharded weights, as Anole-7B's HF folder
        try:
            shards = sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as exc:
            raise ModelLayoutError(f"{index_path} is not a weight index (no 'weight_map'): {exc}") from exc
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ModelLayoutError(
                f"{folder}: {len(missing)} of the {len(shards)} weight shards listed in {index_path.name} are missing, "
                f"first {missing[0]} (an incomplete download or copy?)"
            )
    return config


def check_base_model_folder(
    folder: str | Path, tokenizer: str | Path | Mapping[str, int] | None = None
) -> dict[str, Any]:
    """Check the folder's layout and vocabulary without loading weights; return its config.json.

    `tokenizer`: a tokenizer JSON path or a name -> id map to compare against; when None, the
    folder's own tokenizer.json is compared if there is one.
    """
    folder = Path(folder)
    config = read_model_config(folder)
    vocab_size = int(config.get("vocab_size", 0))
    check_model_vocabulary(config.get("vocabulary_map") or {}, vocab_size, source=f"{folder}/config.json")
    if tokenizer is None and (folder / "tokenizer.json").is_file():
        tokenizer = folder / "tokenizer.json"
    if tokenizer is not None:
        compare_vocabularies(config["vocabulary_map"], _tokenizer_vocabulary(tokenizer), source=str(folder))
    return config


# ----------------------------------------------------------------------------------------------
# Building and loading
# ----------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_base_model(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = "cpu",
    tokenizer: str | Path | Mapping[str, int] | None = None,
) -> "torch.nn.Module":
    """Load an HF ChameleonForConditionalGeneration after checking its layout and vocabulary.

    Raises ModelLayoutError (one message) for: a missing folder, a folder without config.json
    (with a hint when it is the consolidated Anole layout), a non-Chameleon config, no weights,
    a vocabulary_map that breaks the Chameleon layout or has ids >= vocab_size, or one that
    disagrees with `tokenizer` (or the folder's tokenizer.json when `tokenizer` is None).
    The returned model has HF's image-logit mask in place; see allow_image_logits.
    """
    from transformers import ChameleonForConditionalGeneration

    check_base_model_folder(folder, tokenizer)
    model = ChameleonForConditionalGeneration.from_pretrained(str(folder), dtype=dtype)
    return model.to(resolve_device(device))


# ----------------------------------------------------------------------------------------------
# Image logits
# ----------------------------------------------------------------------------------------------


class _ImageTokensUnmasked:
    """Stands in for ChameleonModel.vocabulary_mapping with an empty `image_tokens` list.

    HF's head does `logits[:, :, self.model.vocabulary_mapping.image_tokens] = finfo.min`; with
    an empty index list that assignment touches nothing. Every other attribute (bpe2img,
    convert_img2bpe, image_token_id, used to encode pixel values) is the original object's, so
    image encoding through the model keeps working.
    """

    image_tokens: list[int] = []

    def __init__(self, original: Any) -> None:
        self._original = original

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


def _chameleon_cores(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.models.chameleon.modeling_chameleon import ChameleonModel

    cores = [m for m in model.modules() if isinstance(m, ChameleonModel)]
    if not cores:
        raise TypeError(f"{type(model).__name__} contains no transformers ChameleonModel")
    return cores


def set_image_logits(model: torch.nn.Module, allowed: bool) -> torch.nn.Module:
    """Allow (True) or mask (False, HF's default) image-token logits; works through PeftModel.

    Idempotent and reversible, per model instance; other instances are untouched.
    """
    for core in _chameleon_cores(model):
        mapping = core.vocabulary_mapping
        original = mapping._original if isinstance(mapping, _ImageTokensUnmasked) else mapping
        core.vocabulary_mapping = _ImageTokensUnmasked(original) if allowed else original
    return model


def allow_image_logits(model: torch.nn.Module) -> torch.nn.Module:
    """Lift HF's image-token logit mask on `model` (returns it). Call check_image_logits to verify."""
    return set_image_logits(model, True)


def image_logits_allowed(model: torch.nn.Module) -> bool:
    return all(isinstance(c.vocabulary_mapping, _ImageTokensUnmasked) for c in _chameleon_cores(model))


@torch.no_grad()
def check_image_logits(model: torch.nn.Module, expect_allowed: bool = True) -> None:
    """Run a 2-token forward pass and check the image-token logits are (not) at the dtype minimum.

    Raises ImageLogitsMaskedError when allowed logits are masked anyway, which is what happens
    if transformers moves its mask somewhere allow_image_logits does not reach.
    """
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ids = torch.tensor([[C.BOS_ID, C.SEPARATOR_ID]], device=device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1]
    finally:
        model.train(was_training)
    image = logits[C.FIRST_IMAGE_TOKEN_ID : C.LAST_IMAGE_TOKEN_ID + 1]
    masked = image <= torch.finfo(image.dtype).min
    if expect_allowed and bool(masked.any()):
        import transformers

        raise ImageLogitsMaskedError(
            f"{int(masked.sum())} image-token logits are still at the dtype minimum after allow_image_logits "
            f"(transformers {transformers.__version__}); the model could not learn or emit image tokens. "
            "medmax_pipeline/models/chameleon.py must be adapted to how this transformers version masks them."
        )
    if not expect_allowed and not bool(masked.all()):
        raise ImageLogitsMaskedError("image-token logits were expected masked (HF default) but are not")


def load_model_for_generation(
    base_dir: str | Path,
    adapter_dir: str | Path | None,
    allow_image_output: bool,
    device: str | torch.device | None = "auto",
    dtype: torch.dtype | None = None,
    tokenizer: str | Path | Mapping[str, int] | None = None,
) -> "torch.nn.Module":
    """The model the evaluation stage generates with, in eval mode.

    base_dir: HF Chameleon folder (checked as in load_base_model). adapter_dir: a PEFT adapter
    folder (OUTPUT/adapter of the train stage) or None for the base model alone.
    allow_image_output: False keeps HF's mask (text-only answers, as for VQA); True lets the
    model emit image tokens (image generation, interleaved output). Switch later with
    set_image_logits(model, ...) without reloading. dtype None: bf16 on GPU, fp32 on CPU.
    """
    device = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = load_base_model(base_dir, dtype=dtype, device=device, tokenizer=tokenizer)
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / "adapter_config.json").is_file():
            raise ModelLayoutError(f"{adapter_dir} is not a PEFT adapter folder: it has no adapter_config.json")
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
    model.eval()
    set_image_logits(model, allow_image_output)
    check_image_logits(model, expect_allowed=allow_image_output)
    return model


def copy_tokenizer_files(src: str | Path, dst: str | Path, names: Iterable[str] = TOKENIZER_FILES) -> list[str]:
    """Copy the tokenizer/processor files of an HF folder that exist; return their names."""
    copied = []
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


@torch.no_grad()
def streamed_logits(folder: str | Path, ids: Sequence[int]) -> torch.Tensor:
    """(T, vocab) fp32 logits of the HF model in `folder`, its decoder layers loaded one at a time.

    HF's own ChameleonModel runs the layers (its rotary, q/k norm, attention and mask code); each
    module's weights (one projection, one norm) are read in fp32 just before it runs and dropped
    after, and the embedding and head are read a few rows at a time, so a 7B model is checked in
    the memory of about one fp32 matrix.
    Image-token logits are not masked (this is the raw head).
    """
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    from medmax_pipeline.models.chameleon_original import chunked_logits

    folder = Path(folder)
    config = ChameleonConfig.from_pretrained(str(folder))
    with torch.device("meta"):
        model = ChameleonForConditionalGeneration(config)
    core = model.model
    core.rotary_emb = type(core.rotary_emb)(config=config)  # its inverse frequencies are buffers, not weights
    files = weight_files(folder)

    def load(module: torch.nn.Module, prefix: str) -> None:
        state = {name: read_tensor(files, prefix + name).float() for name, _ in module.named_parameters(recurse=False)}
        module.load_state_dict(state, assign=True, strict=True)

    def unload(module: torch.nn.Module, args: Any, output: Any) -> None:
        module.to("meta")  # returns None: a forward hook's return value would replace the layer's output

    handles = []
    for i, layer in enumerate(core.layers):
        for name, module in layer.named_modules():
            if any(True for _ in module.parameters(recurse=False)):  # q_proj, q_norm, input_layernorm, ...
                prefix = f"model.layers.{i}.{name}."
                handles.append(module.register_forward_pre_hook(lambda module, args, prefix=prefix: load(module, prefix)))
                handles.append(module.register_forward_hook(unload))
    try:
        load(core.norm, "model.norm.")
        ids_tensor = torch.as_tensor(list(ids), dtype=torch.long)
        rows = torch.stack([read_tensor(files, "model.embed_tokens.weight", slice(i, i + 1))[0] for i in ids_tensor.tolist()])
        hidden = core(inputs_embeds=rows.float()[None], use_cache=False).last_hidden_state[0]
    finally:
        for handle in handles:
            handle.remove()
    return chunked_logits(hidden, lambda a, b: read_tensor(files, "lm_head.weight", slice(a, b)), config.vocab_size)
