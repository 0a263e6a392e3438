"""One source for every stage setting other than train's and assemble's (issue 21 item 1): each
stage's settings dataclass (core/settings.py Settings) gives its command line and its rule's
options, and the config schema agrees with it; scoring_rules.RULE_SETS is the one list of rule sets."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from medmax_pipeline.core.settings import keys_not_settings, schema_mismatches, settings_of, unreachable_settings
from medmax_pipeline.stages import collect, tokenize_images
from medmax_pipeline.stages.evaluate import generate
from medmax_pipeline.stages.evaluate.scoring_rules import RULE_SETS

REPO = Path(__file__).resolve().parent.parent
SCHEMA = yaml.safe_load((REPO / "workflow/schemas/config.schema.yaml").read_text())["properties"]


def test_the_rule_sets_are_written_once() -> None:
    rules = SCHEMA["evaluate"]["properties"]["rules"]
    assert rules["items"]["enum"] == list(RULE_SETS)
    assert rules["default"] == list(RULE_SETS)
    # evaluate.smk's `rules` wildcard constraint is built from RULE_SETS, not written out.
    smk = (REPO / "workflow/rules/evaluate.smk").read_text()
    assert 'rules="|".join(RULE_SETS)' in smk and re.search(r'rules\s*=\s*"\w', smk) is None


# ----------------------------------------------------------------------------------------------
# Each stage: its settings dataclass against the schema section its rule reads
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    settings: type  # the settings dataclass
    section: str  # its config.yaml section
    # Keys of the section that are no setting of this stage: inputs, rule resources, other rules' settings.
    other_keys: frozenset[str]
    # Schema defaults that differ from the command line's on purpose (the config files set both).
    default_differences: tuple[str, ...]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    required: tuple[str, ...]  # the command line's required options (inputs and outputs)
    config_from_args: Callable[[argparse.Namespace], Any]
    workflow_arguments: Callable[[Any], list[str]]
    cli_only: frozenset[str] = frozenset()  # settings the rule fixes itself (no config key)


STAGES = {
    "generate": Stage(
        generate.GenerateConfig, "evaluate",
        frozenset({"eval_set", "image_root", "clip", "clip_text_tower", "rules", "judge", "bootstrap_samples"}),
        ("batch_size (batch_size): default 4 != 8",),
        generate.add_arguments,
        ("--eval-set", "e", "--image-root", "i", "--ckpt", "c", "--base-model", "b", "--model-name", "m", "--output", "o"),
        generate.generate_config_from_args, generate.workflow_arguments,
    ),
    "tokenize": Stage(
        tokenize_images.TokenizeConfig, "tokenize",
        frozenset({"num_shards", "gpus_per_job", "runtime_min", "mem_mb"}),
        (),
        tokenize_images.add_tokenize_arguments, ("--input", "i", "--output", "o", "--ckpt", "c"),
        tokenize_images.tokenize_config_from_args, tokenize_images.workflow_arguments,
        cli_only=frozenset({"progress"}),
    ),
    "collect": Stage(
        collect.CollectConfig, "images", frozenset({"public_root", "credentialed"}), (),
        collect.add_arguments, ("--rows", "train=t.jsonl", "--output-dir", "o"),
        collect.collect_config_from_args, collect.workflow_arguments,
    ),
}


def stage_schema(stage: Stage) -> dict[str, Any]:
    return SCHEMA[stage.section]["properties"]


def parse(stage: Stage, options: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    stage.add_arguments(parser)
    return parser.parse_args([*stage.required, *options])


@pytest.mark.parametrize("name", STAGES)
def test_every_setting_is_reachable_from_config_yaml(name: str) -> None:
    stage = STAGES[name]
    assert unreachable_settings(stage.settings, stage_schema(stage)) == set()
    assert keys_not_settings(stage.settings, stage_schema(stage)) == stage.other_keys
    # Every setting has a config key, except test hooks and settings the rule fixes itself.
    assert {n for n, s in settings_of(stage.settings).items() if not s.key and not s.hidden} == stage.cli_only


@pytest.mark.parametrize("name", STAGES)
def test_schema_types_enums_bounds_and_defaults_equal_the_settings(name: str) -> None:
    stage = STAGES[name]
    assert schema_mismatches(stage.settings, stage_schema(stage)) == list(stage.default_differences)


@pytest.mark.parametrize("name", STAGES)
def test_the_command_line_defaults_are_the_dataclass_defaults(name: str) -> None:
    stage = STAGES[name]
    assert stage.config_from_args(parse(stage, [])) == stage.settings()


@pytest.mark.parametrize("name", STAGES)
def test_the_rules_options_carry_the_config_values(name: str) -> None:
    """Both config files' values reach the settings the command builds from the rule's options."""
    stage = STAGES[name]
    for config_file in ("config.yaml", "config.real-run.yaml"):
        section = yaml.safe_load((REPO / config_file).read_text())[stage.section]
        built = stage.config_from_args(parse(stage, stage.workflow_arguments(section)))
        for field_name, s in settings_of(stage.settings).items():
            if s.key in section:
                value = getattr(built, field_name)
                assert (list(value) if isinstance(value, tuple) else value) == section[s.key], (config_file, field_name)


def test_generate_null_image_generation_rows_keeps_all_and_budgets_match_the_schema() -> None:
    options = generate.workflow_arguments({"image_generation_rows": None, "max_new_tokens": {"mm_out": 3, "closed": 2}})
    assert options == ["--image-generation-rows", "0", "--max-new-tokens", "closed=2", "mm_out=3"]
    built = generate.generate_config_from_args(parse(STAGES["generate"], options))
    assert built.image_generation_rows is None and built.max_new_tokens == {"closed": 2, "mm_out": 3}
    budgets = SCHEMA["evaluate"]["properties"]["max_new_tokens"]["properties"]
    assert sorted(budgets) == sorted(generate.DEFAULT_MAX_NEW_TOKENS)
    with pytest.raises(generate.GenerateError, match="--batch-size must be >= 1, got 0"):
        generate.generate_config_from_args(parse(STAGES["generate"], ["--batch-size", "0"]))


def test_collect_include_public_false_reaches_the_command() -> None:
    options = collect.workflow_arguments({"include_public": False, "public_root": "p"})
    assert options == ["--no-include-public"]
    assert collect.collect_config_from_args(parse(STAGES["collect"], options)).include_public is False
