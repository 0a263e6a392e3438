"""One source for every training setting (issue 21 item 1): TrainConfig's Settings give the command
line, the checks, the run id's fields and the rule's options, and the config schema agrees with them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from medmax_pipeline.core.settings import keys_not_settings, schema_mismatches, unreachable_settings
from medmax_pipeline.stages.train.checkpoints import RUN_CONFIG_FIELDS
from medmax_pipeline.stages.train.config import (
    IDENTITY_FIELDS,
    SETTINGS,
    TrainConfig,
    TrainInputError,
    add_arguments,
    config_from_args,
    workflow_arguments,
)

REPO = Path(__file__).resolve().parent.parent
SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())
TRAIN_SCHEMA = SCHEMA["properties"]["train"]["properties"]
# Keys of `train:` that are resources or launch settings of the rule, not TrainConfig fields.
RULE_ONLY_KEYS = {"gpus", "nodes", "mem_mb", "runtime_min"}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p


def test_every_schema_key_is_a_setting_or_a_rule_resource() -> None:
    assert keys_not_settings(TrainConfig, TRAIN_SCHEMA) <= RULE_ONLY_KEYS
    assert unreachable_settings(TrainConfig, TRAIN_SCHEMA) == set()  # every setting with a key is reachable from config.yaml


def test_schema_type_bounds_and_choices_equal_the_settings() -> None:
    # Defaults: the schema's are the workflow's (save_every 500, log_interval 60), the dataclass's
    # are those of a run by hand; the config files set both anyway.
    assert schema_mismatches(TrainConfig, TRAIN_SCHEMA, check_defaults=False) == []


def test_the_rules_options_round_trip_to_the_config_values() -> None:
    """Every config value (other than the schema default) reaches the TrainConfig the rule builds."""
    section = {
        "lora_r": 8, "lora_alpha": 32, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"], "learning_rate": 2e-4,
        "weight_decay": 0.01, "scheduler": "constant_with_warmup", "warmup_ratio": 0.2, "epochs": 2, "batch_size": 3,
        "grad_accum": 4, "max_length": 512, "max_grad_norm": 0.5, "precision": "fp32", "save_every": 7, "keep_checkpoints": 0,
        "eval_every": 5, "seed": 11, "merge": True, "max_steps": 9, "gradient_checkpointing": True, "group_size": 8,
        "loss_mask": "alternating", "loss_normalization": "token_mean", "max_masked_fraction": 0.2,
        "max_dropped_fraction": 0.3, "log_interval": 5, "gpus": 4, "deepspeed": "workflow/deepspeed/zero2.json",
    }
    assert {s.key for s in SETTINGS.values() if s.key} <= set(section)
    options = workflow_arguments(section)
    args = parser().parse_args(["--dataset", "d", "--base-model", "b", "--output", "o", *options])
    cfg = config_from_args(args)
    for name, s in SETTINGS.items():
        if s.key is None or s.key == "deepspeed":
            continue
        value = getattr(cfg, name)
        expected = tuple(section[s.key]) if isinstance(value, tuple) else section[s.key]
        assert value == expected, name
    assert "--gpus" not in options and "--deepspeed" not in options  # a resource, and an input of the rule


def test_the_command_line_defaults_are_the_dataclass_defaults() -> None:
    cfg = config_from_args(parser().parse_args(["--dataset", "d", "--base-model", "b", "--output", "o"]))
    assert cfg == TrainConfig(dataset=Path("d"), base_model=Path("b"), output=Path("o"))


def test_the_run_id_fields_are_the_identity_settings() -> None:
    assert RUN_CONFIG_FIELDS == IDENTITY_FIELDS
    assert {"lr", "lora_r", "seed", "loss_mask"} <= set(IDENTITY_FIELDS)
    assert not {"save_every", "keep_checkpoints", "log_interval", "precision", "progress", "device"} & set(IDENTITY_FIELDS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": 0.0}, "--lr must be in (0, 1], got 0.0"),
        ({"lr": 2.0}, "--lr must be in (0, 1], got 2.0"),
        ({"lora_dropout": 1.0}, "--lora-dropout must be in [0, 1), got 1.0"),
        ({"scheduler": "step"}, "--scheduler must be one of cosine, linear, constant, constant_with_warmup"),
        ({"epochs": 0}, "--epochs must be >= 1, got 0"),
        ({"max_grad_norm": 0.0}, "--max-grad-norm must be > 0, got 0.0"),
        ({"log_interval": float("nan")}, "--log-interval must be a finite number"),
        ({"target_modules": ()}, "--target-modules is empty"),
    ],
)
def test_checks_come_from_the_settings(change: dict, message: str) -> None:
    cfg = TrainConfig(dataset=Path("d"), base_model=Path("b"), output=Path("o"), **change)
    with pytest.raises(TrainInputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        cfg.validate()
