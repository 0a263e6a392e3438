"""Config validation: the JSON schema in workflow/schemas/config.schema.yaml, defaults, path checks.

The Snakefile calls `validate_config(config)` before planning anything, so an unknown key, a
wrong type or a missing input path stops the run with one message that names the key and the
file it came from: given the config files that were merged (`config_files`, in the order they
were applied, the last one winning), a message names the last file that sets the key, and a
missing key names every file that defines its section.

This is the only place a setting is refused: an integer key refuses 2.0 (jsonschema would take
it, and the stage's `int(...)` command line option would then fail hours later), so every value
that passes here is one the stages' command lines parse. `medmax validate-config` merges its
--configfile list over the base file exactly as Snakemake merges --configfile over configfile:
(`merge_config_files`), so it checks what the workflow would run.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Mapping as MappingABC
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


def _is_strict_integer(checker: Any, instance: Any) -> bool:
    """An int and nothing else: jsonschema's "integer" also takes 2.0 (a whole float), which a
    stage's int command line option then refuses (or a float shard count crashes planning)."""
    return isinstance(instance, int) and not isinstance(instance, bool)


# Draft 2020-12 with "integer" meaning a YAML integer (2, not 2.0 or true).
ConfigValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_strict_integer),
)


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
    if error.validator == "type" and isinstance(error.instance, float) and "integer" in str(error.validator_value):
        whole = f"{error.instance:.0f}" if error.instance.is_integer() else "a whole number"
        return f"{source(path)}: key '{key}': {error.instance!r} is not an integer (write {whole}, without a decimal point)"
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


def _input_folders(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, path) of every folder the workflow reads as an input (a folder_manifest input: its
    identity decides whether the stages after it rerun)."""
    return [(key, path) for key, path, kind in _input_paths(config) if kind == "dir"]


def _inside_or_equal(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_results_dir(config: Mapping[str, Any], source: SourceNamer) -> None:
    """results_dir may not be (or lie inside) an input folder: every output written there changes
    that folder's identity, so each invocation would rerun collect and everything after it. The
    other way round is fine (the demo's inputs live inside results_dir)."""
    results = Path(config["results_dir"]).resolve()
    for key, path in _input_folders(config):
        if _inside_or_equal(results, Path(path).resolve()):
            raise ConfigError(
                f"{source(['results_dir'])}: key 'results_dir': {config['results_dir']} lies inside the input folder of key "
                f"'{key}' ({path}, from {source(_key_path(key))}): every output written there changes that input, so every "
                "run would start over from collect; put results_dir outside it"
            )


def _overlap_warnings(config: Mapping[str, Any], source: SourceNamer) -> list[str]:
    """evaluate.image_root equal to, inside or containing a credentialed root: its images (and
    every prediction made from them) may be credentialed, which the user should know before a
    run (the evaluation stages mark such rows credentialed at run time)."""
    image_root = Path(config["evaluate"]["image_root"]).resolve()
    messages = []
    for i, entry in enumerate(config["images"]["credentialed"]):
        root = Path(entry["root"]).resolve()
        if _inside_or_equal(image_root, root) or _inside_or_equal(root, image_root):
            key = f"images.credentialed.{i}.root"
            messages.append(
                f"{source(['evaluate', 'image_root'])}: key 'evaluate.image_root' ({config['evaluate']['image_root']}) overlaps "
                f"the credentialed root of key '{key}' ({entry['root']}, from {source(_key_path(key))}, source "
                f"{entry['source']!r}): evaluation images under it, and the predictions made from them, are credentialed"
            )
    return messages


def _judge_warnings(config: Mapping[str, Any], source: SourceNamer) -> list[str]:
    """evaluate.judge without allow_credentialed while credentialed sources are configured: the
    trained model learned from credentialed rows, so its predictions are credentialed and its judge
    job will refuse them, after training; say so before the run starts."""
    judge, sources = config["evaluate"].get("judge"), [e["source"] for e in config["images"]["credentialed"]]
    if not judge or judge.get("allow_credentialed") or not sources:
        return []
    return [f"{source(['evaluate', 'judge'])}: key 'evaluate.judge' has no allow_credentialed: true, and key "
            f"'images.credentialed' (from {source(['images', 'credentialed'])}) names {', '.join(map(repr, sources))}: the "
            "trained model learns from credentialed rows, so its predictions are credentialed and the trained model's "
            "judge job will refuse to send them (after training); set evaluate.judge.allow_credentialed: true only if "
            "your data use agreement allows sending them to that endpoint"]


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


def _print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def validate_config(
    config: dict[str, Any],
    schema_path: str | Path = DEFAULT_SCHEMA,
    source: str = "config.yaml",
    check_paths: bool = True,
    config_files: Sequence[str | Path] = (),
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Validate in place (defaults filled in) and return the config; raise ConfigError naming the key.

    `config` may be the merge of several `config_files` (in the order they were applied, later
    files overriding earlier ones, as Snakemake merges configfile: and --configfile): an error then
    names the file its key came from. `source` names it when no file is given or none sets the key.
    Settings that are allowed but worth knowing about go to `warn` (default: a `warning:` line on
    stderr).
    """
    namer = source_namer(config_files, source)
    schema = load_schema(schema_path)
    validator = ConfigValidator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        raise ConfigError(_error_message(jsonschema.exceptions.best_match(errors) or errors[0], namer))
    _apply_defaults(config, schema)
    _check_semantics(config, namer)
    _check_results_dir(config, namer)
    _check_demo_paths(config, namer)
    if check_paths:
        _check_paths(config, namer)
    for message in [*_overlap_warnings(config, namer), *_judge_warnings(config, namer)]:
        (warn or _print_warning)(message)
    return config


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            config = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return config


def merge_config(config: Any, overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`overlay` merged into `config` (in place, returned) as Snakemake's update_config does: a
    mapping value is merged key by key into what is there (which becomes a mapping if it was
    not), any other value (a list, null, a number) replaces it. So `max_new_tokens: {}` in an
    overlay keeps the base's budgets (and leaves a base's null alone), and `judge: null` removes
    the base's judge."""
    for key, value in overlay.items():
        if not isinstance(config, MappingABC):  # only once there is a key to set, as Snakemake
            config = {}
        if isinstance(value, MappingABC):
            config[key] = merge_config(config.get(key, {}), value)
        else:
            config[key] = value
    return config


def merged_files(base: str | Path | None, configfiles: Sequence[str | Path] = ()) -> list[Path]:
    """The files merged, in order: `base` (the Snakefile's configfile:), then the --configfile
    files. As in Snakemake, a missing base is skipped when --configfile files are given (and is
    an error, when read, when none is)."""
    files = [Path(f) for f in configfiles]
    if base is not None and (not files or Path(base).exists()):
        files.insert(0, Path(base))
    return files


def merge_config_files(base: str | Path | None, configfiles: Sequence[str | Path] = ()) -> dict[str, Any]:
    """The config the workflow runs with: the --configfile files merged together in order (later
    ones winning), then that merged over `base`, as Snakemake does (the order matters: a mapping
    in one --configfile merges into the base's mapping even when an earlier one set a scalar)."""
    overlay: dict[str, Any] = {}
    for path in configfiles:
        merge_config(overlay, _read_config_file(Path(path)))
    files = merged_files(base, configfiles)
    config = _read_config_file(files[0]) if len(files) > len(configfiles) else {}
    return merge_config(config, overlay)


def load_config(
    path: str | Path | None,
    schema_path: str | Path = DEFAULT_SCHEMA,
    check_paths: bool = True,
    configfiles: Sequence[str | Path] = (),
    warn: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Read `path` with `configfiles` merged over it (merge_config_files), validate and return it;
    an error names the file its key came from."""
    config = merge_config_files(path, configfiles)
    files = merged_files(path, configfiles)
    source = str(files[-1]) if files else "config.yaml"
    return validate_config(config, schema_path, source=source, check_paths=check_paths, config_files=files, warn=warn)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", default="config.yaml",
                        help="the base config (the Snakefile's configfile:, default config.yaml)")
    parser.add_argument("--configfile", "--configfiles", dest="configfiles", nargs="+", action="extend", default=[],
                        metavar="FILE",
                        help="config files merged over CONFIG in this order, later ones winning, nested keys merged key by "
                             "key: the same files as snakemake --configfile, so the merge the workflow runs is what is checked")
    parser.add_argument("--schema", default=str(DEFAULT_SCHEMA))


def run(args: argparse.Namespace) -> int:
    load_config(args.config, args.schema, configfiles=args.configfiles)
    print(f"{' + '.join(map(str, merged_files(args.config, args.configfiles)))}: valid")
    return 0
