"""The two engines a recipe step runs on, behind one small interface.

* `TorchEngine`: plain torch in one process (CPU or one GPU); the recipe's AdamW and schedule
  are stepped by hand after `clip_grad_norm_`.
* `DeepSpeedEngine`: the same model, AdamW and schedule handed to a DeepSpeed ZeRO-2 engine
  (workflow/deepspeed/zero2.json, "auto" values filled from the command line), which reduces
  gradients over ranks, clips (gradient_clipping) and steps; one process or torchrun ranks.

`plan_engine` picks one before any input is read (DeepSpeed's process group must exist before
the model is built); `EnginePlan.build` wraps the LoRA model once it is. The recipe only ever
calls the `Engine` methods, so its loop has no engine branches.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol

import torch

from .config import TrainConfig, TrainInputError
from .deepspeed_config import resolve_deepspeed_config
from .distributed import Dist, init_deepspeed


class Engine(Protocol):
    """What the recipe needs from an engine; `model` is the PeftModel being trained."""

    name: str  # recorded in the run config: "torch" or "deepspeed"
    model: torch.nn.Module

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits of a collated batch (input_ids, attention_mask) on the engine's device."""

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        """Accumulate gradients; the last micro-batch of an optimizer step reduces them over ranks."""

    def step(self) -> float:
        """Clip, step AdamW and the schedule, clear gradients; the gradient norm before clipping."""

    def lr(self) -> float:
        """The learning rate the next step uses."""

    def save_checkpoint(self, folder: Path) -> None:
        """Optimizer and schedule state into folder (every rank calls it)."""

    def load_checkpoint(self, folder: Path) -> None:
        """Adapter weights, optimizer and schedule state back from a folder written by a checkpoint."""

    def copy_master_weights_to_model(self) -> None:
        """Make the model's trainable tensors the fp32 master weights before the adapter is saved."""


def adamw_with_schedule(model: torch.nn.Module, cfg: TrainConfig, total_steps: int) -> tuple[list[torch.nn.Parameter], Any, Any]:
    """The recipe's optimizer and schedule over the trainable (LoRA) parameters, the same for both engines."""
    import transformers

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), eps=1e-8)
    warmup_steps = math.ceil(cfg.warmup_ratio * total_steps)
    scheduler = transformers.get_scheduler(cfg.scheduler, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    return trainable, optimizer, scheduler


def _forward_logits(module: Any, batch: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    out = module(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
    return out.logits


class TorchEngine:
    """Plain torch, one process: its checkpoint state is optimizer.pt and scheduler.pt."""

    name = "torch"

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.max_grad_norm = cfg.max_grad_norm
        self.trainable, self.optimizer, self.scheduler = adamw_with_schedule(model, cfg, total_steps)

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return _forward_logits(self.model, batch, self.device)

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        loss.backward()  # one process: nothing to reduce at the last micro-batch

    def step(self) -> float:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable, self.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_checkpoint(self, folder: Path) -> None:
        torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")

    def load_checkpoint(self, folder: Path) -> None:
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        adapter = load_file(str(folder / "adapter" / "adapter_model.safetensors"), device=str(self.device))
        set_peft_model_state_dict(self.model, adapter)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location=self.device, weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))

    def copy_master_weights_to_model(self) -> None:
        pass  # the model's own fp32 adapter tensors are what AdamW updated


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2 over the process group init_deepspeed started; its checkpoint state is
    DeepSpeed's own folder `engine/` (adapter weights, partitioned optimizer, schedule)."""

    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device, config: dict[str, Any]) -> None:
        import deepspeed

        self.model = model
        self.device = device
        self.trainable, optimizer, scheduler = adamw_with_schedule(model, cfg, total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
        )

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return _forward_logits(self.engine, batch, self.device)

    def backward(self, loss: torch.Tensor, *, last_micro_batch: bool) -> None:
        # We count micro-batches ourselves (a last, shorter accumulation is still a step), and
        # the loss is already normalised over the whole step: no scaling by DeepSpeed.
        self.engine.set_gradient_accumulation_boundary(last_micro_batch)
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        self.engine.step()  # clips (gradient_clipping), steps AdamW and the scheduler
        return float(self.engine.get_global_grad_norm() or 0.0)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_checkpoint(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag="engine", exclude_frozen_parameters=True)

    def load_checkpoint(self, folder: Path) -> None:
        with deepspeed_loads_weights_only():
            self.engine.load_checkpoint(str(folder), tag="engine", load_module_strict=False)

    def copy_master_weights_to_model(self) -> None:
        from deepspeed.utils import safe_get_full_fp32_param

        # Save the fp32 master weights, not the bf16 copies the engine computes with.
        for p in self.trainable:
            p.data = safe_get_full_fp32_param(p).to(p.device)


@contextmanager
def deepspeed_loads_weights_only() -> Iterator[None]:
    """DeepSpeed loads its checkpoint pickles with torch.load(weights_only=False); inside this
    block torch turns every load into weights_only=True (TORCH_FORCE_WEIGHTS_ONLY_LOAD), with only
    the plain data classes DeepSpeed's ZeRO files hold allowed, so a tampered file is refused
    (pickle.UnpicklingError) instead of run."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


@dataclass(frozen=True)
class EnginePlan:
    """The engine a run will use, chosen before the model exists."""

    name: str
    deepspeed_config: dict[str, Any] | None = None

    def build(self, model: torch.nn.Module, cfg: TrainConfig, total_steps: int, device: torch.device) -> Engine:
        if self.deepspeed_config is None:
            return TorchEngine(model, cfg, total_steps, device)
        return DeepSpeedEngine(model, cfg, total_steps, device, self.deepspeed_config)


def plan_engine(cfg: TrainConfig, dist: Dist, device: torch.device, precision: str) -> EnginePlan:
    """DeepSpeed when --deepspeed is given (its config resolved, its process group started), else plain torch."""
    if cfg.deepspeed is None:
        if dist.world_size > 1:
            raise TrainInputError(f"{dist.world_size} processes need --deepspeed (workflow/deepspeed/zero2.json)")
        return EnginePlan(TorchEngine.name)
    config = resolve_deepspeed_config(
        cfg.deepspeed, micro_batch_size=cfg.batch_size, grad_accum=cfg.grad_accum,
        world_size=dist.world_size, bf16=precision == "bf16", max_grad_norm=cfg.max_grad_norm,
    )
    init_deepspeed(device)
    return EnginePlan(DeepSpeedEngine.name, config)
