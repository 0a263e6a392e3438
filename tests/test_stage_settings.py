"""One source for every stage setting other than train's (issue 21 item 1): each
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
from medmax_pipeline.stages import collect, convert_checkpoint, export, tokenize_images, vocab
from medmax_pipeline.stages.assemble import stage as assemble
from medmax_pipeline.stages.evaluate import clip_scores, generate, score
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


# The evaluate: keys that are no stage's setting: inputs and the rule sets (jobs), and the judge's section.
EVALUATE_INPUTS = frozenset({"eval_set", "image_root", "clip", "clip_text_tower", "rules", "judge"})
GENERATE_KEYS = frozenset({"batch_size", "max_items", "device", "decoding", "prompt_style", "max_new_tokens", "image_generation_rows"})

STAGES = {
    "generate": Stage(
        generate.GenerateConfig, "evaluate",
        frozenset({*EVALUATE_INPUTS, "clip_device", "bootstrap_samples", "bootstrap_seed"}),
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
    "score": Stage(
        score.ScoreConfig, "evaluate", EVALUATE_INPUTS | GENERATE_KEYS | {"clip_device"}, (),
        score.add_arguments, ("--predictions", "p", "--output", "o"),
        score.score_config_from_args, score.workflow_arguments,
        cli_only=frozenset({"device"}),  # only used with --clip; the rule reads the clip_scores artifacts
    ),
    "clip_scores": Stage(
        clip_scores.ClipScoresConfig, "evaluate", EVALUATE_INPUTS | GENERATE_KEYS | {"bootstrap_samples", "bootstrap_seed"}, (),
        clip_scores.add_arguments, ("--predictions", "p", "--output", "o"),
        clip_scores.clip_scores_config_from_args, clip_scores.workflow_arguments,
    ),
    "vocab": Stage(
        vocab.VocabConfig, "vocab", frozenset(), (),
        vocab.add_arguments, ("--tokens", "t", "--tokenizer", "k", "--output", "o"),
        vocab.vocab_config_from_args, vocab.workflow_arguments,
        cli_only=frozenset({"plain_tokenizer"}),  # the rules always pass text_tokenizer_modified.json
    ),
    "convert": Stage(
        convert_checkpoint.ConvertConfig, "convert", frozenset(), (),
        convert_checkpoint.add_arguments, ("--checkpoint", "c", "--output", "o"),
        convert_checkpoint.convert_config_from_args, convert_checkpoint.workflow_arguments,
    ),
    "export": Stage(
        export.ExportConfig, "export", frozenset(), (),
        export.add_arguments, ("--base-model", "b", "--adapter", "a", "--output-checkpoint", "c", "--output-hf", "h"),
        export.export_config_from_args, export.workflow_arguments,
    ),
    "assemble": Stage(
        assemble.AssembleConfig, "assemble", frozenset({"mem_mb"}), (),
        assemble.add_arguments, ("--rows", "r", "--split", "train", "--tokenizer", "t", "--output-dir", "o"),
        assemble.assemble_config_from_args, assemble.workflow_arguments,
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


def test_assemble_null_workers_is_the_default_and_bounds_are_checked_before_any_work() -> None:
    options = assemble.workflow_arguments({"workers": None, "batch_size": 64, "overflow": "drop", "mem_mb": 2000})
    assert options == ["--overflow", "drop", "--batch-size", "64"]
    built = assemble.assemble_config_from_args(parse(STAGES["assemble"], options))
    assert built.workers is None and built.batch_size == 64 and built.overflow == "drop"
    with pytest.raises(assemble.AssemblyError, match="--max-error-fraction must be in \\[0, 1\\], got 1.5"):
        assemble.assemble_config_from_args(parse(STAGES["assemble"], ["--max-error-fraction", "1.5"]))


def test_score_seed_comes_from_config_and_the_command_line_checks_the_schemas_bootstrap_bound() -> None:
    options = score.workflow_arguments({"bootstrap_samples": 500, "bootstrap_seed": 7, "device": "cuda", "batch_size": 8})
    assert options == ["--n-bootstrap", "500", "--seed", "7"]  # evaluate.device is generate's, not score's
    built = score.score_config_from_args(parse(STAGES["score"], options))
    assert (built.n_bootstrap, built.seed, built.device) == (500, 7, "cpu")
    assert SCHEMA["evaluate"]["properties"]["bootstrap_samples"]["minimum"] == 100
    with pytest.raises(score.ScoreError, match="--n-bootstrap must be >= 100, got 99"):
        score.score_config_from_args(parse(STAGES["score"], ["--n-bootstrap", "99"]))
    smk = (REPO / "workflow/rules/evaluate.smk").read_text()
    assert "--seed 0" not in smk and "--n-bootstrap {" not in smk  # the score rule passes score_workflow_arguments


def test_clip_device_reaches_clip_scores_and_its_gpu_resource() -> None:
    assert clip_scores.workflow_arguments({"clip_device": "cuda", "device": "cpu"}) == ["--device", "cuda"]
    smk = (REPO / "workflow/rules/evaluate.smk").read_text()
    assert 'gpu=1 if EVAL["clip_device"] == "cuda" else 0' in smk


def test_export_convert_and_vocab_settings_reach_their_commands_and_are_checked() -> None:
    assert export.workflow_arguments({"dtype": "bfloat16"}) == ["--dtype", "bfloat16"]
    assert convert_checkpoint.workflow_arguments({"max_shard_gb": 0.5}) == ["--max-shard-gb", "0.5"]
    assert vocab.workflow_arguments({"batch_size": 16}) == ["--batch-size", "16"]
    with pytest.raises(convert_checkpoint.ConversionError, match="--max-shard-gb must be > 0, got 0.0"):
        convert_checkpoint.convert_config_from_args(parse(STAGES["convert"], ["--max-shard-gb", "0"]))
    with pytest.raises(ValueError, match="--batch-size must be >= 1, got 0"):
        vocab.vocab_config_from_args(parse(STAGES["vocab"], ["--batch-size", "0"]))
    assert vocab.vocab_config_from_args(parse(STAGES["vocab"], ["--plain-tokenizer"])).plain_tokenizer is True
    for rule in ("export", "convert", "vocab"):
        assert "{params.options}" in (REPO / f"workflow/rules/{rule}.smk").read_text(), rule


def test_the_new_sections_default_so_an_older_config_still_validates() -> None:
    from medmax_pipeline.core.config import _apply_defaults, load_schema

    older = {"assemble": {"max_length": 2048}, "evaluate": {}}
    _apply_defaults(older, load_schema())
    assert older["vocab"] == {"batch_size": 4096} and older["convert"] == {"max_shard_gb": 2.0} and older["export"] == {"dtype": "auto"}
    assert older["assemble"]["workers"] is None and older["evaluate"]["bootstrap_seed"] == 0
