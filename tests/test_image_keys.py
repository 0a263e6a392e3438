"""core.image_keys: the one parser of credentialed source specs, template checks, mapping files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from medmax_pipeline.core.image_keys import (
    TEMPLATE_PRESETS,
    CredentialedSource,
    CredentialedSpecError,
    credentialed_entry_problem,
    format_credentialed_spec,
    image_key_for_row,
    load_image_mapping,
    parse_credentialed_spec,
    parse_credentialed_specs,
    template_problem,
    text_sha256,
)

CUSTOM = "files/p{subject_id:.2}/p{subject_id}/s{study_id}/{dicom_id}.jpg"


def test_text_sha256_is_sha256_of_the_utf8_text_in_lowercase_hex() -> None:
    text = "<image>\nRésumé of the findings."
    assert text_sha256(text) == hashlib.sha256(text.encode("utf-8")).hexdigest()
    assert text_sha256(text) == text_sha256(text).lower() and len(text_sha256(text)) == 64


@pytest.mark.parametrize("template", ["mimic_cxr_jpg", CUSTOM, "{study_id}/{dicom_id}.png", "it's a {dicom_id} copy.jpg", "{subject_id:=>8}/{x}"])
def test_usable_templates(template: str) -> None:
    assert template_problem(template) is None


@pytest.mark.parametrize(
    "template, reason",
    [
        ("files/{subject_id", "not a valid format string"),
        ("files/a.jpg", "names no row column"),
        ("files/{}.jpg", "positional field"),
        ("files/{0}.jpg", "positional field"),
        ("files/{row.text}.jpg", "not a plain column name"),
        ("files/{ids[0]}.jpg", "not a plain column name"),
        ("files/{dicom_id!r}.jpg", "conversion"),
        ("files/{dicom_id:{width}}.jpg", "nested field"),
        ("files/{subject_id:d}.jpg", "does not apply to text"),
        ("mapping:{x}.csv", "names a mapping file"),
    ],
)
def test_unusable_templates_say_why(template: str, reason: str) -> None:
    assert reason in (template_problem(template) or "")


def test_spec_with_a_template_and_with_a_mapping(tmp_path: Path) -> None:
    spec = parse_credentialed_spec("mimic_cxr=/data/mimic=files/{subject_id:=>8}.jpg")
    assert (spec.source, spec.root, spec.template, spec.mapping) == ("mimic_cxr", "/data/mimic", "files/{subject_id:=>8}.jpg", None)
    assert parse_credentialed_spec("mimic_cxr=/data/mimic=mimic_cxr_jpg").path_template == TEMPLATE_PRESETS["mimic_cxr_jpg"]
    mapping = tmp_path / "a=b.csv"  # '=' may appear in the mapping path: only the first two split
    mapping.write_text("row_id,image_path\ntrain:1,x.jpg\n")
    spec = parse_credentialed_spec(f"mimic_cxr=/data/mimic=mapping:{mapping}")
    assert spec.template is None and spec.path_template is None
    assert spec.mapping is not None and spec.mapping.paths == {"train:1": "x.jpg"}


@pytest.mark.parametrize(
    "spec, reason",
    [
        ("mimic_cxr=/data/mimic", "expected SOURCE=ROOT=TEMPLATE or SOURCE=ROOT=mapping:PATH"),
        ("mimic_cxr=/data/mimic=files/x.jpg", "names no row column"),
        ("mimic:cxr=/data/mimic=mimic_cxr_jpg", "source 'mimic:cxr'"),
        ("public=/data/mimic=mimic_cxr_jpg", "may not be called 'public'"),
        ("mimic_cxr=/data/mimic=mapping:/nowhere/m.csv", "m.csv: file does not exist"),
        ("mimic_cxr=/data/mimic=mapping:/nowhere/m.txt", "must be a .csv or .jsonl file"),
    ],
)
def test_bad_specs_are_refused(spec: str, reason: str) -> None:
    with pytest.raises(CredentialedSpecError, match=reason.replace("(", r"\(")):
        parse_credentialed_spec(spec)


def test_a_source_given_twice_is_refused() -> None:
    with pytest.raises(CredentialedSpecError, match="'mimic_cxr' is given twice"):
        parse_credentialed_specs(["mimic_cxr=/a=mimic_cxr_jpg", "mimic_cxr=/b=mimic_cxr_jpg"])


def test_config_entries_round_trip_through_the_spec(tmp_path: Path) -> None:
    mapping = tmp_path / "m.jsonl"
    mapping.write_text(json.dumps({"row_id": "train:3", "image_path": "y.jpg"}) + "\n")
    entries = [{"source": "a", "root": "/r a", "template": CUSTOM}, {"source": "b", "root": "/r", "mapping": str(mapping)}]
    assert [format_credentialed_spec(e) for e in entries] == [f"a=/r a={CUSTOM}", f"b=/r=mapping:{mapping}"]
    sources = parse_credentialed_specs([format_credentialed_spec(e) for e in entries])
    assert sources["a"].template == CUSTOM and sources["b"].mapping is not None
    assert credentialed_entry_problem({"source": "a", "root": "/r", "template": CUSTOM, "mapping": "m.csv"}) == (
        None, "give exactly one of template or mapping")
    assert credentialed_entry_problem({"source": "a", "root": "/r=x", "template": CUSTOM})[0] == "root"
    with pytest.raises(CredentialedSpecError, match="exactly one"):
        CredentialedSource("a", "/r")


def test_mapped_keys_by_row_id_and_by_text_hash(tmp_path: Path) -> None:
    by_id = tmp_path / "by_id.csv"
    by_id.write_text("row_id,image_path\ntrain:2,p10/a.jpg\n")
    by_text = tmp_path / "by_text.jsonl"
    by_text.write_text(json.dumps({"text_sha256": text_sha256("<image> hi"), "image_path": "p10/b.jpg"}) + "\n")
    sources = parse_credentialed_specs([f"m=/r=mapping:{by_id}", f"t=/r=mapping:{by_text}"])
    row = {"row_id": "train:2", "text": "<image> hi", "credential": "yes", "source": "m", "image_path": None, "extra": None}
    assert image_key_for_row(row, sources).key == "m:p10/a.jpg"
    assert image_key_for_row({**row, "source": "t"}, sources).key == "t:p10/b.jpg"
    unmapped = image_key_for_row({**row, "row_id": "train:3"}, sources)
    assert unmapped.key is None and unmapped.root_name == "m"
    assert unmapped.problem == f"no mapping entry: row_id 'train:3' is not in {by_id}"
    assert image_key_for_row({**row, "source": "t", "text": "other"}, sources).problem.startswith("no mapping entry: text_sha256 ")


@pytest.mark.parametrize(
    "name, content, where, reason",
    [
        ("m.csv", "", "m.csv", "empty"),
        ("m.csv", "id,image_path\n", "m.csv:1", "exactly one of row_id or text_sha256"),
        ("m.csv", "row_id,text_sha256,image_path\n", "m.csv:1", "exactly one of row_id or text_sha256"),
        ("m.csv", "row_id,image_path\ntrain:1,a.jpg\ntrain:2\n", "m.csv:3", "1 fields, the header has 2"),
        ("m.csv", "row_id,image_path\ntrain:1,\n", "m.csv:2", "must be non-empty text"),
        ("m.csv", "row_id,image_path\ntrain,a.jpg\n", "m.csv:2", "is not SPLIT:LINE"),
        ("m.csv", "row_id,image_path\ntrain:1,/etc/passwd\n", "m.csv:2", "must be relative"),
        ("m.csv", "row_id,image_path\ntrain:1,x/../../a.jpg\n", "m.csv:2", "without '..'"),
        ("m.csv", 'row_id,image_path\ntrain:1,"a.jpg\n', "m.csv:", "not valid CSV|fields"),
        ("m.jsonl", '{"row_id": "train:1", "image_path": "a.jpg"}\n{"row_id": "train:2",\n', "m.jsonl:2", "bad JSON"),
        ("m.jsonl", '["train:1", "a.jpg"]\n', "m.jsonl:1", "expected an object"),
        ("m.jsonl", '{"text_sha256": "abc", "image_path": "a.jpg"}\n', "m.jsonl:1", "is not 64 hex digits"),
        ("m.jsonl", '{"row_id": 7, "image_path": "a.jpg"}\n', "m.jsonl:1", "must be non-empty text"),
        ("m.jsonl", '{"row_id": "train:1", "image_path": "a.jpg"}\n\n{"text_sha256": "' + "0" * 64 + '", "image_path": "b.jpg"}\n',
         "m.jsonl:3", "use one key column per file"),
    ],
)
def test_malformed_mapping_lines_name_file_and_line(tmp_path: Path, name: str, content: str, where: str, reason: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(CredentialedSpecError) as info:
        load_image_mapping(path)
    message = str(info.value)
    assert f"mapping file {tmp_path / where}" in message, message
    assert any(r in message for r in reason.split("|")), message


def test_duplicate_entries_with_one_path_are_kept_once(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_bytes("\ufeffrow_id,image_path\r\ntrain:1,a.jpg\r\ntrain:1,a.jpg\r\n".encode("utf-8"))  # a BOM and CRLF, as spreadsheets write
    assert load_image_mapping(path).paths == {"train:1": "a.jpg"}


# A CSV long enough that a chunked decoder would report the bad byte on an earlier line.
_LONG_CSV = "row_id,image_path\n" + "".join(f"train:{i},img/{i:06d}.jpg\n" for i in range(1, 1500))


@pytest.mark.parametrize(
    "name, content, line, reason",
    [
        ("m.csv", _LONG_CSV.encode() + b"train:1500,img/\xff.jpg\n", 1501, "byte(s) ff at byte 15 (invalid start byte)"),
        ("m.csv", _LONG_CSV.encode() + b"train:1500,img/\xed\xa0\x80.jpg\n", 1501, "byte(s) ed a0 80 at byte 15 (an encoded lone surrogate)"),
        ("m.csv", b"row_id,image_path\ntrain:1,a\xc3", 2, "byte(s) c3 at byte 9 (unexpected end of data)"),
        ("m.jsonl", b'{"row_id": "train:1", "image_path": "a.jpg"}\n{"row_id": "train:2", "image_path": "b\xff.jpg"}\n', 2,
         "not valid UTF-8: byte(s) ff at byte 38"),
        ("m.jsonl", b'{"row_id": "train:1", "image_path": "a.jpg"}\n{"row_id": "train:2", "image_path": "b\\ud800.jpg"}\n', 2,
         "column 'image_path' hold(s) a lone surrogate (\\ud800 at character 1): not valid Unicode"),
        ("m.jsonl", b'{"row_id": "tr\\udc00ain:2", "image_path": "b.jpg"}\n', 1,
         "column 'row_id' hold(s) a lone surrogate (\\udc00 at character 2): not valid Unicode"),
    ],
)
def test_mapping_that_is_not_utf8_or_holds_a_lone_surrogate_names_file_and_line(
    tmp_path: Path, name: str, content: bytes, line: int, reason: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CredentialedSpecError) as info:
        load_image_mapping(path)
    assert str(info.value).startswith(f"mapping file {path}:{line}: "), info.value
    assert reason in str(info.value)
