"""Stage 3: VQGAN codes -> vocabulary image blocks, after checking the tokenizer's id layout.

An image inside a sequence is [8197] + [code + 4 for each of its 1024 codes] + [8196] (1026 ids,
MEDMAX-FACTS.md). The +4 offset is only true for a tokenizer whose IMGIMG names spell id - 4, so
the stage first checks the tokenizer it is given (text_tokenizer.check_tokenizer_layout) and
stops with the first mismatching id rather than write blocks a model would read as other tokens.

Input: the image_tokens artifact (img_path, image_key, credential, img_tokens, orig_*).
Output: the image_blocks artifact (image_key, img_path, credential, block list<int32> of 1026 ids),
rows in input order. A code outside [0, 8191], a code list of another length than 1024, a null
or a repeated image key stops the stage naming the image: a wrong block would silently corrupt
every row that uses it. A credentialed input (or row) gives a credentialed output.

The block itself and its check live in core/image_blocks.py, shared with assembly and generation.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.artifacts import ArtifactMeta, ArtifactWriter, iter_artifact_batches, read_meta
from medmax_pipeline.core.sequences import ImageBlockError, code_problem, image_blocks_array
from medmax_pipeline.core.settings import add_setting_arguments, checked_settings, setting, values_from_args, workflow_arguments_for
from medmax_pipeline.core.text_tokenizer import check_tokenizer_layout, load_tokenizer

IMAGE_BLOCKS_SCHEMA = pa.schema(
    [
        ("image_key", pa.string()),
        ("img_path", pa.string()),
        ("credential", pa.string()),
        ("block", pa.list_(pa.int32())),
    ]
)
INPUT_COLUMNS = ("image_key", "img_path", "credential", "img_tokens")


# ----------------------------------------------------------------------------------------------
# A batch of the image_tokens artifact -> a batch of image_blocks
# ----------------------------------------------------------------------------------------------


def _describe(batch: pa.RecordBatch, row: int, source: str) -> str:
    key = batch.column("image_key")[row].as_py()
    path = batch.column("img_path")[row].as_py()
    return f"{source}: image {key!r} ({path})"


def blocks_for_batch(batch: pa.RecordBatch, source: str = "image_tokens") -> pa.RecordBatch:
    """Check a batch's codes and turn them into blocks, vectorised; ImageBlockError names the first bad image."""
    missing = [c for c in INPUT_COLUMNS if c not in batch.schema.names]
    if missing:
        raise ImageBlockError(f"{source}: lacks column(s) {', '.join(missing)}")
    for name in ("image_key", "credential"):
        nulls = np.flatnonzero(batch.column(name).is_null().to_numpy(zero_copy_only=False))
        if nulls.size:
            raise ImageBlockError(f"{_describe(batch, int(nulls[0]), source)}: {name} is null")
    codes_col = batch.column("img_tokens")
    if not (pa.types.is_list(codes_col.type) or pa.types.is_large_list(codes_col.type) or pa.types.is_fixed_size_list(codes_col.type)):
        raise ImageBlockError(f"{source}: img_tokens is {codes_col.type}, expected a list of integer codes")
    if not pa.types.is_integer(codes_col.type.value_type):
        raise ImageBlockError(f"{source}: img_tokens holds {codes_col.type.value_type}, expected integer codes")
    n = batch.num_rows
    null_lists = codes_col.is_null().to_numpy(zero_copy_only=False)
    lengths = pc.fill_null(pc.list_value_length(codes_col), -1).to_numpy(zero_copy_only=False)
    bad_rows = np.flatnonzero(null_lists | (lengths != C.CODES_PER_IMAGE))
    if bad_rows.size:
        i = int(bad_rows[0])
        found = "no codes (null)" if null_lists[i] else f"{int(lengths[i])} codes"
        raise ImageBlockError(f"{_describe(batch, i, source)}: {found}, expected {C.CODES_PER_IMAGE} ({bad_rows.size} such image(s) in this batch)")
    flat = pc.list_flatten(codes_col)
    if flat.null_count:
        i = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0]) // C.CODES_PER_IMAGE
        raise ImageBlockError(f"{_describe(batch, i, source)}: a code is null")
    codes = flat.to_numpy(zero_copy_only=False).astype(np.int64, copy=False).reshape(n, C.CODES_PER_IMAGE)
    out_of_range = (codes < 0) | (codes >= C.NUM_IMAGE_CODES)
    if out_of_range.any():
        i = int(np.flatnonzero(out_of_range.any(axis=1))[0])
        raise ImageBlockError(f"{_describe(batch, i, source)}: {code_problem(codes[i])}")
    blocks = image_blocks_array(codes)
    offsets = np.arange(n + 1, dtype=np.int32) * C.IMAGE_BLOCK_LEN
    block_array = pa.ListArray.from_arrays(pa.array(offsets), pa.array(blocks.reshape(-1)))
    return pa.RecordBatch.from_arrays(
        [
            batch.column("image_key").cast(pa.string()),
            batch.column("img_path").cast(pa.string()),
            batch.column("credential").cast(pa.string()),
            block_array,
        ],
        schema=IMAGE_BLOCKS_SCHEMA,
    )


# ----------------------------------------------------------------------------------------------
# The stage as a function
# ----------------------------------------------------------------------------------------------


def check_tokenizer_file(path: str | Path, require_image_placeholder: bool = True) -> None:
    """Refuse a tokenizer whose ids do not follow the Chameleon layout (TokenizerLayoutError)."""
    check_tokenizer_layout(load_tokenizer(path), require_image_placeholder=require_image_placeholder, source=str(path))


def map_vocab(
    tokens_path: str | Path,
    tokenizer_path: str | Path,
    output_path: str | Path,
    batch_size: int = 4096,
    require_image_placeholder: bool = True,
) -> ArtifactMeta:
    """Run stage 3: check the tokenizer, then write the image_blocks artifact (atomically)."""
    check_tokenizer_file(tokenizer_path, require_image_placeholder)
    # Fail on a wrong artifact before any block is computed.
    read_meta(tokens_path)
    seen: set[str] = set()
    with ArtifactWriter(
        output_path,
        IMAGE_BLOCKS_SCHEMA,
        artifact="image_blocks",
        inputs=[tokens_path, tokenizer_path],
        params={
            "image_code_offset": C.IMAGE_CODE_OFFSET,
            "begin_image_id": C.BEGIN_IMAGE_ID,
            "end_image_id": C.END_IMAGE_ID,
            "require_image_placeholder": require_image_placeholder,
        },
    ) as writer:
        for batch in iter_artifact_batches(tokens_path, artifact="image_tokens", batch_size=batch_size, columns=INPUT_COLUMNS):
            out = blocks_for_batch(batch, source=str(tokens_path))
            # One block per image: a repeated key would make the assembly join ambiguous.
            for key in out.column("image_key").to_pylist():
                if key in seen:
                    raise ImageBlockError(f"{tokens_path}: image {key!r} appears more than once")
                seen.add(key)
            writer.write(out)
    assert writer.meta is not None
    return writer.meta


@dataclass(frozen=True)
class VocabConfig:
    """map-vocab's settings, the one source of its command line and of the map_vocab rule's options
    (the config.yaml `vocab:` keys; tests/test_stage_settings.py checks the schema against it)."""

    batch_size: int = setting(4096, help="images per batch (memory: about 12 KiB per image)", key="batch_size", minimum=1)
    # The rules always pass the checkpoint's text_tokenizer_modified.json (common.smk TOKENIZER),
    # so this is for the command line only.
    plain_tokenizer: bool = setting(False, help="the tokenizer is text_tokenizer.json (id 8711 not renamed to <image>): skip that one check")


def vocab_config_from_args(args: argparse.Namespace) -> VocabConfig:
    return checked_settings(VocabConfig, values_from_args(VocabConfig, args), ValueError)


def workflow_arguments(section: Mapping[str, Any]) -> list[str]:
    """The map-vocab options for the config.yaml `vocab:` SECTION (the map_vocab rule passes these)."""
    return workflow_arguments_for(VocabConfig, section)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", required=True, help="the image_tokens artifact of stage 2 (image_tokens.parquet)")
    parser.add_argument("--tokenizer", required=True, help="CKPT/tokenizer/text_tokenizer_modified.json, checked before mapping")
    parser.add_argument("--output", required=True, help="where the image_blocks artifact goes (image_blocks.parquet)")
    add_setting_arguments(parser, VocabConfig)


def run(args: argparse.Namespace) -> int:
    settings = vocab_config_from_args(args)
    meta = map_vocab(args.tokens, args.tokenizer, args.output, settings.batch_size, not settings.plain_tokenizer)
    print(f"{meta.path}: {meta.num_rows} image block(s) of {C.IMAGE_BLOCK_LEN} ids, {meta.credential}")
    return 0
