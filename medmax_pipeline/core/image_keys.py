"""Which image a dataset row refers to: its image key, computed from the row alone.

An image key is "<root name>:<path relative to that root>". Public rows (credential = no) name
their image in `image_path`, relative to the public images archive: key "public:<image_path>".
Credentialed rows (credential = yes) carry no image_path; the config gives, for each
credentialed source, a root and a path template over the row's columns (its `extra` columns
included): key "<source>:<rendered template>". Both collect (which resolves keys to files inside
the roots) and assembly (which joins image blocks back to rows) call `image_key_for_row`, so the
two stages cannot disagree.

A key is the row's own spelling, not the file: two spellings of one file ('./a.jpg' and 'a.jpg',
or a symlink alias) are two keys with one resolved file, which collect lists and tokenize
encodes once for both; nothing here needs the file system.

Templates are Python format strings; a format spec may cut a value: "{subject_id:.2}" is the
first two characters of subject_id.
"""

from __future__ import annotations

from dataclasses import dataclass
from string import Formatter
from typing import Any, Mapping, Sequence

from medmax_pipeline.core.rows import row_extra

PUBLIC_ROOT_NAME = "public"

# Presets for credentialed sources. MIMIC-CXR-JPG: files/p{first 2 digits}/p{subject}/s{study}/{dicom}.jpg
TEMPLATE_PRESETS: dict[str, str] = {
    "mimic_cxr_jpg": "files/p{subject_id:.2}/p{subject_id}/s{study_id}/{dicom_id}.jpg",
}


@dataclass(frozen=True)
class CredentialedSource:
    source: str
    root: str
    template: str  # a preset name or a format string

    @property
    def path_template(self) -> str:
        return TEMPLATE_PRESETS.get(self.template, self.template)


@dataclass(frozen=True)
class ImageKey:
    key: str | None  # None when the row's image cannot be named
    root_name: str | None
    relative_path: str | None
    problem: str | None = None  # why key is None: "no image key", "no template for the source", ...


def credentialed_sources_from_config(entries: Sequence[Mapping[str, Any]]) -> dict[str, CredentialedSource]:
    return {e["source"]: CredentialedSource(e["source"], str(e["root"]), e["template"]) for e in entries}


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in Formatter().parse(template) if name]


def image_key_for_row(row: Mapping[str, Any], sources: Mapping[str, CredentialedSource]) -> ImageKey:
    """The image key of a row read by rows.read_row_batches (a dict with image_path, source, credential, extra)."""
    if row.get("credential") == "yes":
        source = sources.get(row.get("source", ""))
        if source is None:
            return ImageKey(None, None, None, f"no template for the credentialed source {row.get('source')!r}")
        values = {**row_extra(dict(row)), **{k: v for k, v in row.items() if k != "extra"}}
        missing = [f for f in template_fields(source.path_template) if values.get(f) in (None, "")]
        if missing:
            return ImageKey(None, source.source, None, f"no image key: row lacks {', '.join(missing)} for the {source.source} template")
        try:
            relative = source.path_template.format(**{k: str(v) for k, v in values.items()})
        except (KeyError, ValueError, IndexError) as exc:
            return ImageKey(None, source.source, None, f"template {source.path_template!r} failed: {exc}")
        return ImageKey(f"{source.source}:{relative}", source.source, relative)
    image_path = row.get("image_path")
    if not image_path:
        return ImageKey(None, None, None, "no image key: image_path is empty")
    return ImageKey(f"{PUBLIC_ROOT_NAME}:{image_path}", PUBLIC_ROOT_NAME, image_path)
