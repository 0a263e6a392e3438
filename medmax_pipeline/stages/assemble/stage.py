"""Stage 4 itself: one batch of rows to dataset rows and problems (assemble_batch), the run over a
whole row file (assemble, serial or with worker processes) and its command line. What the stage
writes, and its rules, are described in the package's docstring (assemble/__init__.py)."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import time
from collections import deque
from contextlib import ExitStack
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.artifacts import ArtifactGroup, ArtifactWriter, describe_input
from medmax_pipeline.core.image_keys import CredentialedSource, CredentialedSpecError, image_key_for_row, parse_credentialed_specs
from medmax_pipeline.core.parallel_rows import ByteRange, default_workers, map_line_ranges, prefetch, shared_scratch_dir
from medmax_pipeline.core.rows import ROW_SCHEMA, RowProblem, read_jsonl_range, read_row_batches
from medmax_pipeline.core.settings import add_setting_arguments, checked_settings, setting, values_from_args, workflow_arguments_for
from medmax_pipeline.core.sequences import build_sequence
from medmax_pipeline.core.text_tokenizer import encode_texts, load_tokenizer
from medmax_pipeline.stages.assemble.coverage import (
    CREDENTIALED_TEXT,
    CREDENTIALED_TOKENS,
    ERROR_CATEGORIES,
    IMAGE_MISSING,
    IMAGE_UNREADABLE,
    INVALID_TOKENS,
    MALFORMED_ROW,
    NO_IMAGE_KEY,
    TOO_LONG,
    Coverage,
    coverage_summary,
)
from medmax_pipeline.stages.assemble.copied_text import MIN_RESPONSE_CHARS, credentialed_response_digests, rows_with_credentialed_text
from medmax_pipeline.stages.assemble.image_lookup import ImageLookup, load_image_lookup
from medmax_pipeline.stages.assemble.published_check import (
    PUBLISHED_CHECK_SCHEMA,
    PublishedCheck,
    PublishedCounts,
    compare_published_blocks,
    rows_with_credentialed_blocks,
)
from medmax_pipeline.stages.assemble.separator_stats import SeparatorStats
from medmax_pipeline.stages.assemble.sequence_logic import (
    PUBLISHED_MAX_LENGTH,
    check_published_tokens,
    list_array,
    select_lists,
    take_prefixes,
    truncation_lengths,
)

IMAGE_TAG = "<image>"

DATASET_SCHEMA = pa.schema(list(ROW_SCHEMA) + [("n_tokens", pa.int32()), ("truncated", pa.bool_())])
PROBLEM_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("line", pa.int64()),
        ("row_id", pa.string()),
        ("source", pa.string()),
        ("task", pa.string()),
        ("credential", pa.string()),
        ("category", pa.string()),
        ("reason", pa.string()),
    ]
)
OUTPUT_FILES = (
    "dataset.parquet", "dataset_public.parquet", "dataset_problems.parquet", "coverage.parquet", "coverage_summary.txt",
    "separator_stats.parquet", "published_token_check.parquet",
)
DEFAULT_MAX_PUBLISHED_MISMATCH_FRACTION = 0.05


class AssemblyError(Exception):
    """The stage cannot produce its outputs (too many malformed rows, a bad tokenizer, ...)."""


# ----------------------------------------------------------------------------------------------
# Inputs (the image blocks and image problems of other stages: image_lookup.py)
# ----------------------------------------------------------------------------------------------


def parse_credentialed(entries: Sequence[str]) -> dict[str, CredentialedSource]:
    """SOURCE=ROOT=TEMPLATE or SOURCE=ROOT=mapping:PATH strings (as Snakemake passes them) to
    CredentialedSource by source, through the one parser collect uses too."""
    try:
        return parse_credentialed_specs(entries)
    except CredentialedSpecError as exc:
        raise AssemblyError(str(exc)) from None


# ----------------------------------------------------------------------------------------------
# One batch
# ----------------------------------------------------------------------------------------------


@dataclass
class Settings:
    split: str
    max_length: int = C.DEFAULT_MAX_LENGTH
    overflow: str = "truncate"
    published_max_length: int = PUBLISHED_MAX_LENGTH


@dataclass
class BatchResult:
    dataset: pa.RecordBatch
    problems: list[dict[str, Any]]
    published: PublishedCounts = dataclasses.field(default_factory=dict)  # compare_published_blocks of the kept public rows


def _problem(row: Mapping[str, Any], category: str, reason: str, file: str) -> dict[str, Any]:
    return {
        "file": file,
        "line": row["line"],
        "row_id": row["row_id"],
        "source": row.get("source"),
        "task": row.get("task"),
        "credential": row.get("credential"),
        "category": category,
        "reason": reason,
    }


def _encode_texts_fast(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """encode_texts, through encode_batch_fast where the tokenizers library has it: the same ids
    without computing character offsets, which the stage never reads (~20% less BPE time)."""
    fast = getattr(tokenizer, "encode_batch_fast", None)
    if fast is None:
        return encode_texts(tokenizer, texts)
    return [e.ids for e in fast(texts, add_special_tokens=False)]


def assemble_batch(
    batch: pa.RecordBatch,
    settings: Settings,
    file: str,
    sources: Mapping[str, CredentialedSource],
    lookup: ImageLookup,
    tokenizer: Any,
    credentialed_texts: frozenset[bytes] = frozenset(),
) -> BatchResult:
    """Turn one batch of ROW_SCHEMA rows into dataset rows (file order) and problem rows.
    `credentialed_texts`: response digests of the row file's credentialed rows (copied_text.py).
    The steps: check the public rows, compare their published blocks, build the credentialed rows,
    then apply the length limit to both kinds together."""
    rows = _BatchRows.of(batch, file)
    publisher_truncated = _check_public_rows(rows, settings, lookup, credentialed_texts)
    published = _compare_published(rows, lookup)
    built = _build_credentialed_rows(rows, sources, lookup, tokenizer)
    dataset = _dataset_batch(rows, settings, built, publisher_truncated)
    return BatchResult(dataset, rows.problems, published)


_META_COLUMNS = ["row_id", "line", "source", "task", "credential"]


@dataclass
class _BatchRows:
    """One batch as the steps of assemble_batch read it: the published tokens of the whole batch
    without copies (`values`, and `offsets` from 0; rows are sliced out of `values` at the end, in
    one concatenation: pyarrow's take / filter on list columns copied them several times and was
    the most expensive part of the stage), the rows kept so far and the problems found so far."""

    batch: pa.RecordBatch
    file: str
    n_images: np.ndarray  # <image> tags in each row's text
    public_mask: np.ndarray  # credential = no
    values: np.ndarray
    offsets: np.ndarray
    keep: np.ndarray
    problems: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    meta_rows: list[dict[str, Any]] | None = None  # row_id, line, ... of every row, made when a problem needs them

    @classmethod
    def of(cls, batch: pa.RecordBatch, file: str) -> "_BatchRows":
        n_images = pc.fill_null(pc.count_substring(batch.column("text"), IMAGE_TAG), 0).to_numpy(zero_copy_only=False)
        public_mask = pc.equal(batch.column("credential"), "no").to_numpy(zero_copy_only=False)
        tokens = batch.column("tokens")
        offsets = tokens.offsets.to_numpy().astype(np.int64)
        offsets -= offsets[0]
        values = tokens.values.slice(tokens.offsets[0].as_py(), int(offsets[-1])).to_numpy(zero_copy_only=False)
        return cls(batch, file, n_images, public_mask, values, offsets, np.zeros(batch.num_rows, dtype=bool))

    def refuse(self, i: int, category: str, reason: str) -> None:
        """Row i is not kept: it becomes a problem row."""
        self.keep[i] = False
        self.meta_rows = self.meta_rows or self.batch.select(_META_COLUMNS).to_pylist()
        self.problems.append(_problem(self.meta_rows[i], category, reason, self.file))


def _check_public_rows(
    rows: _BatchRows, settings: Settings, lookup: ImageLookup, credentialed_texts: frozenset[bytes]
) -> np.ndarray:
    """Keep the public rows whose published tokens pass the checks (all vectorized: the check is per
    row, so it runs on the whole batch and only the public rows' answers are read); refuse the rest,
    and those whose label is not to be trusted. Returns which rows the publisher truncated."""
    publisher_truncated = np.zeros(rows.batch.num_rows, dtype=bool)
    public_index = np.flatnonzero(rows.public_mask)
    if not public_index.size:
        return publisher_truncated
    has_path = pc.fill_null(pc.greater(pc.utf8_length(rows.batch.column("image_path")), 0), False).to_numpy(zero_copy_only=False)
    reasons, truncated_by_publisher = check_published_tokens(rows.values, rows.offsets, rows.n_images, settings.published_max_length)
    publisher_truncated[public_index] = truncated_by_publisher[public_index]
    for i in public_index.tolist():
        images = rows.n_images[i]
        if images > 0 and not has_path[i]:
            rows.refuse(i, MALFORMED_ROW, f"text has {images} <image> but the row has no image_path")
        elif images == 0 and has_path[i]:
            rows.refuse(i, MALFORMED_ROW, "row has an image_path but its text has no <image>")
        elif reasons[i] is not None:
            rows.refuse(i, INVALID_TOKENS, reasons[i])  # type: ignore[arg-type]
        else:
            rows.keep[i] = True
    _refuse_credentialed_content(rows, lookup, credentialed_texts)
    return publisher_truncated


def _refuse_credentialed_content(rows: _BatchRows, lookup: ImageLookup, credentialed_texts: frozenset[bytes]) -> None:
    """The label is not trusted: a kept public row carrying a credentialed image's block, or whose
    response is a credentialed row's (normalised), is refused (from dataset too, so that
    dataset_public stays exactly the credential = no rows of dataset)."""
    for i, block_number in rows_with_credentialed_blocks(rows.values, rows.offsets, np.flatnonzero(rows.keep), lookup).items():
        reason = f"credential = no, but image block {block_number} of its published tokens is that of a credentialed image"
        rows.refuse(i, CREDENTIALED_TOKENS, reason)
    if credentialed_texts and rows.keep.any():
        texts = rows.batch.column("text").to_pylist()
        for i in rows_with_credentialed_text(texts, np.flatnonzero(rows.keep).tolist(), credentialed_texts):
            reason = "credential = no, but its response is that of a credential = yes row of this file (normalised text)"
            rows.refuse(i, CREDENTIALED_TEXT, reason)


def _compare_published(rows: _BatchRows, lookup: ImageLookup) -> PublishedCounts:
    """compare_published_blocks of the kept public rows (empty without re-derived public blocks)."""
    if not (lookup.public_index and rows.keep.any()):
        return {}
    checked = np.flatnonzero(rows.keep)
    image_paths = rows.batch.column("image_path").take(pa.array(checked)).to_pylist()
    return compare_published_blocks(rows.values, rows.offsets, checked, image_paths, lookup)


def _build_credentialed_rows(
    rows: _BatchRows, sources: Mapping[str, CredentialedSource], lookup: ImageLookup, tokenizer: Any
) -> dict[int, np.ndarray]:
    """Credentialed rows: the sequence built from the text and the locally tokenized image, by row
    (those rows are kept); the rows that cannot be built become problems."""
    cred_index = np.flatnonzero(~rows.public_mask)
    if not cred_index.size:
        return {}
    cred_rows = rows.batch.take(pa.array(cred_index)).select(
        ["row_id", "line", "text", "image_path", "task", "source", "credential", "extra"]
    ).to_pylist()
    good: list[int] = []
    blocks: list[np.ndarray | None] = []
    for i, row in enumerate(cred_rows):
        found = _image_block(row, int(rows.n_images[cred_index[i]]), sources, lookup)
        if isinstance(found, tuple):
            rows.problems.append(_problem(row, *found, rows.file))
        else:
            good.append(i)
            blocks.append(found)
    encoded = _encode_texts_fast(tokenizer, [cred_rows[i]["text"] for i in good]) if good else []
    built: dict[int, np.ndarray] = {}
    for i, ids, block in zip(good, encoded, blocks):
        placeholders = ids.count(C.IMAGE_PLACEHOLDER_ID)
        if placeholders != int(rows.n_images[cred_index[i]]):
            reason = f"text has {rows.n_images[cred_index[i]]} <image> but encodes to {placeholders} id 8711"
            rows.problems.append(_problem(cred_rows[i], MALFORMED_ROW, reason, rows.file))
            continue
        row = int(cred_index[i])
        built[row] = build_sequence(ids, block)
        rows.keep[row] = True
    return built


def _image_block(
    row: Mapping[str, Any], images: int, sources: Mapping[str, CredentialedSource], lookup: ImageLookup
) -> np.ndarray | None | tuple[str, str]:
    """The image block a credentialed row is filled from (None for a text-only row), or the
    (category, reason) of why it cannot be."""
    key = image_key_for_row(row, sources)
    if key.key is None:
        return None if images == 0 else (NO_IMAGE_KEY, key.problem or "no image key")
    if images == 0:
        return MALFORMED_ROW, f"row names image {key.key} but its text has no <image>"
    if key.key in lookup.index:
        return lookup.block(key.key)
    if key.key in lookup.unreadable:
        return IMAGE_UNREADABLE, f"{key.key}: {lookup.unreadable[key.key]}"
    if key.key in lookup.missing:
        return IMAGE_MISSING, f"{key.key}: {lookup.missing[key.key]}"
    return IMAGE_MISSING, f"{key.key}: no image block (not collected or not tokenized)"


def _dataset_batch(rows: _BatchRows, settings: Settings, built: Mapping[int, np.ndarray], publisher_truncated: np.ndarray) -> pa.RecordBatch:
    """Both kinds of kept row together, in file order, after the length limit, as DATASET_SCHEMA."""
    kept = np.flatnonzero(rows.keep)
    bounds = rows.offsets.tolist()
    pieces = [built[i] if i in built else rows.values[bounds[i] : bounds[i + 1]] for i in kept.tolist()]
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    offsets = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    kept, values, offsets, lengths, cut = _length_limit(rows, settings, kept, values, offsets, lengths)
    values, offsets = take_prefixes(values, offsets, cut)
    truncated = (cut < lengths) | publisher_truncated[kept]
    other = [name for name in ROW_SCHEMA.names if name != "tokens"]
    columns = rows.batch.select(other) if len(kept) == rows.batch.num_rows else rows.batch.select(other).take(pa.array(kept))
    arrays = [list_array(values, offsets) if name == "tokens" else columns.column(name) for name in ROW_SCHEMA.names]
    return pa.RecordBatch.from_arrays(
        arrays + [pa.array(np.diff(offsets).astype(np.int32)), pa.array(truncated)], schema=DATASET_SCHEMA
    )


def _length_limit(
    rows: _BatchRows, settings: Settings, kept: np.ndarray, values: np.ndarray, offsets: np.ndarray, lengths: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where each kept sequence is cut (truncation_lengths); rows that do not fit (--overflow drop,
    or nothing left but bos: the first image block does not fit at all) become problems and leave
    the lists. Returns kept rows, values, offsets, lengths and cuts of the rows that remain."""
    cut = truncation_lengths(values, offsets, settings.max_length)
    final = np.ones(len(kept), dtype=bool)
    if settings.overflow == "drop":
        final &= lengths <= settings.max_length
    final &= cut > 1
    if final.all():
        return kept, values, offsets, lengths, cut
    for i, length in zip(kept[~final].tolist(), lengths[~final].tolist()):
        rows.refuse(i, TOO_LONG, f"{length} ids > max length {settings.max_length}")
    values, offsets = select_lists(values, offsets, np.flatnonzero(final))
    return kept[final], values, offsets, lengths[final], cut[final]


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------

# What one batch of the row file becomes: its dataset rows, and (its problems sorted by line, the
# number of input rows it covered, its published-token comparison). The same shape from the serial
# and the parallel path.
Assembled = tuple[pa.RecordBatch, tuple[list[dict[str, Any]], int, PublishedCounts]]


def _assemble_rows(
    batch: pa.RecordBatch, row_problems: Sequence[RowProblem], settings: Settings, file: str,
    sources: Mapping[str, CredentialedSource], lookup: ImageLookup, tokenizer: Any, credentialed_texts: frozenset[bytes],
) -> Assembled:
    """One batch of the row reader (rows and the reader's problems) to an Assembled."""
    result = assemble_batch(batch, settings, file, sources, lookup, tokenizer, credentialed_texts)
    problems = [
        {"file": p.file, "line": p.line, "row_id": p.row_id, "source": None, "task": None, "credential": None,
         "category": MALFORMED_ROW, "reason": p.reason}
        for p in row_problems
    ] + result.problems
    problems.sort(key=lambda p: p["line"])
    return result.dataset, (problems, batch.num_rows + len(row_problems), result.published)


@dataclass(frozen=True)
class _WorkerConfig:
    """What a worker process needs to assemble byte ranges of the row file (picklable)."""

    rows: Path
    settings: Settings
    sources: dict[str, CredentialedSource]
    tokenizer_path: Path
    lookup: ImageLookup  # its codes as an empty array: workers map them from codes_path
    codes_path: Path  # the lookup's codes, raw uint16, written once by the parent
    credentialed_texts: frozenset[bytes]  # response digests of the credentialed rows


_WORKER: dict[str, Any] = {}  # per worker process: config, tokenizer, image lookup


def _init_worker(config: _WorkerConfig) -> None:
    # The image lookup is built once, by the parent: the workers get its keys with the config and
    # map its codes read-only, so its pages are shared instead of loaded and checked again in
    # every worker.
    n_codes = len(config.lookup.index) + len(config.lookup.public_index)
    codes = np.memmap(config.codes_path, np.uint16, "r", shape=(n_codes, C.CODES_PER_IMAGE)) if n_codes else config.lookup.codes
    _WORKER["config"] = config
    _WORKER["tokenizer"] = load_tokenizer(config.tokenizer_path)
    _WORKER["lookup"] = dataclasses.replace(config.lookup, codes=codes)


def _assemble_range(byte_range: ByteRange) -> Assembled:
    """Worker: read and assemble one batch of the row file, given as a byte range."""
    config: _WorkerConfig = _WORKER["config"]
    batch, row_problems = read_jsonl_range(config.rows, config.settings.split, *byte_range)
    return _assemble_rows(
        batch, row_problems, config.settings, str(config.rows), config.sources, _WORKER["lookup"], _WORKER["tokenizer"],
        config.credentialed_texts,
    )


def _default_workers() -> int:
    """One reader per core, up to 4: past that the main process (writing and hashing both
    outputs) is the bottleneck."""
    return default_workers(limit=4)


class _OrderedWriter:
    """An ArtifactWriter fed from its own thread, in submission order. The parquet encoding, zstd
    and hashing release the GIL, so the two dataset outputs are written and fingerprinted side by
    side instead of one after the other in the stage's main thread."""

    def __init__(self, writer: ArtifactWriter, prepare: Callable[[pa.RecordBatch], pa.RecordBatch] | None = None) -> None:
        self.writer = writer
        self.prepare = prepare
        self.thread = ThreadPoolExecutor(1)
        self.pending: deque[Future] = deque()

    def _write(self, batch: pa.RecordBatch) -> None:
        self.writer.write(self.prepare(batch) if self.prepare else batch)

    def submit(self, batch: pa.RecordBatch, max_pending: int = 2) -> None:
        self.pending.append(self.thread.submit(self._write, batch))
        while len(self.pending) > max_pending:  # bounds memory; raises the thread's error here
            self.pending.popleft().result()

    def finish(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.thread.shutdown(wait=True, cancel_futures=True)


def assemble(
    rows: str | Path,
    split: str,
    output_dir: str | Path,
    *,
    tokenizer_path: str | Path,
    image_blocks: str | Path | None = None,
    path_problems: str | Path | None = None,
    token_errors: str | Path | None = None,
    credentialed: Mapping[str, CredentialedSource] | Sequence[str] = (),
    max_length: int = C.DEFAULT_MAX_LENGTH,
    overflow: str = "truncate",
    max_error_fraction: float = 0.01,
    max_published_mismatch_fraction: float = DEFAULT_MAX_PUBLISHED_MISMATCH_FRACTION,
    published_max_length: int = PUBLISHED_MAX_LENGTH,
    batch_size: int = 2048,
    workers: int | None = None,
    log: Any = sys.stdout,
) -> Coverage:
    """Run stage 4 for one split; returns the coverage. Raises AssemblyError past the error fraction
    or past the published-token mismatch fraction.

    workers: processes that read and assemble a jsonl row file (default: one per core, up to 4);
    1 (or a parquet row file) assembles in this process. The outputs are the same either way.
    On any failure no output of this run is left (older ones are removed too), nor any temporary
    file or shared-memory folder of the stage, so a retry starts clean.

    The steps: plan (the arguments checked, the tokenizer loaded), then, with the outputs staged
    in one ArtifactGroup: the inputs opened and described, the batches written (execute), the
    checks of the whole run and the last outputs (finalize); the group publishes all or none."""
    workers = _check_arguments(overflow, max_length, batch_size, max_published_mismatch_fraction, workers)
    plan = _Plan(
        rows=Path(rows), output_dir=Path(output_dir), settings=Settings(split, max_length, overflow, published_max_length),
        sources=parse_credentialed(credentialed) if not isinstance(credentialed, Mapping) else dict(credentialed),
        tokenizer_path=Path(tokenizer_path),
        image_inputs=tuple(Path(p) if p is not None else None for p in (image_blocks, path_problems, token_errors)),
        batch_size=batch_size, workers=workers, max_error_fraction=max_error_fraction,
        max_published_mismatch_fraction=max_published_mismatch_fraction,
    )
    tokenizer = _load_checked_tokenizer(plan)
    started = time.perf_counter()
    outputs = ArtifactGroup([plan.output_dir / name for name in OUTPUT_FILES], on_failure="remove_previous")
    with outputs, ExitStack() as cleanup:  # cleanup (workers, shared memory) runs before the group publishes or aborts
        inputs = _open_inputs(plan, tokenizer, cleanup, log)
        writers = _open_writers(outputs, plan, inputs)
        tally = _Tally(Coverage(plan.settings.split), SeparatorStats(plan.settings.split),
                       PublishedCheck(plan.settings.split, enabled=bool(inputs.lookup.public_index)))
        _execute(inputs.batches, writers, tally)
        summary = _finalize(plan, outputs, writers, inputs, tally)
    elapsed = time.perf_counter() - started
    print(summary, file=log)
    print(f"assembled {tally.n_input} rows in {elapsed:.1f} s ({tally.n_input / max(elapsed, 1e-9):.0f} rows/s)", file=log)
    return tally.coverage


# --- plan -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What one run does, decided from the arguments before any input is read."""

    rows: Path
    output_dir: Path
    settings: Settings
    sources: dict[str, CredentialedSource]
    tokenizer_path: Path
    image_inputs: tuple[Path | None, Path | None, Path | None]  # image_blocks, path_problems, token_errors
    batch_size: int
    workers: int
    max_error_fraction: float
    max_published_mismatch_fraction: float

    @property
    def parallel(self) -> bool:
        return self.workers > 1 and self.rows.suffix != ".parquet"

    @property
    def public_params(self) -> dict[str, Any]:
        """The lineage parameters of dataset_public (nothing about credentialed inputs)."""
        s = self.settings
        return {"split": s.split, "max_length": s.max_length, "overflow": s.overflow, "published_max_length": s.published_max_length,
                "min_copied_response_chars": MIN_RESPONSE_CHARS}

    @property
    def params(self) -> dict[str, Any]:
        """The lineage parameters of the local outputs."""
        return {**self.public_params, "credentialed_sources": sorted(self.sources), "max_error_fraction": self.max_error_fraction,
                "max_published_mismatch_fraction": self.max_published_mismatch_fraction}


def _check_arguments(overflow: str, max_length: int, batch_size: int, max_published_mismatch_fraction: float, workers: int | None) -> int:
    """Refuse settings out of range; returns the number of workers (the default resolved)."""
    if overflow not in ("truncate", "drop"):
        raise AssemblyError(f"--overflow {overflow!r}: expected 'truncate' or 'drop'")
    if max_length < 2:
        raise AssemblyError(f"--max-length {max_length}: expected at least 2")
    if batch_size < 1:
        raise AssemblyError(f"--batch-size {batch_size}: expected at least 1")
    if not 0 <= max_published_mismatch_fraction <= 1:
        raise AssemblyError(f"--max-published-mismatch-fraction {max_published_mismatch_fraction}: expected a fraction in [0, 1]")
    workers = _default_workers() if workers is None else workers
    if workers < 1:
        raise AssemblyError(f"--workers {workers}: expected at least 1")
    return workers


def _load_checked_tokenizer(plan: _Plan) -> Any:
    """The modified text tokenizer, once the row file is known to exist."""
    if not plan.rows.is_file():
        raise FileNotFoundError(f"dataset file {plan.rows} does not exist")
    tokenizer = load_tokenizer(plan.tokenizer_path)
    if encode_texts(tokenizer, [IMAGE_TAG])[0] != [C.IMAGE_PLACEHOLDER_ID]:
        raise AssemblyError(
            f"{plan.tokenizer_path}: '<image>' does not encode to [{C.IMAGE_PLACEHOLDER_ID}]; pass text_tokenizer_modified.json"
        )
    return tokenizer


@dataclass
class _Inputs:
    """The run's inputs, opened: the image lookup, the assembled batches and the lineages."""

    lookup: ImageLookup
    batches: Iterator[Assembled]
    rows_input: dict[str, Any]  # the row file's lineage entry (in parallel, its fingerprint comes once it is read)
    private: list[Any]  # the lineage of the local outputs


def _open_inputs(plan: _Plan, tokenizer: Any, cleanup: ExitStack, log: Any) -> _Inputs:
    """Load the image lookup and the credentialed responses, start the batches (serial or with
    workers; their cleanup goes on `cleanup`) and describe the inputs. The row file is hashed once
    for both lineages. Public lineage: the row file only."""
    lookup = load_image_lookup(*plan.image_inputs, plan.sources)
    # Before any row: a public row may come before the credentialed row whose text it copies.
    credentialed_texts = credentialed_response_digests(plan.rows)
    print(f"{len(credentialed_texts)} distinct credentialed responses of {MIN_RESPONSE_CHARS}+ characters to refuse in public rows",
          file=log)
    if plan.parallel:
        rows_input, batches = _parallel_batches(plan, lookup, credentialed_texts, cleanup)
    else:
        rows_input = describe_input(plan.rows)
        batches = (
            _assemble_rows(batch, row_problems, plan.settings, str(plan.rows), plan.sources, lookup, tokenizer, credentialed_texts)
            for batch, row_problems in prefetch(read_row_batches(plan.rows, plan.settings.split, plan.batch_size))
        )
        cleanup.callback(batches.close)
    private: list[Any] = [rows_input, describe_input(plan.tokenizer_path)]
    private += [p for p in plan.image_inputs if p is not None]
    # A mapping file spells out credentialed image paths: a credentialed input of the local outputs.
    private += [describe_input(s.mapping.path, credentialed=True) for s in plan.sources.values() if s.mapping is not None]
    return _Inputs(lookup, batches, rows_input, private)


def _parallel_batches(
    plan: _Plan, lookup: ImageLookup, credentialed_texts: frozenset[bytes], cleanup: ExitStack
) -> tuple[dict[str, Any], Iterator[Assembled]]:
    """The row file's lineage entry (hashed while it is read: its fingerprint is filled in before
    the writers close) and the batches assembled by worker processes."""
    rows_input: dict[str, Any] = {"path": str(plan.rows), "artifact": None, "fingerprint": None, "credential": "public"}
    scratch_dir = shared_scratch_dir("assemble")
    cleanup.callback(shutil.rmtree, scratch_dir, ignore_errors=True)
    codes_path = scratch_dir / "image_codes.u16"
    lookup.codes.tofile(codes_path)
    # The workers map the file; this process keeps the keys only (a fresh empty array, so the
    # codes' memory is freed, not held by a view).
    lookup.codes = np.zeros((0, C.CODES_PER_IMAGE), np.uint16)
    config = _WorkerConfig(plan.rows, plan.settings, plan.sources, plan.tokenizer_path, lookup, codes_path, credentialed_texts)

    def record_fingerprint(fingerprint: str) -> None:
        rows_input["fingerprint"] = fingerprint

    batches = map_line_ranges(
        plan.rows, plan.batch_size, plan.workers, _assemble_range, initializer=_init_worker, initargs=(config,),
        on_fingerprint=record_fingerprint,
    )
    cleanup.callback(batches.close)  # stops the worker pool before the codes it maps go (callbacks run last in, first out)
    return rows_input, batches


@dataclass(frozen=True)
class _Writers:
    """The streamed outputs, staged in the run's ArtifactGroup."""

    dataset: ArtifactWriter
    public: ArtifactWriter
    problems: ArtifactWriter

    def all(self) -> tuple[ArtifactWriter, ...]:
        return (self.dataset, self.public, self.problems)


def _open_writers(group: ArtifactGroup, plan: _Plan, inputs: _Inputs) -> _Writers:
    def writer(name: str, schema: pa.Schema, lineage: list[Any], params: dict[str, Any], credential: Any = None) -> ArtifactWriter:
        return group.writer(plan.output_dir / f"{name}.parquet", schema, artifact=name, inputs=lineage, params=params, credential=credential)

    return _Writers(
        writer("dataset", DATASET_SCHEMA, inputs.private, plan.params),
        writer("dataset_public", DATASET_SCHEMA, [inputs.rows_input], plan.public_params, "public"),
        writer("dataset_problems", PROBLEM_SCHEMA, inputs.private, plan.params),
    )


# --- execute --------------------------------------------------------------------------------------


@dataclass
class _Tally:
    """What the run counts over its batches: coverage, separators, published check, errors."""

    coverage: Coverage
    separators: SeparatorStats
    published: PublishedCheck
    n_input: int = 0
    n_errors: int = 0
    first_errors: list[str] = dataclasses.field(default_factory=list)

    def add(self, dataset: pa.RecordBatch, problems: list[dict[str, Any]], n_batch: int, published_counts: PublishedCounts) -> None:
        self.n_input += n_batch
        self.coverage.add_filled(dataset)
        self.separators.add(dataset)
        self.published.add(published_counts)
        for problem in problems:
            self.coverage.add_problem(problem)
            if problem["category"] in ERROR_CATEGORIES:
                self.n_errors += 1
                if len(self.first_errors) < 20:
                    self.first_errors.append(f"  {problem['file']}:{problem['line']}: {problem['reason']}")


def _execute(batches: Iterator[Assembled], writers: _Writers, tally: _Tally) -> None:
    """Feed every batch to the writers (the two dataset outputs each from its own thread) and the tally."""
    outputs = [_OrderedWriter(writers.dataset), _OrderedWriter(writers.public, _public_rows)]
    try:
        for dataset, (problems, n_batch, published_counts) in batches:
            for output in outputs:
                output.submit(dataset)
            if problems:
                writers.problems.write(pa.Table.from_pylist(problems, schema=PROBLEM_SCHEMA))
            tally.add(dataset, problems, n_batch, published_counts)
    except BaseException:
        for output in outputs:
            try:
                output.finish()
            except BaseException:  # noqa: S110 (the first error is the one raised)
                pass
        raise
    for output in outputs:
        output.finish()


# --- finalize -------------------------------------------------------------------------------------


def _finalize(plan: _Plan, group: ArtifactGroup, writers: _Writers, inputs: _Inputs, tally: _Tally) -> str:
    """The checks of the whole run, then the outputs completed (staged: the group publishes them).
    Returns the summary."""
    _check_error_fraction(plan, tally)
    _check_published_mismatch(plan.rows, tally.published, plan.max_published_mismatch_fraction)
    _fill_in_rows_fingerprint(plan.rows, inputs.rows_input, writers)
    for writer in writers.all():
        writer.close()
    for table, artifact in ((tally.coverage.table(), "coverage"), (tally.separators.table(), "separator_stats"),
                            (tally.published.table(), "published_token_check")):
        group.write_artifact(table, plan.output_dir / f"{artifact}.parquet", artifact=artifact, inputs=inputs.private, params=plan.params)
    summary = coverage_summary(tally.coverage) + "\n" + tally.published.summary()
    group.write_file(plan.output_dir / "coverage_summary.txt", lambda tmp: tmp.write_text(summary + "\n"))
    return summary


def _check_error_fraction(plan: _Plan, tally: _Tally) -> None:
    if tally.n_input and tally.n_errors / tally.n_input > plan.max_error_fraction:
        raise AssemblyError(
            f"{plan.rows}: {tally.n_errors} of {tally.n_input} rows are malformed ({tally.n_errors / tally.n_input:.2%} > "
            f"--max-error-fraction {plan.max_error_fraction:.2%}); no outputs written. First problems:\n" + "\n".join(tally.first_errors)
        )


def _fill_in_rows_fingerprint(rows: Path, rows_input: dict[str, Any], writers: _Writers) -> None:
    """The writers copied rows_input while its fingerprint was pending (parallel reading): complete it."""
    if rows_input["fingerprint"] is None:
        raise AssemblyError(f"{rows}: the row file was not hashed")  # cannot happen: the planner hashes before its last batch
    for writer in writers.all():
        for entry in writer.lineage["inputs"]:
            if entry["path"] == str(rows) and entry["artifact"] is None:
                entry["fingerprint"] = rows_input["fingerprint"]


def _check_published_mismatch(rows: Path, published: PublishedCheck, max_fraction: float) -> None:
    """Stop when more than `max_fraction` of the compared public images have published tokens that
    differ from the re-derived ones."""
    compared, differing = published.images()
    if compared and len(differing) / compared > max_fraction:
        listed = "\n".join(f"  {key}: {codes} of {C.CODES_PER_IMAGE} codes differ" for key, codes in differing[:10])
        raise AssemblyError(
            f"{rows}: the published tokens of {len(differing)} of {compared} public images differ from the blocks re-derived "
            f"from the images ({len(differing) / compared:.2%} > --max-published-mismatch-fraction {max_fraction:.2%}: "
            f"assemble.max_published_mismatch_fraction); no outputs written. First images:\n{listed}"
        )


def _public_rows(dataset: pa.RecordBatch) -> pa.RecordBatch:
    """The credential = no rows of a dataset batch (what dataset.filter would give, without
    pyarrow's slow copy of the token lists)."""
    public = pc.equal(dataset.column("credential"), "no").to_numpy(zero_copy_only=False)
    if public.all():
        return dataset
    rows = np.flatnonzero(public)
    tokens = dataset.column("tokens")
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    values = tokens.values.to_numpy(zero_copy_only=False)
    values, offsets = select_lists(values, offsets, rows)
    other = [name for name in DATASET_SCHEMA.names if name != "tokens"]
    columns = dataset.select(other).take(pa.array(rows))
    arrays = [list_array(values, offsets) if name == "tokens" else columns.column(name) for name in DATASET_SCHEMA.names]
    return pa.RecordBatch.from_arrays(arrays, schema=DATASET_SCHEMA)


@dataclass(frozen=True)
class AssembleConfig:
    """assemble's settings, the one source of its command line and of the assemble rule's options
    (the config.yaml `assemble:` keys; tests/test_stage_settings.py checks the schema against it).
    The inputs, the split and the output folder are the rule's inputs and outputs, not settings."""

    max_length: int = setting(C.DEFAULT_MAX_LENGTH, help="longest row in ids (longer rows: see --overflow)", key="max_length",
                              identity=True, minimum=2)
    overflow: str = setting("truncate", help="a row longer than --max-length: truncate it or drop it", key="overflow",
                            identity=True, choices=("truncate", "drop"))
    max_error_fraction: float = setting(
        0.01, key="max_error_fraction", minimum=0, maximum=1,
        help="stop, writing nothing, when more than this fraction of the rows are errors (malformed rows, invalid or "
             "credentialed tokens; missing images are counted in the coverage, not errors)")
    max_published_mismatch_fraction: float = setting(
        DEFAULT_MAX_PUBLISHED_MISMATCH_FRACTION, key="max_published_mismatch_fraction", minimum=0, maximum=1,
        help="stop when more than this fraction of the public images whose blocks were re-derived "
             "(images.include_public) have published tokens that differ from them")
    published_max_length: int = setting(PUBLISHED_MAX_LENGTH, help="length at which the publisher truncated rows (accepted without eos)",
                                        key="published_max_length", identity=True, minimum=2)
    batch_size: int = setting(2048, help="rows per batch", key="batch_size", minimum=1)
    workers: int | None = setting(None, help="processes reading and assembling a jsonl row file (default: one per core, up to 4)",
                                  key="workers", minimum=1)


def assemble_config_from_args(args: argparse.Namespace) -> AssembleConfig:
    return checked_settings(AssembleConfig, values_from_args(AssembleConfig, args), AssemblyError)


def workflow_arguments(section: Mapping[str, Any]) -> list[str]:
    """The assemble options for the config.yaml `assemble:` SECTION (the assemble rule passes these)."""
    return workflow_arguments_for(AssembleConfig, section)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", required=True, help="train.jsonl / validation.jsonl (or .parquet) of medmax_data")
    parser.add_argument("--split", required=True, choices=["train", "validation"])
    parser.add_argument("--image-blocks", help="image_blocks.parquet (stage 3)")
    parser.add_argument("--path-problems", help="image_path_problems.parquet (stage 1)")
    parser.add_argument("--token-errors", help="image_token_errors.parquet (stage 2)")
    parser.add_argument("--tokenizer", required=True, help="CKPT/tokenizer/text_tokenizer_modified.json")
    parser.add_argument("--credentialed", action="append", default=[], metavar="SOURCE=ROOT=TEMPLATE|SOURCE=ROOT=mapping:PATH")
    add_setting_arguments(parser, AssembleConfig)
    parser.add_argument("--output-dir", required=True)


def run(args: argparse.Namespace) -> int:
    settings = assemble_config_from_args(args)
    assemble(
        args.rows,
        args.split,
        args.output_dir,
        tokenizer_path=args.tokenizer,
        image_blocks=args.image_blocks,
        path_problems=args.path_problems,
        token_errors=args.token_errors,
        credentialed=args.credentialed,
        **dataclasses.asdict(settings),
    )
    return 0
