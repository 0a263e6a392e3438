"""The one parquet writer and reader of the pipeline: versioned, fingerprinted, credential-aware.

Every parquet file a stage writes goes through `write_artifact` or `ArtifactWriter`. Each file
carries footer key/values:

    medmax.artifact         the artifact's name (a key of ARTIFACT_SCHEMA_VERSIONS)
    medmax.schema_version   integer, bumped whenever the artifact's columns change
    medmax.fingerprint      hash of the logical content (independent of row groups and of the
                            pyarrow version that wrote it)
    medmax.lineage          JSON: {"inputs": [{path, artifact, fingerprint, credential}], "params": {...}}
    medmax.credential       "public" or "credentialed"
    medmax.pipeline_version the package version
    medmax.column_fingerprints each column's part of the fingerprint (JSON list, schema order)

Every read verifies the content: read_artifact and iter_artifact_batches hash what they read, as
the writer did, and refuse (ArtifactError naming the file) data that does not give the footer's
fingerprint, so a flipped bit on disk never silently becomes data. A reader of some columns
hashes only those and takes the other columns' digests from the footer. The streaming reader
checks once it has handed over the last batch: its caller must read to the end (every stage does)
and commit its outputs only after that.

Writes are atomic: the file is written under a temporary name in the same folder and renamed
into place only once complete, so a killed write never leaves a file that looks finished. Any
failure (a full disk included, wherever it strikes) removes the temporary file, so a retry once
space is freed starts clean. Files get the usual mode 0666 less the umask, like any file a
program creates, so collaborators can read what the umask lets them.

Credential rule: an artifact is credentialed as soon as a row has credential == "yes" or any
input it was made from is credentialed. Asking for "public" when that holds raises
CredentialLeakError, so no code path can put credentialed data into a shareable artifact. The
rows are checked as the caller hands them over, before they are projected onto the artifact's
schema (a public schema without a credential column cannot launder credential = yes rows), and
values are normalised as the row reader normalises them (surrounding whitespace, any case).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medmax_pipeline import __version__
from medmax_pipeline.core import termination
from medmax_pipeline.core.file_modes import unique_temp_path
from medmax_pipeline.core.folder_identity import folder_fingerprint
from medmax_pipeline.core.rows import CREDENTIAL_VALUES

Credential = Literal["public", "credentialed"]

# Artifact name -> current schema version. Bump a version whenever that artifact's columns change.
ARTIFACT_SCHEMA_VERSIONS: dict[str, int] = {
    "image_paths": 1,
    "image_path_problems": 1,
    "image_tokens": 1,
    "image_tokens_chunk": 1,
    "image_token_errors": 1,
    "image_blocks": 1,
    "dataset": 1,
    "dataset_public": 1,
    "dataset_problems": 1,
    "coverage": 3,  # 2: column credentialed_image_in_public_row; 3: credentialed_text_in_public_row
    "separator_stats": 1,
    "published_token_check": 1,
    "train_metrics": 2,  # 2: without the wall-clock tokens_per_s column
    "predictions": 1,
    "clip_scores": 1,
    "judge_replies": 1,
    "scores": 1,
    "score_summary": 1,
}

KEY_ARTIFACT = "medmax.artifact"
KEY_SCHEMA_VERSION = "medmax.schema_version"
KEY_FINGERPRINT = "medmax.fingerprint"
KEY_LINEAGE = "medmax.lineage"
KEY_CREDENTIAL = "medmax.credential"
KEY_PIPELINE_VERSION = "medmax.pipeline_version"
# Each column's digest (JSON list, schema order): a reader of some columns verifies just those.
KEY_COLUMN_FINGERPRINTS = "medmax.column_fingerprints"
FINGERPRINT_PREFIX = "blake2b:"


class ArtifactError(Exception):
    """An artifact is missing, unreadable, or not what the caller expected."""


class CredentialLeakError(ArtifactError):
    """Credentialed data was about to be written into an artifact marked public."""


@dataclass(frozen=True)
class ArtifactMeta:
    path: str
    artifact: str
    schema_version: int
    fingerprint: str
    lineage: dict[str, Any]
    credential: Credential
    pipeline_version: str
    num_rows: int = 0
    extra: dict[str, str] = field(default_factory=dict)
    column_fingerprints: list[str] | None = None  # None in artifacts written before they were stored


# ----------------------------------------------------------------------------------------------
# Fingerprint: a hash of the logical content, fed column by column and batch by batch, so that
# the same rows give the same hash however they are split into batches or row groups.
# ----------------------------------------------------------------------------------------------


def new_hash() -> "hashlib._Hash":
    return hashlib.blake2b(digest_size=32)


def _le_bytes(values: np.ndarray, dtype: Any) -> memoryview:
    """The bytes of `values` as little-endian `dtype`, for hashing. A view when they already are
    (the usual case): the token ids of a dataset are GBs, and copying them (astype, tobytes)
    before hashing cost as much as the hash. The bytes hashed are the same either way."""
    array = np.ascontiguousarray(values.astype(dtype, copy=False))
    if array.dtype.hasobject:  # no view of object arrays: hashed as before
        return memoryview(array.tobytes())
    return memoryview(array.reshape(-1).view(np.uint8))  # via uint8: datetime arrays have no buffer format


class _ColumnHasher:
    """Hashes one column: validity, then the values in a type-specific canonical encoding."""

    def __init__(self, dtype: pa.DataType) -> None:
        self.dtype = dtype
        self.validity = new_hash()
        self.values = new_hash()
        self.data = new_hash()  # variable-length bytes of string/binary values, apart from their lengths
        self.children: list[_ColumnHasher] = []
        if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
            self.children = [_ColumnHasher(dtype.value_type)]
        elif pa.types.is_struct(dtype):
            self.children = [_ColumnHasher(dtype.field(i).type) for i in range(dtype.num_fields)]
        elif pa.types.is_dictionary(dtype):
            self.children = [_ColumnHasher(dtype.value_type)]

    def update(self, array: pa.Array) -> None:
        if isinstance(array, pa.ChunkedArray):
            for chunk in array.chunks:
                self.update(chunk)
            return
        dtype = self.dtype
        if pa.types.is_dictionary(dtype):
            self.children[0].update(array.dictionary_decode())
            return
        valid = array.is_valid().to_numpy(zero_copy_only=False).astype(np.uint8)
        self.validity.update(valid.tobytes())
        if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
            lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False)
            self.values.update(_le_bytes(lengths, "<i8"))
            self.children[0].update(array.flatten())
        elif pa.types.is_struct(dtype):
            for i, child in enumerate(self.children):
                child.update(array.field(i))
        elif pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_binary(dtype) or pa.types.is_large_binary(dtype):
            as_binary = array.cast(pa.large_binary())
            lengths = pc.fill_null(pc.binary_length(as_binary), 0).to_numpy(zero_copy_only=False)
            self.values.update(_le_bytes(lengths, "<i8"))
            offsets_buf, data_buf = as_binary.buffers()[1], as_binary.buffers()[2]
            if data_buf is not None and len(as_binary) > 0:
                offsets = np.frombuffer(offsets_buf, dtype="<i8")[as_binary.offset : as_binary.offset + len(as_binary) + 1]
                self.data.update(memoryview(data_buf)[int(offsets[0]) : int(offsets[-1])])
        elif pa.types.is_null(dtype):
            pass
        elif pa.types.is_boolean(dtype):
            self.values.update(pc.fill_null(array, False).to_numpy(zero_copy_only=False).astype(np.uint8).tobytes())
        else:
            # Integers, floats, temporal types: fixed-width values, nulls replaced by zero.
            filled = array if array.null_count == 0 else pc.fill_null(array, pa.scalar(0).cast(dtype))
            values = filled.to_numpy(zero_copy_only=False)
            self.values.update(_le_bytes(values, values.dtype.newbyteorder("<")))

    def digest(self) -> bytes:
        h = new_hash()
        h.update(self.validity.digest())
        h.update(self.values.digest())
        h.update(self.data.digest())
        for child in self.children:
            h.update(child.digest())
        return h.digest()


class Fingerprinter:
    """Incremental content hash of a table with a fixed schema.

    `columns` (names of the schema) hashes only those columns, for a reader that reads only them:
    the others' digests then come from the footer (see verify_fingerprint)."""

    def __init__(self, schema: pa.Schema, columns: Sequence[str] | None = None) -> None:
        self.schema = schema
        self.names = list(schema.names if columns is None else columns)
        types = [f.type for f in schema] if columns is None else [schema.field(name).type for name in self.names]
        self.columns = [_ColumnHasher(t) for t in types]
        self.num_rows = 0

    def update(self, data: pa.Table | pa.RecordBatch) -> None:
        """DATA holds the hashed columns in order (a projected read) or the whole schema."""
        by_position = data.num_columns == len(self.names)
        for i, hasher in enumerate(self.columns):
            hasher.update(data.column(i) if by_position else data.column(self.names[i]))
        self.num_rows += data.num_rows

    def column_digests(self) -> list[str]:
        """Each hashed column's digest (hex), in the order of self.names."""
        return [hasher.digest().hex() for hasher in self.columns]

    def hexdigest(self) -> str:
        return combine_fingerprint(self.schema, self.num_rows, self.column_digests())


def combine_fingerprint(schema: pa.Schema, num_rows: int, column_digests: Sequence[str]) -> str:
    """The table's fingerprint from its schema, row count and every column's digest (hex, in order)."""
    h = new_hash()
    header = [[f.name, str(f.type)] for f in schema]
    h.update(json.dumps({"columns": header, "rows": num_rows}).encode())
    for digest in column_digests:
        h.update(bytes.fromhex(digest))
    return FINGERPRINT_PREFIX + h.hexdigest()


def fingerprint_table(table: pa.Table) -> str:
    fp = Fingerprinter(table.schema)
    fp.update(table)
    return fp.hexdigest()


# ----------------------------------------------------------------------------------------------
# Lineage: what an artifact was made from.
# ----------------------------------------------------------------------------------------------


def _hash_file(path: Path) -> str:
    h = new_hash()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return FINGERPRINT_PREFIX + h.hexdigest()


def current_fingerprint(path: str | Path) -> str:
    """An input's identity as a lineage entry records it, one per kind of input: an artifact's
    content fingerprint (its footer), a plain file's content hash, a folder's cheap identity
    (core/folder_identity: names, sizes, times, small config files' contents). describe_input
    records it and `medmax inspect` recomputes it with this one function, so they never disagree."""
    path = Path(path)
    if path.is_file() and path.suffix == ".parquet" and is_artifact(path):
        return read_meta(path).fingerprint
    return _hash_file(path) if path.is_file() else folder_fingerprint(path)


# A folder the pipeline writes (a trained adapter, a converted or merged model) carries this file:
# what made it, from which inputs, and whether anything credentialed went into it. Readers of
# the folder take its credential from here, so the mark follows a model trained on credentialed
# rows into everything computed with it.
PROVENANCE_FILE = "medmax_provenance.json"


def provenance_record(
    kind: str, inputs: Sequence[str | Path | Mapping[str, Any]] = (),
    params: Mapping[str, Any] | None = None, credentialed_inputs: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """A folder's provenance record: kind, lineage, credential (credentialed when any input is),
    version. `inputs` are paths (described with describe_input) or ready lineage entries."""
    entries = [dict(i) if isinstance(i, Mapping) else describe_input(i) for i in inputs]
    entries += [describe_input(i, credentialed=True) for i in credentialed_inputs]
    credential = "credentialed" if any(e["credential"] == "credentialed" for e in entries) else "public"
    return {"kind": kind, "credential": credential, "pipeline_version": __version__,
            "lineage": {"inputs": entries, "params": dict(params or {})}}


def write_provenance(
    folder: str | Path, kind: str, inputs: Sequence[str | Path | Mapping[str, Any]] = (),
    params: Mapping[str, Any] | None = None, credentialed_inputs: Sequence[str | Path] = (),
) -> dict[str, Any]:
    """Write FOLDER/medmax_provenance.json (atomically): provenance_record's record."""
    folder = Path(folder)
    record = provenance_record(kind, inputs, params, credentialed_inputs)
    tmp = folder / f".{PROVENANCE_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=_json_default) + "\n")
    tmp.replace(folder / PROVENANCE_FILE)
    return record


def read_provenance(folder: str | Path) -> dict[str, Any] | None:
    """The provenance record of a folder the pipeline wrote, or None for any other folder."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable provenance record ({exc})") from None
    if not isinstance(record, dict) or record.get("credential") not in ("public", "credentialed"):
        raise ArtifactError(f"{path}: provenance record without a valid 'credential'")
    return record


def describe_input(path: str | Path, credentialed: bool = False) -> dict[str, Any]:
    """Lineage entry for one input: an artifact (its own metadata) or a plain file or folder. A
    folder with a provenance record is credentialed when the record says so."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"lineage input {path} does not exist")
    if path.is_file() and path.suffix == ".parquet" and is_artifact(path):
        meta = read_meta(path)
        return {
            "path": str(path),
            "artifact": meta.artifact,
            "fingerprint": current_fingerprint(path),
            "credential": meta.credential,
        }
    fingerprint = current_fingerprint(path)
    provenance = read_provenance(path) if path.is_dir() else None
    credentialed = credentialed or (provenance is not None and provenance["credential"] == "credentialed")
    return {
        "path": str(path),
        "artifact": provenance.get("kind") if provenance else None,
        "fingerprint": fingerprint,
        "credential": "credentialed" if credentialed else "public",
    }


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    raise TypeError(f"lineage parameter of type {type(value).__name__} is not JSON-serialisable: {value!r}")


CREDENTIAL_COLUMN = "credential"
CREDENTIAL_YES = CREDENTIAL_VALUES[0]  # 'yes'


def normalise_credential(value: str) -> str:
    """A credential value as the row reader (core.rows.validate_row) stores it: stripped, lowercased."""
    return value.strip().lower()


def rows_are_credentialed(data: pa.Table | pa.RecordBatch) -> bool:
    """True when a column named credential (any case, any surrounding whitespace in the name) holds a yes.

    Strings count as yes after normalise_credential (so ' yes', 'YES' and 'yes\n' all do);
    booleans when true. Distinct values are normalised in Python, exactly as the row reader does.
    """
    for index, name in enumerate(data.schema.names):
        if normalise_credential(name) != CREDENTIAL_COLUMN:
            continue
        column = data.column(index)
        if pa.types.is_boolean(column.type):
            if pc.any(column).as_py():
                return True
            continue
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        distinct = pc.unique(column.cast(pa.large_string())).to_pylist()
        if any(v is not None and normalise_credential(v) == CREDENTIAL_YES for v in distinct):
            return True
    return False


def _create_temp_file(path: Path) -> Path:
    """A new empty file next to `path`: core/file_modes.unique_temp_path (owner-tagged name, mode
    0666 less the umask, a dead run's temporaries of `path` removed first)."""
    return unique_temp_path(path)


def _check_artifact_name(artifact: str) -> int:
    if artifact not in ARTIFACT_SCHEMA_VERSIONS:
        raise ArtifactError(
            f"unknown artifact name {artifact!r}; expected one of {sorted(ARTIFACT_SCHEMA_VERSIONS)}"
        )
    return ARTIFACT_SCHEMA_VERSIONS[artifact]


# ----------------------------------------------------------------------------------------------
# Writer
# ----------------------------------------------------------------------------------------------


class ArtifactWriter:
    """Streams record batches into one artifact; metadata and the rename happen on close().

    Use as a context manager: an exception inside the block removes the temporary file and
    leaves any previous artifact at `path` untouched.
    """

    def __init__(
        self,
        path: str | Path,
        schema: pa.Schema,
        *,
        artifact: str,
        inputs: Sequence[str | Path | Mapping[str, Any]] = (),
        credentialed_inputs: Sequence[str | Path] = (),
        params: Mapping[str, Any] | None = None,
        credential: Credential | None = None,
        row_group_size: int = 64 * 1024,
    ) -> None:
        self.path = Path(path)
        self.artifact = artifact
        self.schema_version = _check_artifact_name(artifact)
        self.schema = schema.remove_metadata()
        self.requested_credential = credential
        self.row_group_size = row_group_size
        lineage_inputs = [dict(i) if isinstance(i, Mapping) else describe_input(i) for i in inputs]
        lineage_inputs += [describe_input(p, credentialed=True) for p in credentialed_inputs]
        self.lineage = {"inputs": lineage_inputs, "params": dict(params or {})}
        # Serialise now, so a bad parameter fails before any work is done.
        self._lineage_json = json.dumps(self.lineage, sort_keys=True, default=_json_default)
        self.credentialed = any(i.get("credential") == "credentialed" for i in lineage_inputs)
        self._check_credential()
        self._fingerprinter = Fingerprinter(self.schema)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer: pq.ParquetWriter | None = None
        self.meta: ArtifactMeta | None = None
        self._tmp_path = _create_temp_file(self.path)
        # Dictionary encoding and min/max statistics only for flat columns: for list columns
        # (token ids, image blocks) a dictionary never pays (tens of thousands of distinct ids) and
        # cost ~30% of the write time, and min/max of token ids prune nothing (~10% of it).
        flat_columns = [f.name for f in self.schema if not pa.types.is_nested(f.type)]
        try:
            self._writer = pq.ParquetWriter(
                self._tmp_path, self.schema, compression="zstd", write_statistics=flat_columns, use_dictionary=flat_columns
            )
        except BaseException:
            self._tmp_path.unlink(missing_ok=True)
            raise

    def _check_credential(self) -> None:
        if self.requested_credential == "public" and self.credentialed:
            raise CredentialLeakError(
                f"refusing to write {self.path} ({self.artifact}) as public: it contains "
                "credential = yes rows or is derived from a credentialed input"
            )

    def write(self, data: pa.Table | pa.RecordBatch) -> None:
        if self._writer is None:
            raise ArtifactError(f"writer for {self.path} is closed")
        if data.num_rows == 0:
            return
        # Before projecting onto the schema: a column the artifact does not keep still counts.
        if rows_are_credentialed(data):
            self.credentialed = True
            try:
                self._check_credential()
            except CredentialLeakError:
                self.abort()
                raise
        if not data.schema.remove_metadata().equals(self.schema):
            data = (pa.Table.from_batches([data]) if isinstance(data, pa.RecordBatch) else data).select(
                self.schema.names
            ).cast(self.schema)
        table = data if isinstance(data, pa.Table) else pa.Table.from_batches([data])
        self._writer.write_table(table, row_group_size=self.row_group_size)
        self._fingerprinter.update(table)

    def close(self, publish: bool = True) -> ArtifactMeta:
        """Write the footer and move the file into place; with publish=False the complete file
        stays at its temporary path until publish() (ArtifactGroup renames a set together)."""
        if self._writer is None:
            raise ArtifactError(f"writer for {self.path} is already closed")
        credential: Credential = "credentialed" if self.credentialed else "public"
        metadata = {
            KEY_ARTIFACT: self.artifact,
            KEY_SCHEMA_VERSION: str(self.schema_version),
            KEY_FINGERPRINT: self._fingerprinter.hexdigest(),
            KEY_COLUMN_FINGERPRINTS: json.dumps(self._fingerprinter.column_digests()),
            # Serialised again: a stage may complete an input's entry in self.lineage while it
            # streams (assemble hashes its row file while reading it).
            KEY_LINEAGE: json.dumps(self.lineage, sort_keys=True, default=_json_default),
            KEY_CREDENTIAL: credential,
            KEY_PIPELINE_VERSION: __version__,
        }
        try:
            self._writer.add_key_value_metadata(metadata)
            writer, self._writer = self._writer, None
            writer.close()
            if publish:
                self.publish()
        except BaseException:
            self._writer = None  # a writer whose close failed is not closed again
            self._tmp_path.unlink(missing_ok=True)
            raise
        self.meta = ArtifactMeta(
            path=str(self.path),
            artifact=self.artifact,
            schema_version=self.schema_version,
            fingerprint=metadata[KEY_FINGERPRINT],
            lineage=self.lineage,
            credential=credential,
            pipeline_version=__version__,
            num_rows=self._fingerprinter.num_rows,
        )
        return self.meta

    def publish(self) -> None:
        """Rename the closed artifact's temporary file to its path."""
        os.replace(self._tmp_path, self.path)

    def abort(self) -> None:
        """Drop the temporary file. Never raises for the writer's own failure: on a full disk its
        close fails as the write did, and the original error is the one worth reporting."""
        writer, self._writer = self._writer, None
        try:
            if writer is not None:
                writer.close()
        except Exception:
            pass
        finally:
            self._tmp_path.unlink(missing_ok=True)

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_artifact(
    table: pa.Table,
    path: str | Path,
    *,
    artifact: str,
    inputs: Sequence[str | Path | Mapping[str, Any]] = (),
    credentialed_inputs: Sequence[str | Path] = (),
    params: Mapping[str, Any] | None = None,
    credential: Credential | None = None,
) -> ArtifactMeta:
    """Write a whole table as one artifact (atomically). See ArtifactWriter for the arguments."""
    with ArtifactWriter(
        path,
        table.schema,
        artifact=artifact,
        inputs=inputs,
        credentialed_inputs=credentialed_inputs,
        params=params,
        credential=credential,
    ) as writer:
        writer.write(table)
    assert writer.meta is not None
    return writer.meta


class ArtifactGroup:
    """Outputs of one stage that appear all or none: each is written completely to its own
    temporary file, and only when every one is complete are they renamed into place. An exception
    (or a stop) before that removes every temporary and leaves the previous outputs untouched.

        with ArtifactGroup() as group:
            meta = group.write_artifact(table, path, artifact=...)
            with group.writer(path2, schema, artifact=...) as writer:  # streamed
                writer.write(batch)
            group.write_file(path3, lambda tmp: tmp.write_text(...))   # a plain file

    `outputs` names the whole set: publish refuses (and the group aborts) when one of them was not
    written. on_failure="remove_previous" makes a failure remove the older files at those paths too
    (and the temporaries a dead run left of them), for a stage whose outputs must never look
    complete after a failed run; the default keeps them.
    """

    def __init__(
        self, outputs: Sequence[str | Path] = (), on_failure: Literal["keep_previous", "remove_previous"] = "keep_previous"
    ) -> None:
        if on_failure not in ("keep_previous", "remove_previous"):
            raise ValueError(f"on_failure {on_failure!r}: expected 'keep_previous' or 'remove_previous'")
        self.outputs = [Path(p) for p in outputs]
        self.on_failure = on_failure
        self._writers: list[ArtifactWriter] = []  # open or closed-unpublished
        self._files: list[tuple[Path, Path]] = []  # (temporary, path)

    def writer(self, path: str | Path, schema: pa.Schema, **kwargs: Any) -> "_GroupedWriter":
        """An ArtifactWriter whose close leaves the file staged until the group publishes it."""
        writer = _GroupedWriter(path, schema, **kwargs)
        self._writers.append(writer)
        return writer

    def write_artifact(self, table: pa.Table, path: str | Path, **kwargs: Any) -> ArtifactMeta:
        """write_artifact's counterpart: the whole table as one staged artifact."""
        with self.writer(path, table.schema, **kwargs) as writer:
            writer.write(table)
        assert writer.meta is not None
        return writer.meta

    def write_file(self, path: str | Path, write: Callable[[Path], None]) -> Path:
        """A plain file: `write` fills the temporary path it is given."""
        path = Path(path)
        tmp = unique_temp_path(path)
        self._files.append((tmp, path))
        write(tmp)
        return path

    def publish(self) -> None:
        for writer in self._writers:
            if writer.meta is None:
                raise ArtifactError(f"{writer.path}: its writer was not closed before the group was published")
        staged = {writer.path for writer in self._writers} | {path for _, path in self._files}
        missing = [str(path) for path in self.outputs if path not in staged]
        if missing:
            raise ArtifactError(f"{', '.join(missing)}: not written, so no output of the group is published")
        for writer in self._writers:
            writer.publish()
        for tmp, path in self._files:
            os.replace(tmp, path)
        self._writers, self._files = [], []

    def abort(self) -> None:
        for writer in self._writers:
            writer.abort()
        for tmp, _ in self._files:
            tmp.unlink(missing_ok=True)
        self._writers, self._files = [], []
        if self.on_failure == "remove_previous":
            for path in self.outputs:
                path.unlink(missing_ok=True)
                termination.remove_stale_temporaries(path)

    def __enter__(self) -> "ArtifactGroup":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.publish()
        except BaseException:
            self.abort()
            raise


class _GroupedWriter(ArtifactWriter):
    """An ArtifactWriter of an ArtifactGroup: closing it leaves the file at its temporary path."""

    def close(self, publish: bool = False) -> ArtifactMeta:
        return super().close(publish=publish)


# ----------------------------------------------------------------------------------------------
# Reader
# ----------------------------------------------------------------------------------------------


def is_artifact(path: str | Path) -> bool:
    try:
        kv = pq.read_metadata(path).metadata or {}
    except Exception:
        return False
    return KEY_ARTIFACT.encode() in kv


def read_meta(path: str | Path) -> ArtifactMeta:
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"artifact {path} does not exist")
    try:
        file_meta = pq.read_metadata(path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise ArtifactError(f"{path} is not a readable parquet file: {exc}") from exc
    try:
        kv = {k.decode(): v.decode() for k, v in (file_meta.metadata or {}).items()}
    except UnicodeDecodeError as exc:
        raise ArtifactError(f"{path}: damaged footer (not UTF-8: {exc}); rerun the stage that makes it") from None
    missing = [k for k in (KEY_ARTIFACT, KEY_SCHEMA_VERSION, KEY_FINGERPRINT, KEY_LINEAGE, KEY_CREDENTIAL) if k not in kv]
    if missing:
        raise ArtifactError(f"{path} is not a medmax artifact: footer lacks {', '.join(missing)}")
    try:
        schema_version = int(kv[KEY_SCHEMA_VERSION])
        lineage = json.loads(kv[KEY_LINEAGE])
        columns = json.loads(kv[KEY_COLUMN_FINGERPRINTS]) if KEY_COLUMN_FINGERPRINTS in kv else None
    except ValueError as exc:
        raise ArtifactError(f"{path}: damaged footer ({exc}); rerun the stage that makes it") from None
    if kv[KEY_CREDENTIAL] not in ("public", "credentialed") or not isinstance(lineage, dict):
        raise ArtifactError(f"{path}: damaged footer (credential {kv[KEY_CREDENTIAL]!r}); rerun the stage that makes it")
    if columns is not None and not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
        raise ArtifactError(f"{path}: damaged footer ({KEY_COLUMN_FINGERPRINTS}); rerun the stage that makes it")
    return ArtifactMeta(
        path=str(path),
        artifact=kv[KEY_ARTIFACT],
        schema_version=schema_version,
        fingerprint=kv[KEY_FINGERPRINT],
        lineage=lineage,
        credential=kv[KEY_CREDENTIAL],  # type: ignore[arg-type]
        pipeline_version=kv.get(KEY_PIPELINE_VERSION, "unknown"),
        num_rows=file_meta.num_rows,
        extra={k: v for k, v in kv.items() if not k.startswith("medmax.") and k != "ARROW:schema"},
        column_fingerprints=columns,
    )


def check_meta(meta: ArtifactMeta, artifact: str | None) -> None:
    """Refuse an artifact of another name or of a schema version this code does not know."""
    if artifact is not None and meta.artifact != artifact:
        raise ArtifactError(f"{meta.path}: found artifact {meta.artifact!r}, expected {artifact!r}")
    expected = ARTIFACT_SCHEMA_VERSIONS.get(meta.artifact)
    if expected is None:
        raise ArtifactError(
            f"{meta.path}: found unknown artifact {meta.artifact!r}, expected one of {sorted(ARTIFACT_SCHEMA_VERSIONS)}"
        )
    if meta.schema_version != expected:
        raise ArtifactError(
            f"{meta.path}: found {meta.artifact} schema version {meta.schema_version}, expected {expected} "
            f"(written by medmax-pipeline {meta.pipeline_version}; rerun the stage that makes it)"
        )


def _damaged(path: str | Path, exc: BaseException) -> ArtifactError:
    first_line = (str(exc).splitlines() or [""])[0]
    return ArtifactError(f"{path} is damaged: reading it failed ({type(exc).__name__}: {first_line}); rerun the stage that makes it")


def _written_schema(path: str | Path) -> pa.Schema:
    """The arrow schema as the writer had it (the footer's ARROW:schema): the fingerprint hashed its
    type names, and reading the file back renames a list's item field."""
    kv = pq.read_metadata(path).metadata or {}
    if b"ARROW:schema" not in kv:
        return pq.read_schema(path).remove_metadata()
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(kv[b"ARROW:schema"]))).remove_metadata()


class ContentCheck:
    """Hashes what a reader reads of one artifact, as the writer hashed it, and compares the result
    with the footer's fingerprint (finish). `hashed` are the columns to read: the requested ones,
    or every column when the footer has no per-column digests to stand for the others."""

    def __init__(self, meta: ArtifactMeta, columns: Sequence[str] | None) -> None:
        self.meta = meta
        try:
            self.schema = _written_schema(meta.path)
            read_schema = pq.read_schema(meta.path)
        except Exception as exc:
            raise _damaged(meta.path, exc) from None
        names = self.schema.names
        # Type equality ignores a list's item name, which the parquet round trip changes ('element').
        if read_schema.names != names or not all(a.type.equals(b.type) for a, b in zip(read_schema, self.schema)):
            raise ArtifactError(f"{meta.path}: damaged footer (the parquet schema does not match the arrow schema); rerun the stage that makes it")
        self.columns = list(names if columns is None else columns)
        absent = [c for c in self.columns if c not in names]
        if absent:
            raise ArtifactError(f"{meta.path}: {meta.artifact} has no column(s) {', '.join(absent)} (it has {', '.join(names)})")
        stored = meta.column_fingerprints
        if stored is not None and len(stored) != len(names):
            raise ArtifactError(f"{meta.path}: damaged footer ({len(stored)} column digests for {len(names)} columns); rerun the stage that makes it")
        self.hashed = self.columns if stored is not None else names
        self._fingerprinter = Fingerprinter(self.schema, self.hashed)

    def update(self, data: pa.Table | pa.RecordBatch) -> pa.Table | pa.RecordBatch:
        """Hash DATA (read with columns=self.hashed); return the requested columns of it."""
        self._fingerprinter.update(data)
        return data if self.hashed is self.columns else data.select(self.columns)

    def finish(self) -> None:
        digests = dict(zip(self.hashed, self._fingerprinter.column_digests()))
        stored = self.meta.column_fingerprints
        differ = [n for i, n in enumerate(self.schema.names) if stored is not None and n in digests and digests[n] != stored[i]]
        full = [digests[n] if n in digests else stored[i] for i, n in enumerate(self.schema.names)]  # type: ignore[index]
        if differ or combine_fingerprint(self.schema, self._fingerprinter.num_rows, full) != self.meta.fingerprint:
            where = f" (column(s) {', '.join(differ)})" if differ else ""
            raise ArtifactError(
                f"{self.meta.path}: content does not match the fingerprint in its footer{where}: the file is damaged "
                "or was changed outside the pipeline; rerun the stage that makes it"
            )


def read_artifact(path: str | Path, artifact: str | None = None, columns: Sequence[str] | None = None) -> pa.Table:
    """Read a whole artifact (or some columns of it) after checking its name and schema version;
    refuse content that does not match its fingerprint."""
    meta = read_meta(path)
    check_meta(meta, artifact)
    check = ContentCheck(meta, columns)
    try:
        table = pq.read_table(path, columns=check.hashed)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise _damaged(path, exc) from None
    table = check.update(table)
    check.finish()
    return table.replace_schema_metadata(None)


def iter_artifact_batches(
    path: str | Path, artifact: str | None = None, batch_size: int = 65536, columns: Sequence[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """Stream an artifact's rows in batches after checking its name and schema version. Raises
    ArtifactError after the last batch when the content does not match its fingerprint: read to the
    end before committing anything made from the batches."""
    meta = read_meta(path)
    check_meta(meta, artifact)
    check = ContentCheck(meta, list(columns) if columns else None)
    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=check.hashed)
    except Exception as exc:
        raise _damaged(path, exc) from None
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            break
        except Exception as exc:
            raise _damaged(path, exc) from None
        yield check.update(batch)
    check.finish()


STALE = "(changed since: stale)"


def input_status(entry: Mapping[str, Any]) -> str:
    """'' when a lineage entry's input is as recorded, else why not (STALE, or missing now)."""
    path = Path(entry.get("path", ""))
    if not entry.get("path") or not entry.get("fingerprint"):
        return ""
    if not path.exists():
        return "(missing now)"
    try:
        current = current_fingerprint(path)
    except (OSError, ArtifactError):
        return STALE  # unreadable now: not what was recorded
    return "" if current == entry["fingerprint"] else STALE


def lineage_tree(path: str | Path, depth: int = 0, seen: set[str] | None = None) -> list[str]:
    """Lines describing an artifact and, indented, the inputs it was made from, recursively. Each
    input is compared with what was recorded (input_status); an artifact reached a second time is
    listed once more, compared the same way, without its inputs."""
    seen = set() if seen is None else seen
    meta = read_meta(path)
    pad = "  " * depth
    lines = [f"{pad}{meta.path}: {meta.artifact} v{meta.schema_version} {meta.credential} {meta.fingerprint[:31]} rows={meta.num_rows}"]
    if meta.lineage.get("params") and depth == 0:
        lines.append(f"{pad}  params: {json.dumps(meta.lineage['params'], sort_keys=True)}")
    for entry in meta.lineage.get("inputs", []):
        input_path = str(entry.get("path", "?"))
        status = input_status(entry)
        suffix = f"  {status}" if status else ""
        if Path(input_path).is_file() and is_artifact(input_path) and input_path not in seen:
            seen.add(input_path)
            sub = lineage_tree(input_path, depth + 1, seen)
            sub[0] += suffix
            lines.extend(sub)
            continue
        kind = entry.get("artifact") or ("folder" if Path(input_path).is_dir() else "file")
        again = " (listed above)" if input_path in seen else ""
        lines.append(f"{pad}  {input_path}: {kind} {entry.get('credential')} {str(entry.get('fingerprint'))[:31]}{again}{suffix}")
    return lines


def format_meta(meta: ArtifactMeta) -> str:
    rows = [
        ("file", meta.path),
        (KEY_ARTIFACT, meta.artifact),
        (KEY_SCHEMA_VERSION, str(meta.schema_version)),
        (KEY_FINGERPRINT, meta.fingerprint),
        (KEY_CREDENTIAL, meta.credential),
        (KEY_PIPELINE_VERSION, meta.pipeline_version),
        ("rows", str(meta.num_rows)),
        (KEY_LINEAGE, json.dumps(meta.lineage, indent=2, sort_keys=True)),
    ]
    return "\n".join(f"{k}: {v}" for k, v in rows)
