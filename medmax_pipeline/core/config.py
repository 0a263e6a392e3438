"""Config validation: the JSON schema in workflow/schemas/config.schema.yaml, defaults, path checks.

The Snakefile calls `validate_config(config)` before planning anything, so an unknown key, a
wrong type or a missing input path stops the run with one message that names the key.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any, Mapping

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SCHEMA = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


def load_schema(schema_path: str | Path = DEFAULT_SCHEMA) -> dict[str, Any]:
    with open(schema_path) as f:
        return yaml.safe_load(f)


def _key_name(path: list[Any]) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _error_message(error: jsonschema.ValidationError, source: str) -> str:
    key = _key_name(list(error.absolute_path))
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        where = f"{key}." if error.absolute_path else ""
        return f"{source}: unknown key '{where}{unknown[0] if unknown else '?'}' (allowed here: {', '.join(allowed)})"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        where = f"{key}." if error.absolute_path else ""
        return f"{source}: missing key '{where}{missing}'"
    return f"{source}: key '{key}': {error.message}"


def _apply_defaults(instance: Any, schema: Mapping[str, Any]) -> None:
    """Fill in `default` values of object properties, recursively (jsonschema only validates)."""
    if not isinstance(instance, dict):
        return
    for name, sub in schema.get("properties", {}).items():
        if name not in instance and "default" in sub:
            instance[name] = copy.deepcopy(sub["default"])
        if name in instance:
            _apply_defaults(instance[name], sub)
            if isinstance(instance[name], list) and isinstance(sub.get("items"), dict):
                for item in instance[name]:
                    _apply_defaults(item, sub["items"])


def _input_paths(config: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(key, path, kind) of every input the user must provide when the demo does not make them."""
    paths = [
        ("checkpoint", config["checkpoint"], "dir"),
        ("base_model", config["base_model"], "dir"),
        ("dataset.train", config["dataset"]["train"], "file"),
        ("dataset.validation", config["dataset"]["validation"], "file"),
        ("images.public_root", config["images"]["public_root"], "dir"),
        ("evaluate.eval_set", config["evaluate"]["eval_set"], "file"),
        ("evaluate.image_root", config["evaluate"]["image_root"], "dir"),
    ]
    for i, entry in enumerate(config["images"]["credentialed"]):
        paths.append((f"images.credentialed.{i}.root", entry["root"], "dir"))
    if config["evaluate"].get("clip"):
        paths.append(("evaluate.clip", config["evaluate"]["clip"], "dir"))
    return paths


def _check_paths(config: Mapping[str, Any], source: str) -> None:
    if config["demo"]["enabled"]:
        return  # the demo rule makes every input path
    for key, path, kind in _input_paths(config):
        p = Path(path)
        if kind == "dir" and not p.is_dir():
            raise ConfigError(f"{source}: key '{key}': folder {path} does not exist")
        if kind == "file" and not p.is_file():
            raise ConfigError(f"{source}: key '{key}': file {path} does not exist")
    ckpt = Path(config["checkpoint"])
    for rel in ("tokenizer/vqgan.yaml", "tokenizer/vqgan.ckpt", "tokenizer/text_tokenizer_modified.json"):
        if not (ckpt / rel).is_file():
            raise ConfigError(f"{source}: key 'checkpoint': {ckpt} lacks {rel} (expected the original MedMax/Anole layout)")


def _check_semantics(config: Mapping[str, Any], source: str) -> None:
    sources = [e["source"] for e in config["images"]["credentialed"]]
    duplicates = sorted({s for s in sources if sources.count(s) > 1})
    if duplicates:
        raise ConfigError(f"{source}: key 'images.credentialed': source {duplicates[0]!r} is listed twice")
    if config["tokenize"]["precision"] != "fp32" and config["tokenize"]["device"] == "cpu":
        raise ConfigError(f"{source}: key 'tokenize.precision': {config['tokenize']['precision']} needs device cuda")


def validate_config(
    config: dict[str, Any], schema_path: str | Path = DEFAULT_SCHEMA, source: str = "config.yaml", check_paths: bool = True
) -> dict[str, Any]:
    """Validate in place (defaults filled in) and return the config; raise ConfigError naming the key."""
    schema = load_schema(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise ConfigError(_error_message(jsonschema.exceptions.best_match(errors) or errors[0], source))
    _apply_defaults(config, schema)
    _check_semantics(config, source)
    if check_paths:
        _check_paths(config, source)
    return config


def load_config(path: str | Path, schema_path: str | Path = DEFAULT_SCHEMA, check_paths: bool = True) -> dict[str, Any]:
    path = Path(path)
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return validate_config(config, schema_path, source=str(path), check_paths=check_paths)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default="config.yaml")
    parser.add_argument("--schema", default=str(DEFAULT_SCHEMA))


def run(args: argparse.Namespace) -> int:
    try:
        load_config(args.config, args.schema)
    except ConfigError as exc:
        print(f"error: {exc}")
        return 1
    print(f"{args.config}: valid")
    return 0
