"""A stage's settings as one frozen dataclass: the one source of every setting (issue 21 item 1).

Each field carries a `Setting` (help, bounds or choices, its config.yaml key, whether it changes
what the stage computes). From the dataclass come the command line (`add_setting_arguments`,
`values_from_args`), the checks (`first_problem`), the identity fields (`identity_fields`) and the
workflow rule's options for a config section (`workflow_arguments_for`). `schema_mismatches` and
`unreachable_settings` compare a config schema section against it (each stage's settings test).

Field annotations are read as text (`from __future__ import annotations` in the stage modules):
int, float, str, bool, Path, tuple[str, ...] (comma-separated on the command line) and
dict[str, int] (KEY=N items), each optionally `| None`."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

_BASE_TYPES: dict[str, type] = {"int": int, "float": float, "str": str, "Path": Path, "bool": bool,
                                "tuple[str, ...]": tuple, "dict[str, int]": dict}
_SCHEMA_TYPES: dict[type, str] = {int: "integer", float: "number", str: "string", bool: "boolean",
                                  tuple: "array", dict: "object"}


@dataclass(frozen=True)
class Setting:
    """What a settings field is: its help, its bounds, where it is set and what it changes."""

    help: str
    key: str | None = None  # its key in the stage's config.yaml section; None: the command line only
    identity: bool = False  # changes what the stage computes (e.g. part of train's run id)
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    choices: tuple[str, ...] | None = None
    hidden: bool = False  # a test hook: kept out of --help
    # The command-line value that stands for None (config.yaml's null), e.g. 0 for "keep all";
    # None: a None value is simply not passed.
    null_as: Any = None
    # The values config.yaml allows when narrower than the command line's (the rule reads the value
    # too, e.g. a device string that also decides the job's GPU resource).
    config_choices: tuple[str, ...] | None = None
    metavar: str | None = None

    def problem(self, name: str, value: Any) -> str | None:
        """Why VALUE is not allowed for the field NAME, or None."""
        flag = cli_flag(name)
        if value is None or isinstance(value, (tuple, dict, bool)):
            return None
        if self.choices is not None and value not in self.choices:
            return f"{flag} must be one of {', '.join(self.choices)}, got {value!r}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"{flag} must be a finite number, got {value}"
        if isinstance(value, str):
            return None
        low_ok = self.minimum is None or (value > self.minimum if self.exclusive_minimum else value >= self.minimum)
        high_ok = self.maximum is None or (value < self.maximum if self.exclusive_maximum else value <= self.maximum)
        if not (low_ok and high_ok):
            return f"{flag} must be {self.range_text()}, got {value}"
        return None

    def range_text(self) -> str:
        if self.maximum is None:
            return f"{'>' if self.exclusive_minimum else '>='} {self.minimum:g}"
        if self.minimum is None:
            return f"{'<' if self.exclusive_maximum else '<='} {self.maximum:g}"
        low = f"{'(' if self.exclusive_minimum else '['}{self.minimum:g}"
        return f"in {low}, {self.maximum:g}{')' if self.exclusive_maximum else ']'}"


def setting(default: Any = dataclasses.MISSING, /, help: str = "", **settings: Any) -> Any:
    """A settings field with its Setting (`default` omitted: a required field)."""
    meta = {"setting": Setting(help=help, **settings)}
    if default is dataclasses.MISSING:
        return field(metadata=meta)
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=meta)
    return field(default=default, metadata=meta)


def cli_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def settings_of(cls: type) -> dict[str, Setting]:
    """Field name -> Setting of a settings dataclass, in field order."""
    return {f.name: f.metadata["setting"] for f in fields(cls)}


def identity_fields(cls: type) -> tuple[str, ...]:
    """The fields that change what the stage computes."""
    return tuple(name for name, s in settings_of(cls).items() if s.identity)


def _annotation(cls: type, name: str) -> str:
    return {f.name: str(f.type) for f in fields(cls)}[name]


def value_type(cls: type, name: str) -> type:
    """The base type of a field's value (from its annotation, without `| None`)."""
    return _BASE_TYPES[_annotation(cls, name).replace(" | None", "")]


def is_optional(cls: type, name: str) -> bool:
    return _annotation(cls, name).endswith("| None")


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default) for f in fields(cls)}


def add_setting_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of CLS, from its Setting: type, default, choices and help. A bool that
    defaults to True is --NAME/--no-NAME; one that defaults to False is the flag --NAME."""
    defaults = _defaults(cls)
    for name, s in settings_of(cls).items():
        help_text = argparse.SUPPRESS if s.hidden else s.help
        kind, default = value_type(cls, name), defaults[name]
        extra = {"metavar": s.metavar} if s.metavar else {}
        if kind is bool and default is True:
            parser.add_argument(cli_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=True, help=help_text)
        elif kind is bool:
            parser.add_argument(cli_flag(name), action="store_true", help=help_text)
        elif kind is tuple:
            parser.add_argument(cli_flag(name), default=",".join(default), help=help_text, **extra)
        elif kind is dict:
            # KEY=N items; the stage parses them (values_from_args gives the list of strings).
            parser.add_argument(cli_flag(name), nargs="*", default=None, help=help_text, **extra)
        else:
            required = default is dataclasses.MISSING
            cli_default = s.null_as if default is None and s.null_as is not None else default
            parser.add_argument(cli_flag(name), type=kind, choices=s.choices,
                                required=required, default=None if required else cli_default, help=help_text, **extra)


def values_from_args(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The field values of CLS given on the command line: tuples split at commas, a `null_as` value
    back to None; dict fields stay the list of KEY=N strings given (None when not given)."""
    values: dict[str, Any] = {}
    for name, s in settings_of(cls).items():
        value = getattr(args, name)
        if value_type(cls, name) is tuple:
            value = tuple(m.strip() for m in value.split(",") if m.strip())
        elif s.null_as is not None and value == s.null_as:
            value = None
        values[name] = value
    return values


def first_problem(settings: Any) -> str | None:
    """The first field of a settings dataclass instance whose value breaks its Setting, as one line."""
    for f in fields(settings):
        problem = f.metadata["setting"].problem(f.name, getattr(settings, f.name))
        if problem:
            return problem
    return None


def checked_settings(cls: type, values: Mapping[str, Any], error: type[Exception]) -> Any:
    """CLS built from VALUES; ERROR (one line naming the option) when a value breaks its Setting."""
    settings = cls(**values)
    problem = first_problem(settings)
    if problem:
        raise error(problem)
    return settings


def workflow_arguments_for(cls: type, section: Mapping[str, Any]) -> list[str]:
    """The command-line options for a config.yaml SECTION: one per setting of CLS with a config key
    present in it (paths are the rule's inputs and outputs, not settings). A rule passes these."""
    options: list[str] = []
    defaults = _defaults(cls)
    for name, s in settings_of(cls).items():
        kind = value_type(cls, name)
        if s.key is None or s.key not in section or kind is Path:
            continue
        value = section[s.key]
        if kind is bool:
            options += [cli_flag(name)] if value else ([f"--no-{name.replace('_', '-')}"] if defaults[name] is True else [])
        elif value is None:
            options += [cli_flag(name), str(s.null_as)] if s.null_as is not None else []
        elif kind is dict:
            options += [cli_flag(name), *(f"{k}={v}" for k, v in sorted(value.items()))] if value else []
        elif isinstance(value, (list, tuple)):
            options += [cli_flag(name), ",".join(map(str, value))]
        else:
            options += [cli_flag(name), str(value)]
    return options


# ----------------------------------------------------------------------------------------------
# Agreement with the config schema (the stages' settings tests)
# ----------------------------------------------------------------------------------------------


def unreachable_settings(cls: type, schema_section: Mapping[str, Any]) -> set[str]:
    """Config keys of CLS's settings that the schema section (its `properties`) does not have."""
    return {s.key for s in settings_of(cls).values() if s.key} - set(schema_section)


def keys_not_settings(cls: type, schema_section: Mapping[str, Any]) -> set[str]:
    """Schema keys of the section that are no setting of CLS (rule resources, inputs)."""
    return set(schema_section) - {s.key for s in settings_of(cls).values() if s.key}


def schema_mismatches(cls: type, schema_section: Mapping[str, Any], *, check_defaults: bool = True) -> list[str]:
    """How the schema section's entries for CLS's keyed settings differ from them: type (or enum),
    bounds, and (check_defaults) default. Empty when they agree."""
    problems: list[str] = []
    defaults = _defaults(cls)
    for name, s in settings_of(cls).items():
        if s.key is None or s.key not in schema_section:
            continue
        schema, kind = schema_section[s.key], value_type(cls, name)
        where = f"{s.key} ({name})"
        choices = s.config_choices or s.choices
        if choices is not None:
            if schema.get("enum") != list(choices):
                problems.append(f"{where}: enum {schema.get('enum')} != {list(choices)}")
        elif kind is Path:
            ref = schema.get("$ref") or [a.get("$ref") for a in schema.get("anyOf", []) if "$ref" in a]
            if "#/definitions/path" not in (ref if isinstance(ref, list) else [ref]):
                problems.append(f"{where}: not a path in the schema")
        else:
            expected = _SCHEMA_TYPES[kind]
            expected_type: Any = [expected, "null"] if is_optional(cls, name) else expected
            if schema.get("type") != expected_type:
                problems.append(f"{where}: type {schema.get('type')} != {expected_type}")
        bounds = {"exclusiveMinimum" if s.exclusive_minimum else "minimum": s.minimum,
                  "exclusiveMaximum" if s.exclusive_maximum else "maximum": s.maximum}
        for bound in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
            if schema.get(bound) != bounds.get(bound):
                problems.append(f"{where}: {bound} {schema.get(bound)} != {bounds.get(bound)}")
        default = defaults[name]
        if check_defaults and "default" in schema and default is not dataclasses.MISSING:
            wanted = list(default) if isinstance(default, tuple) else default
            if schema["default"] != wanted:
                problems.append(f"{where}: default {schema['default']!r} != {wanted!r}")
    return problems
