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
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.artifacts import ArtifactWriter, describe_input, write_artifact
from medmax_pipeline.core.image_keys import CredentialedSource, CredentialedSpecError, image_key_for_row, parse_credentialed_specs
from medmax_pipeline.core.parallel_rows import ByteRange, default_workers, map_line_ranges, prefetch, shared_scratch_dir
from medmax_pipeline.core.rows import ROW_SCHEMA, RowProblem, read_jsonl_range, read_row_batches
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
    `credentialed_texts`: response digests of the row file's credentialed rows (copied_text.py)."""
    problems: list[dict[str, Any]] = []
    n = batch.num_rows
    n_images = pc.fill_null(pc.count_substring(batch.column("text"), IMAGE_TAG), 0).to_numpy(zero_copy_only=False)
    public_mask = pc.equal(batch.column("credential"), "no").to_numpy(zero_copy_only=False)
    # The published tokens of the whole batch, without copies: rows are sliced out of `values`
    # at the end, in one concatenation (pyarrow's take / filter on list columns copied them
    # several times and was the most expensive part of this function).
    tokens = batch.column("tokens")
    offsets = tokens.offsets.to_numpy().astype(np.int64)
    offsets -= offsets[0]
    values = tokens.values.slice(tokens.offsets[0].as_py(), int(offsets[-1])).to_numpy(zero_copy_only=False)
    keep = np.zeros(n, dtype=bool)
    built: dict[int, np.ndarray] = {}  # row -> sequence built for a credentialed row
    pub_truncated = np.zeros(n, dtype=bool)
    meta_rows: list[dict[str, Any]] | None = None  # row_id, line, ... of every row, made when a problem needs them

    # Public rows: published tokens, checked, all vectorized. The check is per row, so it runs
    # on the whole batch and only the public rows' answers are read.
    public_index = np.flatnonzero(public_mask)
    if public_index.size:
        has_path = pc.fill_null(pc.greater(pc.utf8_length(batch.column("image_path")), 0), False).to_numpy(zero_copy_only=False)
        reasons, truncated_by_publisher = check_published_tokens(values, offsets, n_images, settings.published_max_length)
        pub_truncated[public_index] = truncated_by_publisher[public_index]
        for i in public_index.tolist():
            category = None
            images = n_images[i]
            if images > 0 and not has_path[i]:
                category, reason = MALFORMED_ROW, f"text has {images} <image> but the row has no image_path"
            elif images == 0 and has_path[i]:
                category, reason = MALFORMED_ROW, "row has an image_path but its text has no <image>"
            elif reasons[i] is not None:
                category, reason = INVALID_TOKENS, reasons[i]  # type: ignore[assignment]
            if category is None:
                keep[i] = True
                continue
            meta_rows = meta_rows or batch.select(["row_id", "line", "source", "task", "credential"]).to_pylist()
            problems.append(_problem(meta_rows[i], category, reason, file))
        # The label is not trusted: a public row carrying a credentialed image's block is refused
        # (from dataset too, so that dataset_public stays exactly the credential = no rows of dataset).
        for i, block_number in rows_with_credentialed_blocks(values, offsets, np.flatnonzero(keep), lookup).items():
            keep[i] = False
            meta_rows = meta_rows or batch.select(["row_id", "line", "source", "task", "credential"]).to_pylist()
            reason = f"credential = no, but image block {block_number} of its published tokens is that of a credentialed image"
            problems.append(_problem(meta_rows[i], CREDENTIALED_TOKENS, reason, file))
        # The same for text: a public row whose response is a credentialed row's (normalised).
        if credentialed_texts and keep.any():
            texts = batch.column("text").to_pylist()
            for i in rows_with_credentialed_text(texts, np.flatnonzero(keep).tolist(), credentialed_texts):
                keep[i] = False
                meta_rows = meta_rows or batch.select(["row_id", "line", "source", "task", "credential"]).to_pylist()
                reason = "credential = no, but its response is that of a credential = yes row of this file (normalised text)"
                problems.append(_problem(meta_rows[i], CREDENTIALED_TEXT, reason, file))
    published: PublishedCounts = {}
    if lookup.public_index and keep.any():
        checked = np.flatnonzero(keep)
        published = compare_published_blocks(values, offsets, checked, batch.column("image_path").take(pa.array(checked)).to_pylist(), lookup)

    # Credentialed rows: build the sequence from text and the locally tokenized image.
    cred_index = np.flatnonzero(~public_mask)
    if cred_index.size:
        cred_rows = batch.take(pa.array(cred_index)).select(
            ["row_id", "line", "text", "image_path", "task", "source", "credential", "extra"]
        ).to_pylist()
        good: list[int] = []
        blocks: list[np.ndarray | None] = []
        for i, row in enumerate(cred_rows):
            images = int(n_images[cred_index[i]])
            key = image_key_for_row(row, sources)
            if key.key is None:
                if images == 0:
                    good.append(i)  # a text-only row: nothing to look up
                    blocks.append(None)
                else:
                    problems.append(_problem(row, NO_IMAGE_KEY, key.problem or "no image key", file))
                continue
            if images == 0:
                problems.append(_problem(row, MALFORMED_ROW, f"row names image {key.key} but its text has no <image>", file))
            elif key.key in lookup.index:
                good.append(i)
                blocks.append(lookup.block(key.key))
            elif key.key in lookup.unreadable:
                problems.append(_problem(row, IMAGE_UNREADABLE, f"{key.key}: {lookup.unreadable[key.key]}", file))
            elif key.key in lookup.missing:
                problems.append(_problem(row, IMAGE_MISSING, f"{key.key}: {lookup.missing[key.key]}", file))
            else:
                problems.append(_problem(row, IMAGE_MISSING, f"{key.key}: no image block (not collected or not tokenized)", file))
        encoded = _encode_texts_fast(tokenizer, [cred_rows[i]["text"] for i in good]) if good else []
        for i, ids, block in zip(good, encoded, blocks):
            placeholders = ids.count(C.IMAGE_PLACEHOLDER_ID)
            if placeholders != int(n_images[cred_index[i]]):
                problems.append(
                    _problem(cred_rows[i], MALFORMED_ROW, f"text has {n_images[cred_index[i]]} <image> but encodes to {placeholders} id 8711", file)
                )
                continue
            row = int(cred_index[i])
            built[row] = build_sequence(ids, block)
            keep[row] = True

    # Both kinds together, in file order, then the length limit.
    rows = np.flatnonzero(keep)
    bounds = offsets.tolist()
    pieces = [built[i] if i in built else values[bounds[i] : bounds[i + 1]] for i in rows.tolist()]
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    kept_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(lengths, out=kept_offsets[1:])
    kept_values = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    cut = truncation_lengths(kept_values, kept_offsets, settings.max_length)
    final = np.ones(len(rows), dtype=bool)
    if settings.overflow == "drop":
        final &= lengths <= settings.max_length
    final &= cut > 1  # nothing left but bos: the first image block does not fit at all
    if not final.all():
        meta_rows = meta_rows or batch.select(["row_id", "line", "source", "task", "credential"]).to_pylist()
        for i, length in zip(rows[~final].tolist(), lengths[~final].tolist()):
            problems.append(_problem(meta_rows[i], TOO_LONG, f"{length} ids > max length {settings.max_length}", file))
        kept_values, kept_offsets = select_lists(kept_values, kept_offsets, np.flatnonzero(final))
        rows, lengths, cut = rows[final], lengths[final], cut[final]
    kept_values, kept_offsets = take_prefixes(kept_values, kept_offsets, cut)
    truncated = (cut < lengths) | pub_truncated[rows]
    other = [name for name in ROW_SCHEMA.names if name != "tokens"]
    columns = batch.select(other) if len(rows) == n else batch.select(other).take(pa.array(rows))
    arrays = [list_array(kept_values, kept_offsets) if name == "tokens" else columns.column(name) for name in ROW_SCHEMA.names]
    out = pa.RecordBatch.from_arrays(
        arrays + [pa.array(np.diff(kept_offsets).astype(np.int32)), pa.array(truncated)], schema=DATASET_SCHEMA
    )
    return BatchResult(out, problems, published)


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
    file or shared-memory folder of the stage, so a retry starts clean."""
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
    sources = parse_credentialed(credentialed) if not isinstance(credentialed, Mapping) else dict(credentialed)
    rows = Path(rows)
    output_dir = Path(output_dir)
    if not rows.is_file():
        raise FileNotFoundError(f"dataset file {rows} does not exist")
    tokenizer = load_tokenizer(tokenizer_path)
    if encode_texts(tokenizer, [IMAGE_TAG])[0] != [C.IMAGE_PLACEHOLDER_ID]:
        raise AssemblyError(
            f"{tokenizer_path}: '<image>' does not encode to [{C.IMAGE_PLACEHOLDER_ID}]; pass text_tokenizer_modified.json"
        )
    optional = {k: Path(v) if v is not None else None for k, v in (("image_blocks", image_blocks), ("path_problems", path_problems), ("token_errors", token_errors))}
    settings = Settings(split, max_length, overflow, published_max_length)
    parallel = workers > 1 and rows.suffix != ".parquet"
    public_params = {"split": split, "max_length": max_length, "overflow": overflow, "published_max_length": published_max_length,
                     "min_copied_response_chars": MIN_RESPONSE_CHARS}
    params = {**public_params, "credentialed_sources": sorted(sources), "max_error_fraction": max_error_fraction,
              "max_published_mismatch_fraction": max_published_mismatch_fraction}
    coverage = Coverage(split)
    separators = SeparatorStats(split)
    scratch_dir: Path | None = None
    batches: Iterator[Assembled] | None = None
    writers: list[ArtifactWriter] = []
    started = time.perf_counter()
    n_input = 0
    try:
        lookup = load_image_lookup(optional["image_blocks"], optional["path_problems"], optional["token_errors"], sources)
        published = PublishedCheck(split, enabled=bool(lookup.public_index))
        # Before any row: a public row may come before the credentialed row whose text it copies.
        credentialed_texts = credentialed_response_digests(rows)
        print(f"{len(credentialed_texts)} distinct credentialed responses of {MIN_RESPONSE_CHARS}+ characters to refuse in public rows",
              file=log)
        # The row file is hashed once for both lineages. Public lineage: the row file only. In
        # parallel, it is hashed while it is read (its fingerprint is filled in before the writers close).
        if parallel:
            rows_input: dict[str, Any] = {"path": str(rows), "artifact": None, "fingerprint": None, "credential": "public"}
            scratch_dir = shared_scratch_dir("assemble")
            codes_path = scratch_dir / "image_codes.u16"
            lookup.codes.tofile(codes_path)
            # The workers map the file; this process keeps the keys only (a fresh empty array, so the
            # codes' memory is freed, not held by a view).
            lookup.codes = np.zeros((0, C.CODES_PER_IMAGE), np.uint16)
            config = _WorkerConfig(rows, settings, sources, Path(tokenizer_path), lookup, codes_path, credentialed_texts)

            def record_fingerprint(fingerprint: str) -> None:
                rows_input["fingerprint"] = fingerprint

            batches = map_line_ranges(
                rows, batch_size, workers, _assemble_range, initializer=_init_worker, initargs=(config,), on_fingerprint=record_fingerprint
            )
        else:
            rows_input = describe_input(rows)
            batches = (
                _assemble_rows(batch, row_problems, settings, str(rows), sources, lookup, tokenizer, credentialed_texts)
                for batch, row_problems in prefetch(read_row_batches(rows, split, batch_size))
            )
        private_inputs: list[Any] = [rows_input, describe_input(tokenizer_path)]
        private_inputs += [p for p in optional.values() if p is not None]
        # A mapping file spells out credentialed image paths: a credentialed input of the local outputs.
        private_inputs += [describe_input(s.mapping.path, credentialed=True) for s in sources.values() if s.mapping is not None]
        n_errors = 0
        first_errors: list[str] = []
        for name, schema, artifact, inputs, artifact_params, credential in (
            ("dataset.parquet", DATASET_SCHEMA, "dataset", private_inputs, params, None),
            ("dataset_public.parquet", DATASET_SCHEMA, "dataset_public", [rows_input], public_params, "public"),
            ("dataset_problems.parquet", PROBLEM_SCHEMA, "dataset_problems", private_inputs, params, None),
        ):
            writers.append(ArtifactWriter(output_dir / name, schema, artifact=artifact, inputs=inputs, params=artifact_params, credential=credential))
        dataset_writer, public_writer, problem_writer = writers
        outputs = [_OrderedWriter(dataset_writer), _OrderedWriter(public_writer, _public_rows)]
        try:
            for dataset, (problems, n_batch, published_counts) in batches:
                n_input += n_batch
                for output in outputs:
                    output.submit(dataset)
                if problems:
                    problem_writer.write(pa.Table.from_pylist(problems, schema=PROBLEM_SCHEMA))
                coverage.add_filled(dataset)
                separators.add(dataset)
                published.add(published_counts)
                for problem in problems:
                    coverage.add_problem(problem)
                    if problem["category"] in ERROR_CATEGORIES:
                        n_errors += 1
                        if len(first_errors) < 20:
                            first_errors.append(f"  {problem['file']}:{problem['line']}: {problem['reason']}")
        except BaseException:
            for output in outputs:
                try:
                    output.finish()
                except BaseException:  # noqa: S110 (the first error is the one raised)
                    pass
            raise
        for output in outputs:
            output.finish()
        if n_input and n_errors / n_input > max_error_fraction:
            raise AssemblyError(
                f"{rows}: {n_errors} of {n_input} rows are malformed ({n_errors / n_input:.2%} > --max-error-fraction "
                f"{max_error_fraction:.2%}); no outputs written. First problems:\n" + "\n".join(first_errors)
            )
        _check_published_mismatch(rows, published, max_published_mismatch_fraction)
        if rows_input["fingerprint"] is None:
            raise AssemblyError(f"{rows}: the row file was not hashed")  # cannot happen: the planner hashes before its last batch
        for writer in writers:  # the writers copied rows_input while its fingerprint was pending
            for entry in writer.lineage["inputs"]:
                if entry["path"] == str(rows) and entry["artifact"] is None:
                    entry["fingerprint"] = rows_input["fingerprint"]
        for writer in writers:
            writer.close()
        write_artifact(coverage.table(), output_dir / "coverage.parquet", artifact="coverage", inputs=private_inputs, params=params)
        write_artifact(separators.table(), output_dir / "separator_stats.parquet", artifact="separator_stats", inputs=private_inputs, params=params)
        write_artifact(published.table(), output_dir / "published_token_check.parquet", artifact="published_token_check",
                       inputs=private_inputs, params=params)
        summary = coverage_summary(coverage) + "\n" + published.summary()
        (output_dir / "coverage_summary.txt").write_text(summary + "\n")
    except BaseException:
        for writer in writers:
            writer.abort()
        _remove_outputs(output_dir)
        raise
    finally:
        if batches is not None:
            batches.close()  # stops the worker pool (if any) before the codes it maps go
        if scratch_dir is not None:
            shutil.rmtree(scratch_dir, ignore_errors=True)
    elapsed = time.perf_counter() - started
    print(summary, file=log)
    print(f"assembled {n_input} rows in {elapsed:.1f} s ({n_input / max(elapsed, 1e-9):.0f} rows/s)", file=log)
    return coverage


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


def _remove_outputs(output_dir: Path) -> None:
    """Remove every output of the stage and the temporary files its writers may have left: nothing
    stale may look like the result of a run, and a retry starts from a clean folder."""
    for name in OUTPUT_FILES:
        (output_dir / name).unlink(missing_ok=True)
        for temporary in output_dir.glob(f".{name}.*.tmp"):  # ArtifactWriter's temporary names
            temporary.unlink(missing_ok=True)


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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", required=True, help="train.jsonl / validation.jsonl (or .parquet) of medmax_data")
    parser.add_argument("--split", required=True, choices=["train", "validation"])
    parser.add_argument("--image-blocks", help="image_blocks.parquet (stage 3)")
    parser.add_argument("--path-problems", help="image_path_problems.parquet (stage 1)")
    parser.add_argument("--token-errors", help="image_token_errors.parquet (stage 2)")
    parser.add_argument("--tokenizer", required=True, help="CKPT/tokenizer/text_tokenizer_modified.json")
    parser.add_argument("--credentialed", action="append", default=[], metavar="SOURCE=ROOT=TEMPLATE|SOURCE=ROOT=mapping:PATH")
    parser.add_argument("--max-length", type=int, default=C.DEFAULT_MAX_LENGTH)
    parser.add_argument("--overflow", choices=["truncate", "drop"], default="truncate")
    parser.add_argument("--max-error-fraction", type=float, default=0.01)
    parser.add_argument("--max-published-mismatch-fraction", type=float, default=DEFAULT_MAX_PUBLISHED_MISMATCH_FRACTION,
                        help="stop when more than this fraction of the public images whose blocks were re-derived "
                             "(images.include_public) have published tokens that differ from them")
    parser.add_argument("--published-max-length", type=int, default=PUBLISHED_MAX_LENGTH,
                        help="length at which the publisher truncated rows (accepted without eos)")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=None,
                        help="processes reading and assembling a jsonl row file (default: one per core, up to 4)")
    parser.add_argument("--output-dir", required=True)


def run(args: argparse.Namespace) -> int:
    assemble(
        args.rows,
        args.split,
        args.output_dir,
        tokenizer_path=args.tokenizer,
        image_blocks=args.image_blocks,
        path_problems=args.path_problems,
        token_errors=args.token_errors,
        credentialed=args.credentialed,
        max_length=args.max_length,
        overflow=args.overflow,
        max_error_fraction=args.max_error_fraction,
        max_published_mismatch_fraction=args.max_published_mismatch_fraction,
        published_max_length=args.published_max_length,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    return 0
