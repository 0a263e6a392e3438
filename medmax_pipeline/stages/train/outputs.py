"""What a finished run leaves in OUTPUT: adapter/ (with its provenance), train_metrics.parquet,
and on request merged/ (the base model with the adapter folded in)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
import torch

from medmax_pipeline.core.artifacts import PROVENANCE_FILE, provenance_record, read_meta, write_artifact
from medmax_pipeline.core.output_folder import check_output_folder, finish_output_folder, start_output_folder
from medmax_pipeline.core.termination import temporary_path
from medmax_pipeline.models import chameleon

from .config import TrainConfig

COMMAND = "medmax train"

METRICS_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.float64()),
        ("loss", pa.float64()),
        ("lr", pa.float64()),
        ("grad_norm", pa.float64()),
        ("label_tokens", pa.int64()),
        ("tokens", pa.int64()),
        ("eval_loss", pa.float64()),
        # No wall-clock column (throughput is in the log's progress lines): identical runs give
        # identical train_metrics, fingerprint included.
    ]
)


def save_adapter_weights(model: torch.nn.Module, folder: Path) -> None:
    """The PEFT adapter (adapter_model.safetensors, adapter_config.json) with target_modules
    sorted: peft keeps them as a set, whose order follows PYTHONHASHSEED, so identical runs would
    write different bytes."""
    model.save_pretrained(str(folder))
    config_path = Path(folder) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))  # peft's own format


def check_output_folders(output: Path, merge: bool) -> None:
    """Refuse, before any training, an OUTPUT/adapter (or OUTPUT/merged with `merge`) that this
    command did not write (it has no provenance record): the save at the end replaces them."""
    check_output_folder(output / "adapter", PROVENANCE_FILE, COMMAND)
    if merge:
        check_output_folder(output / "merged", PROVENANCE_FILE, COMMAND)


def save_adapter(model: torch.nn.Module, output: Path, cfg: TrainConfig, run_config: Mapping[str, Any], run_id: str) -> Path:
    """OUTPUT/adapter: the PEFT adapter and its provenance record, written whole or not at all
    (core/output_folder); the temporary folder is removed on SIGTERM or any error while written."""
    final = output / "adapter"
    with temporary_path(start_output_folder(final, PROVENANCE_FILE, COMMAND)) as tmp:
        save_adapter_weights(model, tmp)
        dataset_meta = read_meta(cfg.dataset)
        # The adapter was fitted to the dataset's rows: it carries the dataset's credential status.
        provenance = {
            "dataset": str(cfg.dataset), "dataset_fingerprint": dataset_meta.fingerprint,
            "credential": dataset_meta.credential, "base_model": str(cfg.base_model), "run_id": run_id, "run_config": run_config,
        }
        finish_output_folder(tmp, final, PROVENANCE_FILE, provenance)
    return final


def write_metrics(
    metrics: list[dict[str, Any]], path: Path, cfg: TrainConfig, run_config: Mapping[str, Any], rows: Mapping[str, Any]
) -> Path:
    """The `train_metrics` artifact: one row per optimizer step; its params are the run config and
    `rows`, what happened to the rows read (trained, cut, dropped and why), so no dropped row is
    only in a log."""
    table = pa.Table.from_pylist(metrics, schema=METRICS_SCHEMA)
    inputs: list[Any] = [cfg.dataset] + ([cfg.eval_dataset] if cfg.eval_dataset else [])
    inputs += [cfg.separator_stats] if cfg.separator_stats else []
    # The base model is a folder input, by its folder identity (names, sizes, times, small config
    # files' contents: core/folder_identity), as `medmax inspect` recomputes it; no 14 GB hash.
    inputs.append(cfg.base_model)
    write_artifact(table, path, artifact="train_metrics", inputs=inputs, params={**run_config, "rows": dict(rows)})
    return path


def merge_adapter(
    base_model: str | Path, adapter_dir: str | Path, out_dir: str | Path, dtype: torch.dtype = torch.float32,
    tokenizer: str | Path | None = None,
) -> Path:
    """Fold the LoRA adapter into the base weights and save a plain HF Chameleon folder."""
    from peft import PeftModel

    base = chameleon.load_base_model(base_model, dtype=dtype, device="cpu", tokenizer=tokenizer)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out_dir = Path(out_dir)
    # The merged model is the adapter's: credentialed when the adapter is (its provenance record).
    record = provenance_record("merged_model", inputs=[adapter_dir, base_model], params={"dtype": str(dtype)})
    with temporary_path(start_output_folder(out_dir, PROVENANCE_FILE, COMMAND)) as tmp:
        merged.save_pretrained(str(tmp))
        chameleon.copy_tokenizer_files(base_model, tmp)
        finish_output_folder(tmp, out_dir, PROVENANCE_FILE, record)
    return out_dir
