"""The DeepSpeed JSON (workflow/deepspeed/zero2.json): its "auto" values filled from the command
line, and everything the recipe does not support refused with one clear message."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

from .config import TrainInputError


def resolve_deepspeed_config(
    config: str | Path | Mapping[str, Any],
    *,
    micro_batch_size: int,
    grad_accum: int,
    world_size: int,
    bf16: bool,
    max_grad_norm: float,
) -> dict[str, Any]:
    """Fill the "auto" values of a DeepSpeed JSON from the command line and validate it.

    Refused with TrainInputError: an unreadable file, an explicit value contradicting the command
    line, ZeRO stage 3 (adapter saving here assumes unpartitioned parameters), an "optimizer" or
    "scheduler" section (the recipe builds AdamW and the schedule itself, so both are the same
    with and without DeepSpeed), fp16, and anything DeepSpeed's own config parser rejects.
    """
    source, resolved = _read_config(config)
    wanted = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
    }
    _fill_from_command_line(resolved, source, wanted, bf16)
    _refuse_what_the_recipe_does_itself(resolved, source)
    _check_with_deepspeed(resolved, source)
    return resolved


def _read_config(config: str | Path | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name for messages, a deep copy of the config)."""
    source = "DeepSpeed config"
    if not isinstance(config, Mapping):
        source = str(config)
        try:
            config = json.loads(Path(config).read_text())
        except FileNotFoundError:
            raise TrainInputError(f"DeepSpeed config {source} does not exist") from None
        except json.JSONDecodeError as exc:
            raise TrainInputError(f"DeepSpeed config {source} is not valid JSON: {exc}") from exc
    return source, json.loads(json.dumps(config))


def _fill_from_command_line(resolved: dict[str, Any], source: str, wanted: Mapping[str, Any], bf16: bool) -> None:
    for key, value in wanted.items():
        current = resolved.get(key, "auto")
        if current == "auto":
            resolved[key] = value
        elif current != value:
            raise TrainInputError(f"{source}: {key} is {current!r} but the command line implies {value!r}")
    bf16_section = resolved.setdefault("bf16", {})
    if bf16_section.get("enabled", "auto") == "auto":
        bf16_section["enabled"] = bf16
    elif bool(bf16_section["enabled"]) != bf16:
        raise TrainInputError(f"{source}: bf16.enabled is {bf16_section['enabled']} but --precision gives bf16={bf16}")
    fp16 = resolved.get("fp16", {})
    if fp16.get("enabled") not in (None, False, "auto"):
        raise TrainInputError(f"{source}: fp16 is not part of the recipe (bf16 on GPU); remove the fp16 section")
    if "fp16" in resolved:
        resolved["fp16"]["enabled"] = False


def _refuse_what_the_recipe_does_itself(resolved: Mapping[str, Any], source: str) -> None:
    for section in ("optimizer", "scheduler"):
        if section in resolved:
            raise TrainInputError(
                f"{source}: remove the {section!r} section; medmax train builds AdamW and the {section} itself"
            )
    zero = resolved.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2):
        raise TrainInputError(f"{source}: zero_optimization.stage {stage!r} is not supported (use 2, as MedMax did)")
    leftover = [k for k, v in _walk(resolved) if v == "auto"]
    if leftover:
        raise TrainInputError(f"{source}: no value to fill in for 'auto' at {', '.join(leftover)}")


def _check_with_deepspeed(resolved: Mapping[str, Any], source: str) -> None:
    try:
        from deepspeed.runtime.config import DeepSpeedConfig

        # train_batch_size is left out for the check: DeepSpeed derives it from the world size
        # of an initialised process group, which may not exist yet.
        DeepSpeedConfig({k: v for k, v in resolved.items() if k != "train_batch_size"})
    except ImportError:  # pragma: no cover - deepspeed is a declared dependency
        raise TrainInputError("--deepspeed needs the deepspeed package") from None
    except Exception as exc:
        raise TrainInputError(f"{source}: DeepSpeed rejects it: {exc}") from exc


def _walk(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _walk(v, f"{prefix}{k}.")
    else:
        yield prefix.rstrip("."), obj
