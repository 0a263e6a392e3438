"""Stage 1: dataset rows + image roots -> one row per distinct image, resolved inside its root.

Which rows need an image:
- credential = no (public) rows: those with an `image_path` (relative to the unpacked
  images.tar.gz of medmax_data, the public root). Only with include_public.
- credential = yes rows: those whose text holds `<image>`. They carry no image_path; the config
  names, per credentialed source, a root and either a path template over the row's columns or
  a mapping file (row_id or text_sha256 -> path under the root), parsed by
  image_keys.parse_credentialed_specs and applied by image_keys.image_key_for_row, both shared
  with the assembly stage so both name images alike. A row a mapping has no entry for is a
  problem ("no mapping entry"); a malformed mapping file, or one giving a row two different
  paths, stops the stage with an error naming the file and line.

Several spellings of one file ('./a.jpg', 'a.jpg/', a symlink alias inside the root) each keep
their own image key (assembly joins a row by the key of its own spelling) and share the one
resolved img_path; tokenize encodes such a file once and gives each of its keys the codes.

Every row that needs an image either contributes to one image of image_paths.parquet or gets a
line in image_path_problems.parquet naming its file, line and the reason. Malformed rows found
by rows.read_row_batches go there too. Nothing is dropped silently and one bad row never stops
the stage.

Path safety: a path in row data (or a mapping file) must be relative and free of `..` components; it is resolved
with symlinks followed (Path.resolve(strict=True)) and must stay inside its (resolved) root. A
public image may not resolve into a credentialed root (overlapping roots would otherwise let a
public row publish a credentialed image).

Outputs (in the output folder):
- image_paths.parquet (artifact image_paths): image_key, img_path (absolute, resolved), root_name,
  source, credential, n_rows; sorted by image_key. It is credentialed as soon as one credentialed
  image is listed: it is a local artifact, never one to share.
- image_path_problems.parquet (artifact image_path_problems): file, line, row_id, split, source,
  credential, image_key, reason.
- img_paths.csv: img_path first (the input of the public MedMax tokenization script), then
  image_key and credential; same rows and order as image_paths.parquet. Local only, like it.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow as pa

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.artifacts import ArtifactGroup, ArtifactMeta
from medmax_pipeline.core.image_keys import (
    MAPPING_PREFIX,
    PUBLIC_ROOT_NAME,
    TEMPLATE_PRESETS,
    CredentialedSource,
    image_key_for_row,
    parse_credentialed_specs,
)
from medmax_pipeline.core.paths import relative_path_problem
from medmax_pipeline.core.rows import read_row_batches
from medmax_pipeline.core.settings import add_setting_arguments, setting, values_from_args, workflow_arguments_for

IMAGE_PATHS_FILE = "image_paths.parquet"
PROBLEMS_FILE = "image_path_problems.parquet"
CSV_FILE = "img_paths.csv"

IMAGE_PATHS_SCHEMA = pa.schema(
    [
        ("image_key", pa.string()),
        ("img_path", pa.string()),
        ("root_name", pa.string()),
        ("source", pa.string()),
        ("credential", pa.string()),
        ("n_rows", pa.int64()),
    ]
)

PROBLEMS_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("line", pa.int64()),
        ("row_id", pa.string()),
        ("split", pa.string()),
        ("source", pa.string()),
        ("credential", pa.string()),
        ("image_key", pa.string()),
        ("reason", pa.string()),
    ]
)

CSV_COLUMNS = ("img_path", "image_key", "credential")

# Reason prefixes (the full reason adds detail); tests and summaries group by these.
REASON_MISSING = "missing file"
REASON_NO_TEMPLATE = "no template for the source"
REASON_OUTSIDE = "path outside its root"
REASON_ABSOLUTE = "absolute path in row data"
REASON_NOT_FILE = "not a regular file"
REASON_IN_CREDENTIALED = "public image inside a credentialed root"
REASON_NO_KEY = "no image key"
REASON_NO_MAPPING = "no mapping entry"  # image_keys: a mapping file without the row
REASON_BAD_PATH = "unusable path"
REASON_MALFORMED = "malformed row"
REASON_CATEGORIES = (
    REASON_MISSING, REASON_NO_TEMPLATE, REASON_OUTSIDE, REASON_ABSOLUTE, REASON_NOT_FILE,
    REASON_IN_CREDENTIALED, REASON_NO_KEY, REASON_NO_MAPPING, REASON_BAD_PATH, REASON_MALFORMED,
)


class CollectError(ValueError):
    """The stage cannot run at all (a root is missing, an argument is malformed)."""


@dataclass(frozen=True)
class Root:
    """An image root: its name (public or a credentialed source), as configured and resolved."""

    name: str
    configured: str
    resolved: Path
    credential: str  # 'yes' or 'no'


@dataclass
class _Image:
    img_path: str
    root_name: str
    credential: str
    sources: set[str] = field(default_factory=set)
    n_rows: int = 0


@dataclass(frozen=True)
class CollectResult:
    image_paths: ArtifactMeta
    problems: ArtifactMeta
    csv_path: Path
    n_images: int
    n_problems: int
    problem_counts: dict[str, int]


# ----------------------------------------------------------------------------------------------
# Small pure pieces
# ----------------------------------------------------------------------------------------------


def parse_rows_spec(spec: str) -> tuple[str, Path]:
    """'SPLIT=PATH' -> (split, path)."""
    split, sep, path = spec.partition("=")
    if not sep or not split.strip() or not path.strip():
        raise CollectError(f"--rows {spec!r}: expected SPLIT=PATH, e.g. train=train.jsonl")
    return split.strip(), Path(path.strip())


def row_needs_image(row: Mapping[str, Any]) -> bool:
    """Credentialed rows need an image when their text holds <image>; public rows when they name one."""
    if row.get("credential") == "yes":
        return C.IMAGE_PLACEHOLDER_TOKEN in (row.get("text") or "")
    return bool(row.get("image_path"))


def check_relative_path(relative: str) -> str | None:
    """Why a path taken from row data may not be joined to a root, or None when it may
    (core/paths.relative_path_problem, under collect's problem categories)."""
    problem = relative_path_problem(relative)
    if problem is None:
        return None
    kind, detail = problem
    if kind == "absolute":
        return f"{REASON_ABSOLUTE}: {relative!r}"
    return f"{REASON_OUTSIDE if kind == 'parent' else REASON_BAD_PATH}: {detail}"


def resolve_inside_root(root: Path, relative: str) -> tuple[Path | None, str | None]:
    """(resolved file, None) or (None, reason) for `relative` under the already-resolved `root`.

    Symlinks are followed; the final target must lie inside `root` and be a regular file.
    """
    reason = check_relative_path(relative)
    if reason is not None:
        return None, reason
    candidate = root / relative
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        # A dangling symlink also lands here: it names nothing that could be read.
        return None, f"{REASON_MISSING}: {relative!r} under {root}"
    except (OSError, RuntimeError) as exc:  # symlink loop, permission denied, name too long
        return None, f"{REASON_BAD_PATH}: {relative!r}: {exc.__class__.__name__}: {exc}"
    if not resolved.is_relative_to(root):
        return None, f"{REASON_OUTSIDE}: {relative!r} resolves to {resolved}, outside {root}"
    if not resolved.is_file():
        return None, f"{REASON_NOT_FILE}: {relative!r} resolves to {resolved}"
    return resolved, None


def problem_category(reason: str) -> str:
    """The reason prefix a problem falls under (one of the REASON_* strings)."""
    return next((c for c in REASON_CATEGORIES if reason.startswith(c)), reason.split(":", 1)[0])


def make_root(name: str, configured: str | Path, credential: str) -> Root:
    path = Path(configured).expanduser()
    if not path.is_dir():
        raise CollectError(f"image root {name!r}: folder {configured} does not exist")
    return Root(name, str(configured), path.resolve(strict=True), credential)


# ----------------------------------------------------------------------------------------------
# The stage as a function
# ----------------------------------------------------------------------------------------------


def build_tables(
    row_files: Sequence[tuple[str, str | Path]],
    public_root: str | Path | None,
    credentialed: Sequence[CredentialedSource] = (),
    include_public: bool = True,
    batch_size: int = 8192,
) -> tuple[pa.Table, pa.Table]:
    """(image_paths table, problems table) for the given (split, file) row files and roots."""
    roots = plan_roots([split for split, _ in row_files], public_root, credentialed, include_public)
    scan = RowScan(roots, {s.source: s for s in credentialed}, include_public)
    for split, file in row_files:
        scan.scan_file(split, file, batch_size)
    return image_paths_table(scan.images), problems_table(scan.problems, [split for split, _ in row_files])


def plan_roots(
    splits: Sequence[str], public_root: str | Path | None, credentialed: Sequence[CredentialedSource], include_public: bool,
) -> dict[str, Root]:
    """The image roots by name (each checked to exist and resolved), after refusing a repeated
    split or source and a source that takes the public root's name."""
    if len(set(splits)) != len(splits):
        raise CollectError(f"a split is given twice: {list(splits)}")
    names = [s.source for s in credentialed]
    if len(set(names)) != len(names):
        raise CollectError(f"a credentialed source is given twice: {names}")
    if PUBLIC_ROOT_NAME in names:
        raise CollectError(f"a credentialed source may not be called {PUBLIC_ROOT_NAME!r} (the public root's name)")
    roots: dict[str, Root] = {s.source: make_root(s.source, s.root, "yes") for s in credentialed}
    if include_public:
        if public_root is None:
            raise CollectError("--public-root is required unless --no-include-public is given")
        roots[PUBLIC_ROOT_NAME] = make_root(PUBLIC_ROOT_NAME, public_root, "no")
    return roots


class RowScan:
    """Reads row files one after the other, collecting the distinct images the rows need and a
    problem line for each row whose image cannot be named or found."""

    def __init__(self, roots: Mapping[str, Root], sources: Mapping[str, CredentialedSource], include_public: bool) -> None:
        self.roots = roots
        self.sources = sources
        self.include_public = include_public
        self.credentialed_roots = [r.resolved for r in roots.values() if r.credential == "yes"]
        self.images: dict[str, _Image] = {}
        self.problems: list[tuple[Any, ...]] = []
        # image key -> resolved path or the reason it failed; each image is resolved once however many rows use it.
        self.resolved_cache: dict[str, tuple[str | None, str | None]] = {}

    def add_problem(self, file: str, line: int, row_id: str | None, split: str, source: str | None,
                    credential: str | None, image_key: str | None, reason: str) -> None:
        self.problems.append((file, line, row_id, split, source, credential, image_key, reason))

    def scan_file(self, split: str, file: str | Path, batch_size: int) -> None:
        for batch, row_problems in read_row_batches(file, split, batch_size=batch_size):
            for p in row_problems:
                # A malformed row's credential is unknown; its problem line carries no row data.
                self.add_problem(p.file, p.line, p.row_id, split, None, None, None, f"{REASON_MALFORMED}: {p.reason}")
            for row in batch.to_pylist():
                self.scan_row(split, str(file), row)

    def scan_row(self, split: str, file_str: str, row: dict[str, Any]) -> None:
        if row["credential"] == "no" and not self.include_public:
            return
        if not row_needs_image(row):
            if row["credential"] == "no" and C.IMAGE_PLACEHOLDER_TOKEN in row["text"]:
                # Its image cannot be named, so it cannot be re-derived: say so rather than skip it.
                self.add_problem(file_str, row["line"], row["row_id"], split, row["source"], "no", None,
                                 f"{REASON_NO_KEY}: the text holds <image> but image_path is empty")
            return
        key = image_key_for_row(row, self.sources)
        if key.key is None:
            if row["credential"] == "yes" and row["source"] not in self.sources:
                reason = (f"{REASON_NO_TEMPLATE}: {row['source']!r} is a credentialed source with no "
                          "--credentialed entry (images.credentialed in config.yaml)")
            elif (key.problem or "").startswith((REASON_NO_KEY, REASON_NO_MAPPING)):
                reason = key.problem
            else:  # a template that failed to render
                reason = f"{REASON_NO_KEY}: {key.problem}"
            self.add_problem(file_str, row["line"], row["row_id"], split, row["source"], row["credential"], None, reason)
            return
        root = self.roots[key.root_name]
        img_path, reason = self.resolve(root, key.key, key.relative_path)
        if img_path is None:
            self.add_problem(file_str, row["line"], row["row_id"], split, row["source"], row["credential"], key.key, reason or REASON_BAD_PATH)
            return
        image = self.images.get(key.key)
        if image is None:
            image = self.images[key.key] = _Image(img_path, root.name, root.credential)
        image.sources.add(row["source"])
        image.n_rows += 1

    def resolve(self, root: Root, key: str, relative_path: str) -> tuple[str | None, str | None]:
        """(img_path, None) or (None, reason) for an image key, resolved once; a public image that
        resolves into a credentialed root is refused."""
        if key not in self.resolved_cache:
            resolved, reason = resolve_inside_root(root.resolved, relative_path)
            if resolved is not None and root.credential == "no":
                inside = next((c for c in self.credentialed_roots if resolved.is_relative_to(c)), None)
                if inside is not None:
                    resolved, reason = None, f"{REASON_IN_CREDENTIALED}: {relative_path!r} resolves into {inside}"
            self.resolved_cache[key] = (str(resolved) if resolved is not None else None, reason)
        return self.resolved_cache[key]


def image_paths_table(images: Mapping[str, _Image]) -> pa.Table:
    """One row per distinct image key, sorted by key."""
    ordered = sorted(images)
    return pa.table(
        {
            "image_key": ordered,
            "img_path": [images[k].img_path for k in ordered],
            "root_name": [images[k].root_name for k in ordered],
            # The row sources that use the image, distinct and sorted (public images can be shared across sources).
            "source": [",".join(sorted(images[k].sources)) for k in ordered],
            "credential": [images[k].credential for k in ordered],
            "n_rows": [images[k].n_rows for k in ordered],
        },
        schema=IMAGE_PATHS_SCHEMA,
    )


def problems_table(problems: Sequence[tuple[Any, ...]], splits: Sequence[str]) -> pa.Table:
    """The problem lines in file order, then line order (read_row_batches hands a batch's
    malformed lines over first)."""
    split_order = {split: i for i, split in enumerate(splits)}
    ordered = sorted(problems, key=lambda p: (split_order[p[3]], p[1]))
    return pa.table({name: [p[i] for p in ordered] for i, name in enumerate(PROBLEMS_SCHEMA.names)}, schema=PROBLEMS_SCHEMA)


def _source_params(source: CredentialedSource) -> dict[str, Any]:
    """A credentialed source as lineage params. A template source keeps the keys it always had, so
    the fingerprints of runs without a mapping do not change."""
    params: dict[str, Any] = {"source": source.source, "root": source.root, "root_resolved": str(Path(source.root).resolve())}
    if source.mapping is not None:
        return {**params, "mapping": source.mapping.path, "mapping_key": source.mapping.key_column}
    return {**params, "template": source.template, "path_template": source.path_template}


def write_csv(table: pa.Table, path: str | Path) -> None:
    """img_paths.csv: img_path first (the public tokenization script reads it)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows(zip(*(table.column(c).to_pylist() for c in CSV_COLUMNS)))


def collect(
    row_files: Sequence[tuple[str, str | Path]],
    public_root: str | Path | None,
    output_dir: str | Path,
    credentialed: Sequence[CredentialedSource] = (),
    include_public: bool = True,
) -> CollectResult:
    """Run stage 1 and write its three outputs into `output_dir`."""
    image_table, problem_table = build_tables(row_files, public_root, credentialed, include_public)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    params = {
        "include_public": include_public,
        "public_root": str(public_root) if public_root is not None else None,
        "public_root_resolved": str(Path(public_root).resolve()) if public_root is not None else None,
        "credentialed": [_source_params(s) for s in credentialed],
        "splits": [split for split, _ in row_files],
    }
    # The row files and the image roots are the inputs (a root by its folder identity: names, sizes,
    # times; core/folder_identity); a mapping file is an input too, a credentialed one: it spells out
    # credentialed image paths.
    roots = [*([public_root] if include_public else []), *(s.root for s in credentialed)]
    inputs = [file for _, file in row_files] + [Path(root).expanduser() for root in roots if root is not None]
    mappings = [s.mapping.path for s in credentialed if s.mapping is not None]
    # The three outputs appear together or not at all: a stale CSV never sits beside new artifacts.
    with ArtifactGroup() as outputs:
        image_meta = outputs.write_artifact(image_table, output_dir / IMAGE_PATHS_FILE, artifact="image_paths", inputs=inputs,
                                            credentialed_inputs=mappings, params=params)
        problem_meta = outputs.write_artifact(problem_table, output_dir / PROBLEMS_FILE, artifact="image_path_problems",
                                              inputs=inputs, credentialed_inputs=mappings, params=params)
        csv_path = outputs.write_file(output_dir / CSV_FILE, lambda tmp: write_csv(image_table, tmp))
    counts = Counter(problem_category(r) for r in problem_table.column("reason").to_pylist())
    return CollectResult(image_meta, problem_meta, csv_path, image_table.num_rows, problem_table.num_rows, dict(sorted(counts.items())))


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CollectConfig:
    """collect's settings, the one source of its command line and of the collect rule's options (the
    config.yaml `images:` keys that are no input; tests/test_stage_settings.py checks the schema)."""

    include_public: bool = setting(True, help="list the public rows' images too (default: yes)", key="include_public", identity=True)


def collect_config_from_args(args: argparse.Namespace) -> CollectConfig:
    return CollectConfig(**values_from_args(CollectConfig, args))


def workflow_arguments(section: Mapping[str, Any]) -> list[str]:
    """The collect options for the config.yaml `images:` SECTION (the collect rule passes these)."""
    return workflow_arguments_for(CollectConfig, section)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", action="append", required=True, metavar="SPLIT=PATH",
                        help="a dataset file (jsonl or parquet) and its split name; repeat per split")
    parser.add_argument("--public-root", help="the unpacked medmax_data images folder (public rows' image_path is relative to it)")
    parser.add_argument("--credentialed", action="append", default=[], metavar="SOURCE=ROOT=TEMPLATE|SOURCE=ROOT=mapping:PATH",
                        help=f"a credentialed source, its local image root and a path template (preset: {', '.join(sorted(TEMPLATE_PRESETS))}, "
                        "or a format string over row columns such as 'files/p{subject_id:.2}/p{subject_id}/s{study_id}/{dicom_id}.jpg') "
                        f"or '{MAPPING_PREFIX}PATH', a .csv/.jsonl file mapping row_id or text_sha256 to image_path; repeatable")
    parser.add_argument("--output-dir", required=True, help=f"where {IMAGE_PATHS_FILE}, {PROBLEMS_FILE} and {CSV_FILE} go")
    add_setting_arguments(parser, CollectConfig)


def run(args: argparse.Namespace) -> int:
    row_files = [parse_rows_spec(s) for s in args.rows]
    credentialed = list(parse_credentialed_specs(args.credentialed).values())
    config = collect_config_from_args(args)
    result = collect(row_files, args.public_root, args.output_dir, credentialed, config.include_public)
    print(f"{result.image_paths.path}: {result.n_images} distinct image(s), {result.image_paths.credential}")
    print(f"{result.problems.path}: {result.n_problems} problem(s), {result.problems.credential}")
    for reason, n in result.problem_counts.items():
        print(f"  {n:>8}  {reason}")
    print(f"{result.csv_path}: img_path, image_key, credential")
    return 0
