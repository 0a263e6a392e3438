"""Config validation: the JSON schema in workflow/schemas/config.schema.yaml, defaults, path checks.

The Snakefile calls `validate_config(config)` before planning anything, so an unknown key, a
wrong type or a missing input path stops the run with one message that names the key and the
file it came from: given the config files that were merged (`config_files`, in the order they
were applied, the last one winning), a message names the last file that sets the key, and a
missing key names every file that defines its section.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jsonschema
import yaml

from medmax_pipeline.core.image_keys import credentialed_entry_problem

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SCHEMA = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


def load_schema(schema_path: str | Path = DEFAULT_SCHEMA) -> dict[str, Any]:
    with open(schema_path) as f:
        return yaml.safe_load(f)


# Names the file(s) a key path (e.g. ["tokenize", "num_shards"]) came from.
SourceNamer = Callable[[Sequence[Any]], str]


def _key_name(path: Sequence[Any]) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _has_key_path(document: Any, path: Sequence[Any]) -> bool:
    for part in path:
        if isinstance(document, Mapping) and part in document:
            document = document[part]
        elif isinstance(document, list) and isinstance(part, int) and 0 <= part < len(document):
            document = document[part]
        else:
            return False
    return True


def source_namer(config_files: Sequence[str | Path], default: str) -> SourceNamer:
    """Which of the merged config files (in the order applied, the last winning) a key came from.

    A key some file sets: the last such file. A key no file sets (a missing key): every file that
    defines its section, joined with ' + '. Without files, or when no file helps: `default`.
    """
    documents: list[tuple[str, Any]] = []
    for file in config_files:
        try:
            with open(file) as f:
                documents.append((str(file), yaml.safe_load(f)))
        except (OSError, yaml.YAMLError):
            continue  # a file that cannot be read here names no key; the default stands in

    def name(path: Sequence[Any]) -> str:
        setters = [file for file, document in documents if _has_key_path(document, path)]
        if setters and path:
            return setters[-1]
        sections = [file for file, document in documents if _has_key_path(document, path[:-1])]
        return " + ".join(sections) if sections else default

    return name


def _error_message(error: jsonschema.ValidationError, source: SourceNamer) -> str:
    path = list(error.absolute_path)
    key = _key_name(path)
    if error.validator == "additionalProperties":
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(allowed)) if isinstance(error.instance, dict) else []
        where = f"{key}." if error.absolute_path else ""
        bad = unknown[0] if unknown else "?"
        return f"{source([*path, bad])}: unknown key '{where}{bad}' (allowed here: {', '.join(allowed)})"
    if error.validator == "required":
        missing = error.message.split("'")[1] if "'" in error.message else error.message
        where = f"{key}." if error.absolute_path else ""
        return f"{source([*path, missing])}: missing key '{where}{missing}'"
    return f"{source(path)}: key '{key}': {error.message}"


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
        ("dataset.train", config["dataset"]["train"], "file"),
        ("dataset.validation", config["dataset"]["validation"], "file"),
        ("images.public_root", config["images"]["public_root"], "dir"),
        ("evaluate.eval_set", config["evaluate"]["eval_set"], "file"),
        ("evaluate.image_root", config["evaluate"]["image_root"], "dir"),
    ]
    if config["base_model"] is not None:  # null: the workflow converts `checkpoint` itself
        paths.append(("base_model", config["base_model"], "dir"))
    for i, entry in enumerate(config["images"]["credentialed"]):
        paths.append((f"images.credentialed.{i}.root", entry["root"], "dir"))
        if entry.get("mapping") is not None:  # the user's own file: the demo does not make it
            paths.append((f"images.credentialed.{i}.mapping", entry["mapping"], "file"))
    if config["evaluate"].get("clip"):
        paths.append(("evaluate.clip", config["evaluate"]["clip"], "dir"))
    if config["evaluate"].get("clip_text_tower"):
        paths.append(("evaluate.clip_text_tower", config["evaluate"]["clip_text_tower"], "dir"))
    return paths


def _key_path(key: str) -> list[Any]:
    """'images.credentialed.0.root' -> ['images', 'credentialed', 0, 'root']."""
    return [int(part) if part.isdigit() else part for part in key.split(".")]


def _check_paths(config: Mapping[str, Any], source: SourceNamer) -> None:
    if config["demo"]["enabled"]:
        return  # the demo rule makes every input path
    for key, path, kind in _input_paths(config):
        p = Path(path)
        if kind == "dir" and not p.is_dir():
            raise ConfigError(f"{source(_key_path(key))}: key '{key}': folder {path} does not exist")
        if kind == "file" and not p.is_file():
            raise ConfigError(f"{source(_key_path(key))}: key '{key}': file {path} does not exist")
    ckpt = Path(config["checkpoint"])
    required = ["tokenizer/vqgan.yaml", "tokenizer/vqgan.ckpt", "tokenizer/text_tokenizer_modified.json"]
    if config["base_model"] is None:  # converted from the original weights
        required += ["models/7b/consolidated.pth", "models/7b/params.json"]
    for rel in required:
        if not (ckpt / rel).is_file():
            raise ConfigError(
                f"{source(['checkpoint'])}: key 'checkpoint': {ckpt} lacks {rel} (expected the original MedMax/Anole layout)"
            )


def _demo_written_paths(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, path) of every input path the demo rule writes (its outputs)."""
    paths = [("checkpoint", config["checkpoint"]), ("dataset.train", config["dataset"]["train"]),
             ("dataset.validation", config["dataset"]["validation"]), ("images.public_root", config["images"]["public_root"]),
             ("evaluate.eval_set", config["evaluate"]["eval_set"]), ("evaluate.image_root", config["evaluate"]["image_root"])]
    if config["base_model"] is not None:
        paths.append(("base_model", config["base_model"]))
    if config["evaluate"].get("clip"):
        paths.append(("evaluate.clip", config["evaluate"]["clip"]))
    if config["evaluate"].get("clip_text_tower"):
        paths.append(("evaluate.clip_text_tower", config["evaluate"]["clip_text_tower"]))
    paths += [(f"images.credentialed.{i}.root", e["root"]) for i, e in enumerate(config["images"]["credentialed"])]
    return paths


def _check_demo_paths(config: Mapping[str, Any], source: SourceNamer) -> None:
    """With the demo on, the demo rule owns every input path as an output (Snakemake may delete
    it before the rule runs): refuse any that lies outside the results folder, so that the demo
    can never replace a user's real data."""
    if not config["demo"]["enabled"]:
        return
    results = Path(config["results_dir"]).resolve()
    for key, path in _demo_written_paths(config):
        resolved = Path(path).resolve()
        if resolved == results or results not in resolved.parents:
            raise ConfigError(
                f"{source(_key_path(key))}: key '{key}': demo.enabled is true (from {source(['demo', 'enabled'])}), so the demo would "
                f"write {path}, which lies outside results_dir '{config['results_dir']}'; for a real run set demo.enabled: false "
                "(start from config.real-run.yaml)"
            )


def _check_semantics(config: Mapping[str, Any], source: SourceNamer) -> None:
    # The same checks as the stages' --credentialed parser, so a source the config accepts is one
    # the workflow can plan and run, and one it refuses stops the workflow before planning.
    for i, entry in enumerate(config["images"]["credentialed"]):
        problem = credentialed_entry_problem(entry)
        if problem is not None:
            key = ["images", "credentialed", i] + ([problem[0]] if problem[0] else [])
            raise ConfigError(f"{source(key)}: key '{_key_name(key)}': {problem[1]}")
        for name in ("root", "mapping"):  # rule inputs: Snakemake would read a brace as a wildcard
            if "{" in str(entry.get(name) or "") or "}" in str(entry.get(name) or ""):
                key = ["images", "credentialed", i, name]
                raise ConfigError(f"{source(key)}: key '{_key_name(key)}': {entry[name]} may not hold '{{' or '}}' (a workflow input path)")
    sources = [e["source"] for e in config["images"]["credentialed"]]
    duplicates = sorted({s for s in sources if sources.count(s) > 1})
    if duplicates:
        where = source(["images", "credentialed"])
        raise ConfigError(f"{where}: key 'images.credentialed': source {duplicates[0]!r} is listed twice")
    if config["tokenize"]["precision"] != "fp32" and config["tokenize"]["device"] == "cpu":
        where = source(["tokenize", "precision"])
        raise ConfigError(f"{where}: key 'tokenize.precision': {config['tokenize']['precision']} needs device cuda")
    if config["evaluate"]["clip_text_tower"] and not config["evaluate"]["clip"]:
        where = source(["evaluate", "clip_text_tower"])
        raise ConfigError(f"{where}: key 'evaluate.clip_text_tower': it is the text tower of evaluate.clip, which is not set")
    if config["demo"]["enabled"]:
        for key in ("clip", "clip_text_tower"):  # the demo rule writes its tiny BiomedCLIP to both
            if not config["evaluate"][key]:
                raise ConfigError(f"{source(['evaluate', key])}: key 'evaluate.{key}': demo.enabled is true (from "
                                  f"{source(['demo', 'enabled'])}) and the demo writes a folder there: give it a path")


def validate_config(
    config: dict[str, Any],
    schema_path: str | Path = DEFAULT_SCHEMA,
    source: str = "config.yaml",
    check_paths: bool = True,
    config_files: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Validate in place (defaults filled in) and return the config; raise ConfigError naming the key.

    `config` may be the merge of several `config_files` (in the order they were applied, later
    files overriding earlier ones, as Snakemake merges configfile: and --configfile): an error then
    names the file its key came from. `source` names it when no file is given or none sets the key.
    """
    namer = source_namer(config_files, source)
    schema = load_schema(schema_path)
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise ConfigError(_error_message(jsonschema.exceptions.best_match(errors) or errors[0], namer))
    _apply_defaults(config, schema)
    _check_semantics(config, namer)
    _check_demo_paths(config, namer)
    if check_paths:
        _check_paths(config, namer)
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
    return validate_config(config, schema_path, source=str(path), check_paths=check_paths, config_files=[path])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default="config.yaml")
    parser.add_argument("--schema", default=str(DEFAULT_SCHEMA))


def run(args: argparse.Namespace) -> int:
    try:
        load_config(args.config, args.schema)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.config}: valid")
    return 0
