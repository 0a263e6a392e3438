"""The lead's foundations: Chameleon id layout and IMGIMG names, row reading and problems, image keys."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.image_keys import (
    TEMPLATE_PRESETS,
    CredentialedSource,
    credentialed_sources_from_config,
    image_key_for_row,
    template_fields,
)
from medmax_pipeline.core.rows import ROW_SCHEMA, iter_raw_rows, problems_table, read_row_batches, row_extra, validate_row
from medmax_pipeline.core.text_tokenizer import (
    LAYOUT_LAST_ID,
    TokenizerLayoutError,
    build_chameleon_tokenizer,
    check_tokenizer_layout,
    check_vocabulary_map,
    code_from_image_token_name,
    decode_text,
    encode_text,
    image_token_name,
    layout_tokens,
    load_tokenizer,
    reserved_token_name,
    special_token_ids,
    vocabulary_map,
)

CORPUS = ["the chest radiograph shows no acute disease", "is there a fracture? yes", "histology of the liver"] * 5
IMG = C.IMAGE_PLACEHOLDER_TOKEN
SEP = C.SEPARATOR_TOKEN


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_chameleon_tokenizer(tmp_path_factory.mktemp("tok"), CORPUS, text_vocab_size=100)


# ----------------------------------------------------------------------------------------------
# text_tokenizer
# ----------------------------------------------------------------------------------------------


def test_image_token_names_spell_the_code() -> None:
    assert image_token_name(53) == "IMGIMGFDZ"  # the example of MEDMAX-FACTS.md
    assert image_token_name(0) == "IMGIMGAZ"
    assert image_token_name(8191) == "IMGIMGIBJBZ"
    assert all(code_from_image_token_name(image_token_name(c)) == c for c in range(C.NUM_IMAGE_CODES))
    for code in (-1, C.NUM_IMAGE_CODES):
        with pytest.raises(ValueError, match="outside"):
            image_token_name(code)


@pytest.mark.parametrize("name", ["IMGIMGZ", "IMGIMG", "IMGIMGKZ", "imgimgAZ", "<reserved08706>", "IMGAZ", ""])
def test_non_image_names_decode_to_none(name: str) -> None:
    assert code_from_image_token_name(name) is None


def test_layout_tokens_put_every_special_at_its_id() -> None:
    plain, modified = layout_tokens(modified=False), layout_tokens(modified=True)
    assert len(plain) == len(modified) == LAYOUT_LAST_ID + 1
    expected = {C.BOS_ID: "<s>", C.PAD_ID: "<pad>", C.EOS_ID: "</s>", C.END_IMAGE_ID: "<eoss>", C.BEGIN_IMAGE_ID: "<racm3:break>", C.SEPARATOR_ID: "<reserved08706>"}
    for token_id, name in expected.items():
        assert plain[token_id] == modified[token_id] == name
    assert plain[C.IMAGE_PLACEHOLDER_ID] == "<reserved08707>" and modified[C.IMAGE_PLACEHOLDER_ID] == "<image>"
    assert [i for i in range(len(plain)) if plain[i] != modified[i]] == [C.IMAGE_PLACEHOLDER_ID]
    assert plain[C.FIRST_IMAGE_TOKEN_ID] == image_token_name(0) and plain[C.LAST_IMAGE_TOKEN_ID] == image_token_name(8191)


def test_built_tokenizers_modified_vs_plain(tokenizers: tuple[Path, Path]) -> None:
    plain, modified = (load_tokenizer(p) for p in tokenizers)
    assert tokenizers[0].name == "text_tokenizer.json" and tokenizers[1].name == "text_tokenizer_modified.json"
    vp, vm = vocabulary_map(plain), vocabulary_map(modified)
    assert list(vm.values()) == sorted(vm.values())  # by id, as HF's vocabulary_map
    assert {name for name in vp if name not in vm} == {"<reserved08707>"}
    assert vm[IMG] == C.IMAGE_PLACEHOLDER_ID and IMG not in vp
    ids = encode_text(modified, f"{IMG}\nIs there a fracture?{SEP}yes")
    assert ids[0] == C.IMAGE_PLACEHOLDER_ID and C.SEPARATOR_ID in ids and ids.count(C.SEPARATOR_ID) == 1
    assert C.IMAGE_PLACEHOLDER_ID not in encode_text(plain, f"{IMG} chest")  # the plain file has no <image>
    check_tokenizer_layout(modified)
    check_tokenizer_layout(plain, require_image_placeholder=False)
    with pytest.raises(TokenizerLayoutError, match=f"id {C.IMAGE_PLACEHOLDER_ID}: expected '<image>'"):
        check_tokenizer_layout(plain, source="plain")


def test_check_vocabulary_map_names_the_first_mismatching_id(tokenizers: tuple[Path, Path]) -> None:
    vocab = vocabulary_map(tokenizers[1])
    swapped = dict(vocab)
    swapped[image_token_name(10)], swapped[image_token_name(20)] = vocab[image_token_name(20)], vocab[image_token_name(10)]
    with pytest.raises(TokenizerLayoutError, match=r"my.json: id 14: .*2 mismatching"):
        check_vocabulary_map(swapped, source="my.json")
    renamed = {("<other>" if name == C.BEGIN_IMAGE_TOKEN else name): i for name, i in vocab.items()}
    with pytest.raises(TokenizerLayoutError, match=f"id {C.BEGIN_IMAGE_ID}: expected '<racm3:break>', found '<other>'"):
        check_vocabulary_map(renamed)
    # An image name outside the image block would let text decode into image codes.
    text_id = max(vocab.values())
    stray = {name: i for name, i in vocab.items() if i != text_id}
    stray["IMGIMGAAZ"] = text_id
    with pytest.raises(TokenizerLayoutError, match=f"id {text_id}: image token name 'IMGIMGAAZ' outside"):
        check_vocabulary_map(stray)


def test_demo_tokenizer_has_reserved_tokens_past_8800_like_chameleon(tokenizers: tuple[Path, Path]) -> None:
    vocab = vocabulary_map(tokenizers[1])
    # Chameleon's real vocabulary: <reserved08799> is id 8803 (name number = id - 4).
    assert vocab["<reserved08799>"] == 8803 and reserved_token_name(8803) == "<reserved08799>"
    past = [i for name, i in vocab.items() if name.startswith("<reserved") and i > 8799]
    assert len(past) >= 8 and min(past) == 8800
    assert min(i for name, i in vocab.items() if not name.startswith(("<", "IMGIMG"))) > max(past)  # text after them


def test_special_token_ids_come_from_the_tokenizer_not_an_id_bound(tokenizers: tuple[Path, Path]) -> None:
    tok = load_tokenizer(tokenizers[1])
    special = special_token_ids(tok)
    vocab = vocabulary_map(tok)
    assert {C.BOS_ID, C.PAD_ID, C.EOS_ID, C.SEPARATOR_ID, C.IMAGE_PLACEHOLDER_ID, 8803, C.FIRST_IMAGE_TOKEN_ID} <= special
    assert all(i not in special for name, i in vocab.items() if not name.startswith(("<", "IMGIMG")))
    text = encode_text(tok, "the chest radiograph")
    # A reserved id past 8800 (which an `id <= 8799` test took for text), eos and an image code are dropped.
    assert decode_text(tok, [8803, *text[:2], C.EOS_ID, 57, *text[2:], 8800]) == "the chest radiograph"
    assert decode_text(tok, [8803], special) == ""


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(TokenizerLayoutError, match="bad.json"):
        load_tokenizer(bad)


# ----------------------------------------------------------------------------------------------
# rows
# ----------------------------------------------------------------------------------------------


def row(**overrides) -> dict:
    base = {"text": f"{IMG}\nQ?{SEP}A", "tokens": [0, 5, 2], "image_path": "slake/a.jpg", "task": "VQA", "source": "slake", "credential": "no"}
    base.update(overrides)
    return base


def write_lines(path: Path, items: list) -> Path:
    path.write_text("".join((i if isinstance(i, str) else json.dumps(i)) + "\n" for i in items))
    return path


def test_read_row_batches_ids_lines_and_problems(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "train.jsonl",
        [
            row(),                                                                   # 1
            "",                                                                      # 2 blank: skipped, still counted
            row(credential=" YES ", tokens="", image_path="", subject_id=10000032),  # 3
            "{broken",                                                               # 4
            "[1, 2]",                                                                # 5
            row(text=None),                                                          # 6
            row(credential="maybe"),                                                 # 7
            row(tokens=[1, True]),                                                   # 8
            row(tokens=[1, 2.0]),                                                    # 9
            row(tokens=[-1]),                                                        # 10
            row(image_path=7),                                                       # 11
            row(source="vqa_rad"),                                                   # 12
        ],
    )
    batches = list(read_row_batches(path, "train", batch_size=3))
    assert len(batches) > 1 and all(b.schema.equals(ROW_SCHEMA) for b, _ in batches)
    rows = [r for b, _ in batches for r in b.to_pylist()]
    problems = [p for _, ps in batches for p in ps]
    assert [r["row_id"] for r in rows] == ["train:1", "train:3", "train:12"]
    assert [r["line"] for r in rows] == [1, 3, 12]
    second = rows[1]
    assert second["credential"] == "yes" and second["tokens"] == [] and second["image_path"] is None
    assert row_extra(second) == {"subject_id": 10000032}
    assert rows[0]["extra"] is None
    reasons = {p.line: p.reason for p in problems}
    assert sorted(reasons) == [4, 5, 6, 7, 8, 9, 10, 11]
    assert "bad JSON" in reasons[4] and "JSON list" in reasons[5] and "'text'" in reasons[6]
    assert "'credential'" in reasons[7] and "not a list of integers" in reasons[8] and "not a list of integers" in reasons[9]
    assert "int32" in reasons[10] and "'image_path'" in reasons[11]
    assert all(p.file == str(path) and p.row_id == f"train:{p.line}" for p in problems)
    assert str(problems[0]).startswith(f"{path}:{problems[0].line}: ")
    assert problems_table(problems).num_rows == len(problems)


def test_read_row_batches_parquet_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "validation.parquet"
    pq.write_table(pa.Table.from_pylist([row(), row(credential="maybe"), row(source="pathvqa")]), path)
    (batch, problems), = read_row_batches(path, "validation")
    assert batch.column("row_id").to_pylist() == ["validation:1", "validation:3"]
    assert [p.line for p in problems] == [2]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        list(read_row_batches(tmp_path / "missing.jsonl", "train"))


def test_validate_row_keeps_unknown_columns_as_extra() -> None:
    normalised, reason = validate_row(row(study_id="50414267", dicom_id="x"))
    assert reason is None and normalised is not None
    assert json.loads(normalised["extra"]) == {"dicom_id": "x", "study_id": "50414267"}
    assert validate_row("text") == (None, "row is a JSON str, expected an object")


# ----------------------------------------------------------------------------------------------
# image_keys
# ----------------------------------------------------------------------------------------------

MIMIC = CredentialedSource("mimic_cxr", "/data/mimic-cxr-jpg", "mimic_cxr_jpg")


def read_one(tmp_path: Path, raw: dict) -> dict:
    path = write_lines(tmp_path / "r.jsonl", [raw])
    (batch, problems), = read_row_batches(path, "train")
    assert problems == []
    return batch.to_pylist()[0]


def test_public_key(tmp_path: Path) -> None:
    key = image_key_for_row(read_one(tmp_path, row()), {})
    assert (key.key, key.root_name, key.relative_path, key.problem) == ("public:slake/a.jpg", "public", "slake/a.jpg", None)
    empty = image_key_for_row(read_one(tmp_path, row(image_path=None)), {})
    assert empty.key is None and "image_path is empty" in (empty.problem or "")


def test_mimic_cxr_jpg_key_from_extra_columns(tmp_path: Path) -> None:
    raw = row(credential="yes", image_path=None, tokens=[], source="mimic_cxr", subject_id=10000032, study_id="50414267", dicom_id="02aa804e-bde0afdd")
    key = image_key_for_row(read_one(tmp_path, raw), {"mimic_cxr": MIMIC})
    assert key.key == "mimic_cxr:files/p10/p10000032/s50414267/02aa804e-bde0afdd.jpg"
    assert key.root_name == "mimic_cxr" and key.relative_path == key.key.split(":", 1)[1]
    assert MIMIC.path_template == TEMPLATE_PRESETS["mimic_cxr_jpg"]
    assert template_fields(MIMIC.path_template) == ["subject_id", "subject_id", "study_id", "dicom_id"]


def test_credentialed_key_problems(tmp_path: Path) -> None:
    base = row(credential="yes", image_path="ignored.jpg", tokens=[], source="mimic_cxr", subject_id="10000032", study_id="50414267")
    missing = image_key_for_row(read_one(tmp_path, base), {"mimic_cxr": MIMIC})
    assert missing.key is None and "dicom_id" in (missing.problem or "")
    unknown = image_key_for_row(read_one(tmp_path, {**base, "source": "chexpert"}), {"mimic_cxr": MIMIC})
    assert unknown.key is None and "no template" in (unknown.problem or "") and "chexpert" in (unknown.problem or "")


def test_custom_template_from_config(tmp_path: Path) -> None:
    sources = credentialed_sources_from_config([{"source": "padchest", "root": Path("/data/padchest"), "template": "{study_id}/{dicom_id}.png"}])
    assert sources["padchest"].root == "/data/padchest"
    raw = row(credential="yes", image_path=None, tokens=[], source="padchest", study_id=12, dicom_id="x")
    assert image_key_for_row(read_one(tmp_path, raw), sources).key == "padchest:12/x.png"


def reference_rows(path: Path, split: str) -> tuple[list[dict], list[tuple[int, str]]]:
    """The plain per-line reading (iter_raw_rows + validate_row) that read_row_batches must agree with."""
    rows, problems = [], []
    for line, raw, error in iter_raw_rows(path):
        normalised, reason = (None, error) if error else validate_row(raw)
        if normalised is None:
            problems.append((line, reason))
        else:
            rows.append({"row_id": f"{split}:{line}", "split": split, "line": line, **normalised})
    return rows, problems


def test_read_row_batches_agrees_with_the_per_line_reader_on_tricky_lines(tmp_path: Path) -> None:
    lines = [
        json.dumps(row(tokens=list(range(0, 3000, 7)))),
        '{"text": "x", "tokens" :\t[ 0 ,5,\t2 ], "task": "VQA", "source": "slake", "credential": "no"}',
        json.dumps(row(text='a "tokens": [9] inside the text', tokens=[0, 2])),
        json.dumps(row(meta={"tokens": [7, 8]}, tokens=[0, 1, 2])),  # a nested "tokens" key
        json.dumps(row(meta={"tokens": [7, 8]})).replace('"tokens": [0, 5, 2], ', ""),  # only the nested one
        json.dumps(row(tokens=[])),
        json.dumps(row()).replace("[0, 5, 2]", "[0, +5, 2]"),
        json.dumps(row()).replace("[0, 5, 2]", "[0, 5.0, 2]"),
        json.dumps(row()).replace("[0, 5, 2]", "[0, true, 2]"),
        json.dumps(row()).replace("[0, 5, 2]", "[0, 5, 2,]"),
        json.dumps(row(tokens=[0, 2**31, 2])),
        json.dumps(row(tokens=[0, 2**31 - 1, 2])),
        json.dumps(row(tokens=[[1], 2])),
        json.dumps(row(credential="yes", tokens=None, image_path=None, subject_id="10000032")),
    ]
    path = tmp_path / "tricky.jsonl"
    path.write_text("\n".join(lines) + "\n")
    expected_rows, expected_problems = reference_rows(path, "train")
    for batch_size in (2, 100):
        batches = list(read_row_batches(path, "train", batch_size=batch_size))
        assert [r for b, _ in batches for r in b.to_pylist()] == expected_rows
        assert [(p.line, p.reason) for _, ps in batches for p in ps] == expected_problems
    assert {line for line, _ in expected_problems} >= {7, 8, 9, 10, 11, 13}
