"""Which image a dataset row refers to: its image key, computed from the row alone.

An image key is "<root name>:<path relative to that root>". Public rows (credential = no) name
their image in `image_path`, relative to the public images archive: key "public:<image_path>".
Credentialed rows (credential = yes) carry no image_path; the config gives, for each
credentialed source, a root and either
- a path template over the row's columns (its `extra` columns included), or
- a mapping file the user supplies (rows without any identifier column): one entry per row,
  keyed by the row's `row_id` ("{split}:{line}", rows.row_id_for) or by the SHA-256 of the
  row's text (`text_sha256`, see text_sha256()), naming the image path relative to the root;
key "<source>:<rendered template or mapped path>". Both collect (which resolves keys to files
inside the roots) and assembly (which joins image blocks back to rows) call `image_key_for_row`,
and both build their sources with `parse_credentialed_specs`, so the two stages cannot disagree.

A key is the row's own spelling, not the file: two spellings of one file ('./a.jpg' and 'a.jpg',
or a symlink alias) are two keys with one resolved file, which collect lists and tokenize
encodes once for both; nothing here needs the file system (a mapping file is read once, when the
sources are built).

Templates are Python format strings over text values; a format spec may cut a value:
"{subject_id:.2}" is the first two characters of subject_id. `template_problem` is the one
check of a template, used by `medmax validate-config` (and so the workflow) and the stages.

On the command line a source is one spec: SOURCE=ROOT=TEMPLATE or SOURCE=ROOT=mapping:PATH
(split at the first two '=': a source or root may not hold '=', a template or mapping path may).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from string import Formatter
from typing import Any, Iterator, Mapping, Sequence

from medmax_pipeline.core.rows import lone_surrogate_problem, row_extra, utf8_problem

PUBLIC_ROOT_NAME = "public"

# Presets for credentialed sources. MIMIC-CXR-JPG: files/p{first 2 digits}/p{subject}/s{study}/{dicom}.jpg
TEMPLATE_PRESETS: dict[str, str] = {
    "mimic_cxr_jpg": "files/p{subject_id:.2}/p{subject_id}/s{study_id}/{dicom_id}.jpg",
}

MAPPING_PREFIX = "mapping:"  # SOURCE=ROOT=mapping:PATH on the command line
MAPPING_KEY_COLUMNS = ("row_id", "text_sha256")  # a mapping file is keyed by exactly one of these
MAPPING_PATH_COLUMN = "image_path"
MAPPING_SUFFIXES = (".csv", ".jsonl")
# What rows.row_id_for makes: "{split}:{line}", line 1-based.
_ROW_ID = re.compile(r"^.+:[1-9][0-9]*$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_SOURCE_NAME = re.compile(r"^[^=:\s]+$")
_ABSOLUTE = re.compile(r"^([/\\]|[A-Za-z]:[\\/])")  # POSIX or Windows absolute path


class CredentialedSpecError(ValueError):
    """A credentialed source cannot be used: a bad spec, template or mapping file (the message says where)."""


def text_sha256(text: str) -> str:
    """The text hash a mapping file may key a row by: SHA-256 of the row's `text`, UTF-8, lowercase hex."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ImageMapping:
    """A user-supplied mapping file: row_id or text_sha256 -> image path relative to the source root."""

    path: str
    key_column: str  # one of MAPPING_KEY_COLUMNS
    paths: dict[str, str] = field(compare=False, repr=False)

    def key_of(self, row: Mapping[str, Any]) -> str:
        """The value this mapping looks a row up by."""
        if self.key_column == "row_id":
            return str(row.get("row_id") or "")
        return text_sha256(row.get("text") or "")


@dataclass(frozen=True)
class CredentialedSource:
    source: str
    root: str
    template: str | None = None  # a preset name or a format string
    mapping: ImageMapping | None = None  # instead of a template

    def __post_init__(self) -> None:
        if (self.template is None) == (self.mapping is None):
            raise CredentialedSpecError(f"credentialed source {self.source!r}: give exactly one of a template or a mapping file")

    @property
    def path_template(self) -> str | None:
        return TEMPLATE_PRESETS.get(self.template, self.template) if self.template is not None else None


@dataclass(frozen=True)
class ImageKey:
    key: str | None  # None when the row's image cannot be named
    root_name: str | None
    relative_path: str | None
    problem: str | None = None  # why key is None: "no image key", "no mapping entry", ...


# ----------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in Formatter().parse(template) if name]


def template_problem(template: str) -> str | None:
    """Why a template (a preset name or a format string) cannot name images, or None when it can.

    Fields must be plain column names (no positional '{}', attribute or index access, conversion
    or nested field), and each format spec must apply to a text value (row values are rendered
    as text: '{subject_id:.2}' works, '{subject_id:d}' would fail on every row).
    """
    path_template = TEMPLATE_PRESETS.get(template, template)
    if path_template.startswith(MAPPING_PREFIX):
        return f"template {template!r} starts with {MAPPING_PREFIX!r}, which names a mapping file"
    try:
        parsed = list(Formatter().parse(path_template))
    except ValueError as exc:
        return f"template {template!r} is not a valid format string: {exc}"
    names = [name for _, name, _, _ in parsed if name is not None]
    if not names:
        return f"template {template!r} names no row column, so every row would name the same image"
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name or name.isdigit():
            return f"template {template!r}: positional field {{{name}}}; name a row column, e.g. {{study_id}}"
        if "." in name or "[" in name:
            return f"template {template!r}: field {{{name}}} is not a plain column name (no attribute or index access)"
        if conversion:
            return f"template {template!r}: field {{{name}!{conversion}}} has a conversion; use the plain column"
        if spec and "{" in spec:
            return f"template {template!r}: field {{{name}:{spec}}} has a nested field in its format spec"
        try:
            format("0123456789", spec or "")
        except ValueError as exc:
            return f"template {template!r}: format spec {spec!r} of {{{name}}} does not apply to text: {exc}"
    return None


def _render_template(row: Mapping[str, Any], source: CredentialedSource) -> ImageKey:
    template = source.path_template or ""
    values = {**row_extra(dict(row)), **{k: v for k, v in row.items() if k != "extra"}}
    missing = [f for f in template_fields(template) if values.get(f) in (None, "")]
    if missing:
        return ImageKey(None, source.source, None, f"no image key: row lacks {', '.join(missing)} for the {source.source} template")
    try:
        relative = template.format(**{k: str(v) for k, v in values.items()})
    except (KeyError, ValueError, IndexError, AttributeError) as exc:
        return ImageKey(None, source.source, None, f"template {template!r} failed: {exc}")
    return ImageKey(f"{source.source}:{relative}", source.source, relative)


# ----------------------------------------------------------------------------------------------
# Mapping files
# ----------------------------------------------------------------------------------------------


def _mapping_error(path: Path, line: int | None, reason: str) -> CredentialedSpecError:
    where = f"{path}:{line}" if line is not None else str(path)
    return CredentialedSpecError(f"mapping file {where}: {reason}")


def _key_column_of(columns: Sequence[str], path: Path, line: int) -> str:
    keys = [c for c in MAPPING_KEY_COLUMNS if c in columns]
    if len(keys) != 1 or MAPPING_PATH_COLUMN not in columns:
        raise _mapping_error(
            path, line, f"expected the columns image_path and exactly one of {' or '.join(MAPPING_KEY_COLUMNS)}, got {list(columns)}"
        )
    return keys[0]


def _utf8_text(path: Path, data: bytes) -> str:
    """A mapping file's bytes as text (a UTF-8 BOM dropped), or an error naming the first line
    that is not UTF-8. Decoded whole, not chunk by chunk, so that the line is the right one."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        start = data.rfind(b"\n", 0, exc.start) + 1
        end = data.find(b"\n", exc.start)
        try:  # the line alone, for a byte offset within it
            data[start : end if end >= 0 else len(data)].decode("utf-8")
            reason = utf8_problem(exc)
        except UnicodeDecodeError as line_exc:
            reason = utf8_problem(line_exc)
        raise _mapping_error(path, data.count(b"\n", 0, exc.start) + 1, reason) from None


def _csv_entries(path: Path) -> Iterator[tuple[int, str, Any, Any]]:
    """(line, key column, key, image path) of each entry of a CSV mapping with a header line."""
    text = _utf8_text(path, path.read_bytes())
    # newline="": csv sees line ends as they are (a quoted field may hold one).
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)  # an unclosed quote is an error, not a path with a newline
    try:
        header = next(reader, None)
        if header is None:
            raise _mapping_error(path, None, "the file is empty (expected a header line)")
        key_column = _key_column_of(header, path, reader.line_num)
        key_at, path_at = header.index(key_column), header.index(MAPPING_PATH_COLUMN)
        for record in reader:
            if not record:
                continue  # a blank line
            if len(record) != len(header):
                raise _mapping_error(path, reader.line_num, f"{len(record)} fields, the header has {len(header)}")
            yield reader.line_num, key_column, record[key_at], record[path_at]
    except csv.Error as exc:
        raise _mapping_error(path, reader.line_num, f"not valid CSV: {exc}") from None


def _jsonl_entries(path: Path) -> Iterator[tuple[int, str, Any, Any]]:
    """(line, key column, key, image path) of each entry of a JSONL mapping (one object a line)."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                entry = json.loads(raw)
            except UnicodeDecodeError as exc:
                raise _mapping_error(path, line_no, utf8_problem(exc)) from None
            except json.JSONDecodeError as exc:
                raise _mapping_error(path, line_no, f"bad JSON: {exc}") from None
            if not isinstance(entry, dict):
                raise _mapping_error(path, line_no, f"a JSON {type(entry).__name__}, expected an object")
            key_column = _key_column_of(list(entry), path, line_no)
            yield line_no, key_column, entry[key_column], entry[MAPPING_PATH_COLUMN]


def load_image_mapping(path: str | Path) -> ImageMapping:
    """Read a mapping file (.csv with a header, or .jsonl); any bad line is an error naming file and line.

    One key column for the whole file. A key listed twice with the same path is kept once; with
    different paths it is refused (a row cannot have two images).
    """
    path = Path(path)
    if path.suffix.lower() not in MAPPING_SUFFIXES:
        raise _mapping_error(path, None, f"expected a {' or '.join(MAPPING_SUFFIXES)} file")
    if not path.is_file():
        raise _mapping_error(path, None, "file does not exist")
    entries = _csv_entries(path) if path.suffix.lower() == ".csv" else _jsonl_entries(path)
    file_key_column: str | None = None
    paths: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for line, key_column, key, image_path in entries:
        if file_key_column is None:
            file_key_column = key_column
        elif key_column != file_key_column:
            raise _mapping_error(path, line, f"keyed by {key_column}, earlier lines by {file_key_column} (use one key column per file)")
        if not isinstance(key, str) or not isinstance(image_path, str) or not image_path.strip():
            raise _mapping_error(path, line, f"{key_column} and image_path must be non-empty text, got {key!r} and {image_path!r}")
        for column, value in ((key_column, key), (MAPPING_PATH_COLUMN, image_path)):
            problem = lone_surrogate_problem(column, value)  # JSON may spell one ("\\ud800"); no path or key holds it
            if problem is not None:
                raise _mapping_error(path, line, problem)
        key = key.strip().lower() if key_column == "text_sha256" else key.strip()
        if _ABSOLUTE.match(image_path) or ".." in re.split(r"[\\/]", image_path):
            raise _mapping_error(path, line, f"image_path {image_path!r} must be relative to the source root, without '..'")
        pattern, shape = (_ROW_ID, "SPLIT:LINE, e.g. train:12") if key_column == "row_id" else (_SHA256_HEX, "64 hex digits")
        if not pattern.match(key):
            raise _mapping_error(path, line, f"{key_column} {key!r} is not {shape}")
        if key in paths and paths[key] != image_path:
            raise _mapping_error(
                path, line, f"{key_column} {key!r} is mapped to {image_path!r} here and to {paths[key]!r} on line {first_line[key]}"
            )
        paths.setdefault(key, image_path)
        first_line.setdefault(key, line)
    return ImageMapping(str(path), file_key_column or MAPPING_KEY_COLUMNS[0], paths)


def _map_row(row: Mapping[str, Any], source: CredentialedSource) -> ImageKey:
    mapping = source.mapping
    assert mapping is not None
    key = mapping.key_of(row)
    relative = mapping.paths.get(key)
    if relative is None:
        return ImageKey(None, source.source, None, f"no mapping entry: {mapping.key_column} {key!r} is not in {mapping.path}")
    return ImageKey(f"{source.source}:{relative}", source.source, relative)


# ----------------------------------------------------------------------------------------------
# Sources: from the command line, from the config
# ----------------------------------------------------------------------------------------------


def format_credentialed_spec(entry: Mapping[str, Any]) -> str:
    """A config entry {source, root, template | mapping} as the one command-line spec."""
    target = entry["template"] if entry.get("template") is not None else f"{MAPPING_PREFIX}{entry['mapping']}"
    return f"{entry['source']}={entry['root']}={target}"


def credentialed_entry_problem(entry: Mapping[str, Any]) -> tuple[str | None, str] | None:
    """(key of the entry, or None for the entry itself; reason) when a config entry cannot be
    used, or None. The checks that need no file; the config and the command line both run them."""
    source, root = str(entry.get("source", "")), str(entry.get("root", ""))
    if not _SOURCE_NAME.match(source):
        return "source", f"source {source!r} must be non-empty, without '=', ':' or spaces"
    if source == PUBLIC_ROOT_NAME:
        return "source", f"a credentialed source may not be called {PUBLIC_ROOT_NAME!r} (the public root's name)"
    if not root.strip() or "=" in root:
        return "root", f"root {root!r} must be non-empty and may not hold '='"
    has_template, has_mapping = entry.get("template") is not None, entry.get("mapping") is not None
    if has_template == has_mapping:
        return None, "give exactly one of template or mapping"
    if has_template:
        problem = template_problem(str(entry["template"]))
        return ("template", problem) if problem else None
    mapping = str(entry["mapping"])
    if not mapping.strip():
        return "mapping", "mapping path is empty"
    if Path(mapping).suffix.lower() not in MAPPING_SUFFIXES:
        return "mapping", f"mapping file {mapping} must be a {' or '.join(MAPPING_SUFFIXES)} file"
    return None


def parse_credentialed_spec(spec: str) -> CredentialedSource:
    """'SOURCE=ROOT=TEMPLATE' or 'SOURCE=ROOT=mapping:PATH' -> CredentialedSource (a mapping file is read here)."""
    parts = spec.split("=", 2)
    if len(parts) != 3 or not all(p.strip() for p in parts):
        raise CredentialedSpecError(
            f"--credentialed {spec!r}: expected SOURCE=ROOT=TEMPLATE or SOURCE=ROOT={MAPPING_PREFIX}PATH (TEMPLATE a preset "
            f"such as {', '.join(sorted(TEMPLATE_PRESETS))} or a format string over row columns)"
        )
    source, root, target = (p.strip() for p in parts)
    entry: dict[str, Any] = {"source": source, "root": root}
    if target.startswith(MAPPING_PREFIX):
        entry["mapping"] = target[len(MAPPING_PREFIX):]
    else:
        entry["template"] = target
    problem = credentialed_entry_problem(entry)
    if problem is not None:
        raise CredentialedSpecError(f"--credentialed {spec!r}: {problem[1]}")
    if "mapping" in entry:
        return CredentialedSource(source, root, mapping=load_image_mapping(entry["mapping"]))
    return CredentialedSource(source, root, target)


def parse_credentialed_specs(specs: Sequence[str]) -> dict[str, CredentialedSource]:
    """Every stage's parser of its --credentialed arguments: sources by name, each given once."""
    sources: dict[str, CredentialedSource] = {}
    for spec in specs:
        parsed = parse_credentialed_spec(spec)
        if parsed.source in sources:
            raise CredentialedSpecError(f"--credentialed: source {parsed.source!r} is given twice")
        sources[parsed.source] = parsed
    return sources


def credentialed_sources_from_config(entries: Sequence[Mapping[str, Any]]) -> dict[str, CredentialedSource]:
    """The config's images.credentialed entries, through the same parser as the command line."""
    return parse_credentialed_specs([format_credentialed_spec({**e, "root": str(e["root"])}) for e in entries])


# ----------------------------------------------------------------------------------------------
# The key of a row
# ----------------------------------------------------------------------------------------------


def image_key_for_row(row: Mapping[str, Any], sources: Mapping[str, CredentialedSource]) -> ImageKey:
    """The image key of a row read by rows.read_row_batches (a dict with row_id, text, image_path, source, credential, extra)."""
    if row.get("credential") == "yes":
        source = sources.get(row.get("source", ""))
        if source is None:
            return ImageKey(None, None, None, f"no template for the credentialed source {row.get('source')!r}")
        return _map_row(row, source) if source.mapping is not None else _render_template(row, source)
    image_path = row.get("image_path")
    if not image_path:
        return ImageKey(None, None, None, "no image key: image_path is empty")
    return ImageKey(f"{PUBLIC_ROOT_NAME}:{image_path}", PUBLIC_ROOT_NAME, image_path)
