"""Public rows carrying a credentialed row's text: the label is not trusted for text either.

A credential = no row whose response (the text after its first separator `<reserved08706>`, the
whole text when it has none: the part training learns to produce) equals, once normalised, the
response of a credential = yes row of the same row file is refused, category
credentialed_text_in_public_row: it reaches neither dataset nor dataset_public.

Normalised: Unicode NFKC, casefolded, every run of whitespace one space, stripped; so a copy with
changed case, spacing, line breaks or compatibility characters (full-width letters, ligatures,
no-break spaces) still matches. Compared as 16-byte blake2b digests, so the credentialed texts
are not held, only their digests (one set, built by a pre-pass over the row file before any row
is assembled: a public row may come before the credentialed row it copies).

Only responses of at least MIN_RESPONSE_CHARS normalised characters are compared: short answers
('yes', 'no', 'A', 'No acute cardiopulmonary process.') occur in public and credentialed rows
alike without anything being copied, and one-sentence radiology boilerplate is common to public
and credentialed report sources. A copied report is hundreds of characters; 64 leaves out short
answers and single boilerplate sentences. Coincidental matches above it stay possible (shared
multi-sentence boilerplate): such rows are refused too (the safe side) and are visible in
dataset_problems and the coverage, but they do not count toward --max-error-fraction (unlike a
copied image block, a match of text is not proof of a broken input).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow.parquet as pq

from medmax_pipeline.core import constants as C

MIN_RESPONSE_CHARS = 64

_CREDENTIAL_KEY = b'"credential"'
# A line whose only "credential" key says no (any case, padded): a public row, not decoded.
_PUBLIC_LABEL = re.compile(rb'"credential"[ \t\r\n]*:[ \t\r\n]*"[ \t]*[nN][oO][ \t]*"')


def response_text(text: str) -> str:
    """The response part of a row's text: after the first separator, or the whole text without one."""
    _, separator, response = text.partition(C.SEPARATOR_TOKEN)
    return response if separator else text


def normalise(text: str) -> str:
    """NFKC, casefold, whitespace runs (str.isspace) collapsed to one space, stripped."""
    if not text.isascii():  # NFKC leaves ASCII as it is (most rows: skipped)
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.casefold().split())


def response_digest(text: str) -> bytes | None:
    """The digest of a row's normalised response, or None when it is too short to compare."""
    response = normalise(response_text(text))
    if len(response) < MIN_RESPONSE_CHARS:
        return None
    # surrogatepass: a lone surrogate (a bad row, refused elsewhere) must not stop the pre-pass.
    return hashlib.blake2b(response.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _is_public_label(value: object) -> bool:
    return isinstance(value, str) and value.strip().lower() == "no"


def _credentialed_texts_jsonl(path: Path) -> Iterator[str]:
    """Texts of the jsonl rows not labelled credential = no. A superset of the rows the reader
    keeps as credential = yes (rows it refuses for another reason count too: their text is no
    less credentialed); only lines whose one "credential" key plainly says no are skipped
    without decoding (public rows: their ~9 KB of token ids are never parsed here)."""
    with open(path, "rb") as f:
        for raw_line in f:
            at = raw_line.find(_CREDENTIAL_KEY)
            if at >= 0 and raw_line.find(_CREDENTIAL_KEY, at + 1) < 0 and _PUBLIC_LABEL.match(raw_line, at):
                continue
            try:
                row = json.loads(raw_line)
            except (ValueError, RecursionError):
                continue  # unreadable: no text to take (the reader reports the line)
            if isinstance(row, dict) and isinstance(row.get("text"), str) and not _is_public_label(row.get("credential")):
                yield row["text"]


def _credentialed_texts_parquet(path: Path) -> Iterator[str]:
    parquet = pq.ParquetFile(path)
    if not {"text", "credential"} <= set(parquet.schema_arrow.names):
        return  # the reader refuses every row of such a file
    for batch in parquet.iter_batches(batch_size=8192, columns=["text", "credential"]):
        for text, credential in zip(batch.column("text").to_pylist(), batch.column("credential").to_pylist()):
            if isinstance(text, str) and not _is_public_label(credential):
                yield text


def digests_of(texts: Iterable[str]) -> frozenset[bytes]:
    return frozenset(d for d in map(response_digest, texts) if d is not None)


def credentialed_response_digests(rows: Path) -> frozenset[bytes]:
    """Digests of the responses (long enough to compare) of every row of `rows` (jsonl or
    parquet) that is not labelled credential = no."""
    texts = _credentialed_texts_parquet(rows) if rows.suffix == ".parquet" else _credentialed_texts_jsonl(rows)
    return digests_of(texts)


def rows_with_credentialed_text(texts: list[str | None], rows: Iterable[int], digests: frozenset[bytes]) -> list[int]:
    """Those of `rows` (indices into `texts`) whose response is that of a credentialed row."""
    if not digests:
        return []
    return [i for i in rows if texts[i] is not None and response_digest(texts[i]) in digests]  # type: ignore[arg-type]
