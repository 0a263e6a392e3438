"""Stage 3 (map-vocab): image blocks, the tokenizer check before mapping, bad codes named by image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from medmax_pipeline import cli
from medmax_pipeline.core import constants as C
from medmax_pipeline.core.artifacts import read_artifact, read_meta, write_artifact
from medmax_pipeline.core.text_tokenizer import TokenizerLayoutError, build_chameleon_tokenizer, image_token_name, load_tokenizer
from medmax_pipeline.core.sequences import ImageBlockError, check_image_block, find_image_blocks, image_block, stray_end_ids
from medmax_pipeline.stages.vocab import blocks_for_batch, map_vocab

CORPUS = ["the chest radiograph shows no acute disease", "is there a fracture? yes", "histology of the liver"] * 5


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_chameleon_tokenizer(tmp_path_factory.mktemp("tok"), CORPUS, text_vocab_size=100)


def tokens_table(codes: list[list[int]], credential: list[str] | None = None, type_: pa.DataType = pa.list_(pa.int16())) -> pa.Table:
    n = len(codes)
    return pa.table(
        {
            "img_path": [f"/images/img_{i}.png" for i in range(n)],
            "image_key": [f"public:img_{i}.png" for i in range(n)],
            "credential": credential or ["no"] * n,
            "img_tokens": pa.array(codes, type_),
            "orig_width": pa.array([600] * n, pa.int32()),
            "orig_height": pa.array([512] * n, pa.int32()),
            "orig_mode": ["RGB"] * n,
        }
    )


def random_codes(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, C.NUM_IMAGE_CODES, size=(n, C.CODES_PER_IMAGE))
    codes[0, :2] = [0, C.NUM_IMAGE_CODES - 1]  # both ends of the code range
    return codes.tolist()


def rewrite_tokenizer(src: Path, dst: Path, renames: dict[str, str]) -> Path:
    """Copy a tokenizer JSON with token names changed (in the BPE vocab and the added tokens alike)."""
    data = json.loads(src.read_text())
    for added in data["added_tokens"]:
        added["content"] = renames.get(added["content"], added["content"])
    data["model"]["vocab"] = {renames.get(name, name): i for name, i in data["model"]["vocab"].items()}
    dst.write_text(json.dumps(data))
    return dst


def test_image_block_known_answer() -> None:
    codes = list(range(C.CODES_PER_IMAGE))
    codes[-1] = C.NUM_IMAGE_CODES - 1
    block = image_block(codes)
    assert len(block) == C.IMAGE_BLOCK_LEN == 1026
    assert block[:4] == [8197, 4, 5, 6]
    assert block[-2:] == [8195, 8196]
    assert check_image_block(block) is None


@pytest.mark.parametrize("codes, message", [([0] * 1023, "1023 codes"), ([0] * 1023 + [8192], "code 8192 at position 1023"), ([-1] + [0] * 1023, "code -1")])
def test_image_block_refuses_bad_codes(codes: list[int], message: str) -> None:
    with pytest.raises(ImageBlockError, match=message):
        image_block(codes)


def test_map_vocab_known_answer_and_lineage(tmp_path: Path, tokenizers: tuple[Path, Path]) -> None:
    codes = random_codes(5)
    tokens = tmp_path / "image_tokens.parquet"
    write_artifact(tokens_table(codes), tokens, artifact="image_tokens")
    out = tmp_path / "image_blocks.parquet"
    meta = map_vocab(tokens, tokenizers[1], out, batch_size=2)  # several batches
    table = read_artifact(out, artifact="image_blocks")
    assert table.schema.field("block").type == pa.list_(pa.int32())
    assert table.column("image_key").to_pylist() == [f"public:img_{i}.png" for i in range(5)]
    assert table.column("block").to_pylist() == [[8197] + [c + 4 for c in row] + [8196] for row in codes]
    assert meta.credential == "public"
    assert [i["path"] for i in meta.lineage["inputs"]] == [str(tokens), str(tokenizers[1])]
    # Each block's image ids decode, through the tokenizer itself, to the code it stands for.
    tok = load_tokenizer(tokenizers[1])
    first = table.column("block")[0].as_py()
    assert tok.id_to_token(first[1]) == image_token_name(codes[0][0])
    assert tok.id_to_token(first[0]) == C.BEGIN_IMAGE_TOKEN and tok.id_to_token(first[-1]) == C.END_IMAGE_TOKEN


def test_credentialed_input_gives_credentialed_output(tmp_path: Path, tokenizers: tuple[Path, Path]) -> None:
    tokens = tmp_path / "image_tokens.parquet"
    write_artifact(tokens_table(random_codes(2), credential=["no", "yes"]), tokens, artifact="image_tokens")
    meta = map_vocab(tokens, tokenizers[1], tmp_path / "blocks.parquet")
    assert read_meta(tokens).credential == "credentialed"
    assert meta.credential == "credentialed"
    assert read_artifact(tmp_path / "blocks.parquet").column("credential").to_pylist() == ["no", "yes"]


def test_out_of_range_code_names_the_image(tmp_path: Path, tokenizers: tuple[Path, Path]) -> None:
    codes = random_codes(3)
    codes[2][17] = C.NUM_IMAGE_CODES
    tokens = tmp_path / "image_tokens.parquet"
    write_artifact(tokens_table(codes), tokens, artifact="image_tokens")
    out = tmp_path / "blocks.parquet"
    with pytest.raises(ImageBlockError, match=r"'public:img_2.png' \(/images/img_2.png\).*code 8192 at position 17"):
        map_vocab(tokens, tokenizers[1], out)
    assert not out.exists()  # nothing half-written


def test_wrong_length_names_the_image(tmp_path: Path) -> None:
    codes = random_codes(3)
    codes[1] = codes[1][:1000]
    batch = tokens_table(codes).to_batches()[0]
    with pytest.raises(ImageBlockError, match=r"'public:img_1.png'.*1000 codes, expected 1024"):
        blocks_for_batch(batch)


def test_null_code_list_names_the_image() -> None:
    codes: list = random_codes(2)
    codes[0] = None
    with pytest.raises(ImageBlockError, match=r"'public:img_0.png'.*null"):
        blocks_for_batch(tokens_table(codes).to_batches()[0])


def test_fixed_size_and_sliced_inputs() -> None:
    codes = random_codes(4)
    batch = tokens_table(codes, type_=pa.list_(pa.int32(), C.CODES_PER_IMAGE)).to_batches()[0].slice(1, 2)
    out = blocks_for_batch(batch)
    assert out.column("block").to_pylist() == [image_block(c) for c in codes[1:3]]


def test_repeated_image_key_is_refused(tmp_path: Path, tokenizers: tuple[Path, Path]) -> None:
    table = tokens_table(random_codes(2))
    table = table.set_column(1, "image_key", pa.array(["public:same.png"] * 2))
    tokens = tmp_path / "image_tokens.parquet"
    write_artifact(table, tokens, artifact="image_tokens")
    with pytest.raises(ImageBlockError, match="'public:same.png' appears more than once"):
        map_vocab(tokens, tokenizers[1], tmp_path / "blocks.parquet")


def test_swapped_image_names_are_refused_naming_the_first_id(tmp_path: Path, tokenizers: tuple[Path, Path]) -> None:
    a, b = 300, 7000
    bad = rewrite_tokenizer(tokenizers[1], tmp_path / "swapped.json", {image_token_name(a): image_token_name(b), image_token_name(b): image_token_name(a)})
    tokens = tmp_path / "image_tokens.parquet"
    write_artifact(tokens_table(random_codes(1)), tokens, artifact="image_tokens")
    with pytest.raises(TokenizerLayoutError, match=rf"id {a + C.IMAGE_CODE_OFFSET}: .*code {a}.*2 mismatching"):
        map_vocab(tokens, bad, tmp_path / "blocks.parquet")
    assert not (tmp_path / "blocks.parquet").exists()


def test_renamed_separator_is_refused_by_the_cli(tmp_path: Path, tokenizers: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    bad = rewrite_tokenizer(tokenizers[1], tmp_path / "renamed.json", {C.SEPARATOR_TOKEN: "<reserved99999>"})
    tokens = tmp_path / "image_tokens.parquet"
    write_artifact(tokens_table(random_codes(1)), tokens, artifact="image_tokens")
    out = tmp_path / "blocks.parquet"
    assert cli.main(["map-vocab", "--tokens", str(tokens), "--tokenizer", str(bad), "--output", str(out)]) == 1
    assert f"id {C.SEPARATOR_ID}" in capsys.readouterr().err and not out.exists()
    assert cli.main(["map-vocab", "--tokens", str(tokens), "--tokenizer", str(tokenizers[1]), "--output", str(out)]) == 0
    assert read_meta(out).num_rows == 1


def test_plain_tokenizer_needs_the_flag(tmp_path: Path, tokenizers: tuple[Path, Path]) -> None:
    tokens = tmp_path / "image_tokens.parquet"
    write_artifact(tokens_table(random_codes(1)), tokens, artifact="image_tokens")
    with pytest.raises(TokenizerLayoutError, match=f"id {C.IMAGE_PLACEHOLDER_ID}"):
        map_vocab(tokens, tokenizers[0], tmp_path / "a.parquet")
    assert map_vocab(tokens, tokenizers[0], tmp_path / "b.parquet", require_image_placeholder=False).num_rows == 1


def test_wrong_artifact_is_refused(tmp_path: Path, tokenizers: tuple[Path, Path]) -> None:
    other = tmp_path / "image_paths.parquet"
    write_artifact(pa.table({"image_key": ["a"]}), other, artifact="image_paths")
    with pytest.raises(Exception, match="expected 'image_tokens'"):
        map_vocab(other, tokenizers[1], tmp_path / "blocks.parquet")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:-1], "1025 ids"),
        (lambda b: [C.BOS_ID] + b[1:], "starts with id 0"),
        (lambda b: b[:-1] + [C.EOS_ID], "ends with id 2"),
        (lambda b: b[:10] + [C.SEPARATOR_ID] + b[11:], f"id {C.SEPARATOR_ID} at block position 10"),
    ],
)
def test_check_image_block_reasons(mutate, message: str) -> None:
    block = image_block(random_codes(1)[0])
    reason = check_image_block(mutate(list(block)))
    assert reason is not None and message in reason


def test_find_image_blocks() -> None:
    b1, b2 = image_block(random_codes(1, seed=1)[0]), image_block(random_codes(1, seed=2)[0])
    seq = [C.BOS_ID, 100, *b1, 200, 201, *b2, C.SEPARATOR_ID, 300, C.EOS_ID]
    spans = find_image_blocks(seq)
    assert spans == [(2, 2 + 1026), (2 + 1026 + 2, 2 + 1026 + 2 + 1026)]
    assert all(check_image_block(seq[s:e]) is None for s, e in spans)
    assert stray_end_ids(seq) == []


def test_find_image_blocks_cut_and_stray() -> None:
    block = image_block(random_codes(1)[0])
    truncated = [C.BOS_ID, *block][:700]  # a block cut by truncation at the row's end
    (span,) = find_image_blocks(truncated)
    assert span == (1, 700) and "699 ids" in (check_image_block(truncated[span[0] : span[1]]) or "")
    missing_end = [*block[:-1], *block]  # first block lacks its end id: its span stops at the next begin
    spans = find_image_blocks(missing_end)
    assert spans == [(0, 1025), (1025, 1025 + 1026)]
    assert check_image_block(missing_end[0:1025]) is not None and check_image_block(missing_end[1025:]) is None
    assert stray_end_ids([5, C.END_IMAGE_ID, *block]) == [1]
