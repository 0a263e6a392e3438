"""Stage 1 (collect): distinct images inside their roots, every refused row reported, credentials kept local."""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest

from medmax_pipeline import cli
from medmax_pipeline.core.artifacts import read_artifact, read_meta
from medmax_pipeline.stages.collect import (
    CSV_COLUMNS,
    REASON_ABSOLUTE,
    REASON_IN_CREDENTIALED,
    REASON_MALFORMED,
    REASON_MISSING,
    REASON_NO_KEY,
    REASON_NO_MAPPING,
    REASON_NO_TEMPLATE,
    REASON_NOT_FILE,
    REASON_OUTSIDE,
    CollectError,
    build_tables,
    check_relative_path,
    collect,
    problem_category,
    resolve_inside_root,
    row_needs_image,
)
from medmax_pipeline.core.image_keys import (
    TEMPLATE_PRESETS,
    CredentialedSource,
    CredentialedSpecError,
    image_key_for_row,
    load_image_mapping,
    parse_credentialed_specs,
    text_sha256,
)
from medmax_pipeline.core.rows import read_row_batches

IMG = "<image>"
SEP = "<reserved08706>"
MIMIC = {"subject_id": "10000032", "study_id": "50414267", "dicom_id": "02aa804e-bde0afdd"}
MIMIC_MISSING = {"subject_id": "10000033", "study_id": "50414268", "dicom_id": "ffff0000-00000000"}


def public_row(image_path: str | None, text: str = f"{IMG}\nIs this normal?{SEP}Yes", source: str = "slake") -> dict:
    row = {"text": text, "tokens": [0, 5, 2], "task": "VQA", "source": source, "credential": "no"}
    if image_path is not None:
        row["image_path"] = image_path
    return row


def credentialed_row(ids: dict, source: str = "mimic_cxr", text: str = f"{IMG}\nSummarise the findings.{SEP}No acute disease.") -> dict:
    return {"text": text, "tokens": [], "task": "Report Understanding", "source": source, "credential": "yes", **ids}


def write_jsonl(path: Path, rows: list) -> Path:
    # A str entry is written as is (a malformed line); anything else as JSON.
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture()
def tree(tmp_path: Path) -> dict:
    public = tmp_path / "public"
    for rel in ("slake/a.jpg", "slake/b.png", "pathvqa/c.jpg"):
        (public / rel).parent.mkdir(parents=True, exist_ok=True)
        (public / rel).write_bytes(b"img:" + rel.encode())
    (public / "slake" / "folder.jpg").mkdir()  # a directory with an image name
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"not yours")
    (public / "link_out.jpg").symlink_to(outside / "secret.jpg")
    (public / "link_in.jpg").symlink_to(Path("slake") / "a.jpg")  # relative link staying inside
    mimic = tmp_path / "mimic-cxr-jpg"
    mimic_rel = TEMPLATE_PRESETS["mimic_cxr_jpg"].format(**MIMIC)
    (mimic / mimic_rel).parent.mkdir(parents=True)
    (mimic / mimic_rel).write_bytes(b"cxr")

    train = write_jsonl(
        tmp_path / "train.jsonl",
        [
            public_row("slake/a.jpg"),                      # 1
            public_row("slake/a.jpg", source="vqa_rad"),    # 2 same image, another source
            public_row("slake/b.png"),                      # 3
            public_row("slake/missing.jpg"),                # 4 missing file
            public_row("../outside/secret.jpg"),            # 5 '..' escape
            public_row(str(outside / "secret.jpg")),        # 6 absolute path in row data
            public_row("link_out.jpg"),                     # 7 symlink leading out of the root
            public_row("link_in.jpg"),                      # 8 symlink staying inside
            public_row("slake/folder.jpg"),                 # 9 a directory
            '{"text": "truncated line", "task": "VQA", ',   # 10 bad JSON
            json.dumps({"text": 42, "tokens": [], "task": "VQA", "source": "slake", "credential": "no"}),  # 11
            credentialed_row(MIMIC),                        # 12 credentialed, found
            credentialed_row(MIMIC, source="chexpert"),     # 13 no template for the source
            credentialed_row(MIMIC, text="Summarise the report." + SEP + "Fine."),  # 14 needs no image
            credentialed_row(MIMIC_MISSING),                # 15 credentialed, missing file
            public_row(None, text=f"What is a chest X-ray?{SEP}A radiograph."),  # 16 text only
            public_row(None),                               # 17 <image> but no image_path
            credentialed_row({**MIMIC, "subject_id": "../../outside"}),  # 18 escape through a template value
        ],
    )
    validation = write_jsonl(
        tmp_path / "validation.jsonl",
        [public_row("slake/a.jpg"), public_row("pathvqa/c.jpg", source="pathvqa"), credentialed_row(MIMIC)],
    )
    return {
        "tmp": tmp_path, "public": public, "outside": outside, "mimic": mimic, "mimic_rel": mimic_rel,
        "train": train, "validation": validation,
        "rows": [("train", train), ("validation", validation)],
        "sources": [CredentialedSource("mimic_cxr", str(mimic), "mimic_cxr_jpg")],
    }


def problems_by_row(problems) -> dict[str, str]:
    return {r["row_id"]: r["reason"] for r in problems.to_pylist()}


def test_distinct_images_with_row_counts(tree: dict) -> None:
    images, _ = build_tables(tree["rows"], tree["public"], tree["sources"])
    rows = {r["image_key"]: r for r in images.to_pylist()}
    mimic_key = f"mimic_cxr:{tree['mimic_rel']}"
    assert sorted(rows) == sorted(["public:slake/a.jpg", "public:slake/b.png", "public:pathvqa/c.jpg", "public:link_in.jpg", mimic_key])
    assert images.column("image_key").to_pylist() == sorted(rows), "sorted by image_key"
    assert rows["public:slake/a.jpg"]["n_rows"] == 3  # train 1, 2 and validation 1: listed once
    assert rows["public:slake/a.jpg"]["source"] == "slake,vqa_rad"
    assert rows[mimic_key]["n_rows"] == 2 and rows[mimic_key]["credential"] == "yes"
    assert rows[mimic_key]["root_name"] == "mimic_cxr"
    assert rows[mimic_key]["img_path"] == str((tree["mimic"] / tree["mimic_rel"]).resolve())
    assert {rows[k]["credential"] for k in rows if k.startswith("public:")} == {"no"}
    # The in-root symlink is accepted and listed under its resolved target.
    assert rows["public:link_in.jpg"]["img_path"] == str((tree["public"] / "slake" / "a.jpg").resolve())
    for r in rows.values():
        assert Path(r["img_path"]).is_absolute() and Path(r["img_path"]).is_file()


def test_each_refused_row_is_reported_with_its_reason(tree: dict) -> None:
    _, problems = build_tables(tree["rows"], tree["public"], tree["sources"])
    by_row = problems_by_row(problems)
    expected = {
        "train:4": REASON_MISSING,
        "train:5": REASON_OUTSIDE,
        "train:6": REASON_ABSOLUTE,
        "train:7": REASON_OUTSIDE,
        "train:9": REASON_NOT_FILE,
        "train:10": REASON_MALFORMED,
        "train:11": REASON_MALFORMED,
        "train:13": REASON_NO_TEMPLATE,
        "train:15": REASON_MISSING,
        "train:17": REASON_NO_KEY,
        "train:18": REASON_OUTSIDE,
    }
    assert {k: problem_category(v) for k, v in by_row.items()} == expected
    assert "chexpert" in by_row["train:13"]
    assert problems.column("line").to_pylist() == sorted(problems.column("line").to_pylist())  # file order
    record = next(r for r in problems.to_pylist() if r["row_id"] == "train:15")
    assert record["file"] == str(tree["train"]) and record["line"] == 15 and record["split"] == "train"
    assert record["credential"] == "yes" and record["source"] == "mimic_cxr"
    assert record["image_key"] == "mimic_cxr:" + TEMPLATE_PRESETS["mimic_cxr_jpg"].format(**MIMIC_MISSING)
    # The outside file's path never reaches the image list.
    images, _ = build_tables(tree["rows"], tree["public"], tree["sources"])
    assert not any(str(tree["outside"].resolve()) in p for p in images.column("img_path").to_pylist())


def test_every_row_is_accounted_for(tree: dict) -> None:
    images, problems = build_tables(tree["rows"], tree["public"], tree["sources"])
    lines = sum(1 for f in (tree["train"], tree["validation"]) for _ in f.open())
    # Rows that need no image: train 14 (credentialed, no <image>) and 16 (public, text only).
    no_image_needed = 2
    assert sum(images.column("n_rows").to_pylist()) + problems.num_rows + no_image_needed == lines


def test_outputs_lineage_csv_and_credential(tree: dict) -> None:
    out = tree["tmp"] / "out"
    result = collect(tree["rows"], tree["public"], out, tree["sources"])
    meta = read_meta(out / "image_paths.parquet")
    assert meta.artifact == "image_paths" and meta.credential == "credentialed"  # a local artifact
    assert read_meta(out / "image_path_problems.parquet").credential == "credentialed"
    # The row files, then the image roots as folders (so inspect sees a changed image).
    assert [i["path"] for i in meta.lineage["inputs"]] == [str(tree["train"]), str(tree["validation"]), str(tree["public"]), str(tree["mimic"])]
    assert all(i["fingerprint"].startswith("manifest:") for i in meta.lineage["inputs"][2:])
    assert meta.lineage["params"]["credentialed"][0]["root"] == str(tree["mimic"])
    assert meta.lineage["params"]["credentialed"][0]["path_template"] == TEMPLATE_PRESETS["mimic_cxr_jpg"]
    table = read_artifact(out / "image_paths.parquet", artifact="image_paths")
    with open(result.csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert header[0] == "img_path" and tuple(header) == CSV_COLUMNS
    assert body == [list(t) for t in zip(*(table.column(c).to_pylist() for c in CSV_COLUMNS))]
    assert result.problem_counts[REASON_MISSING] == 2


def test_outputs_appear_all_or_none(tree: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing the last of the three outputs leaves none of the new ones: the
    previous run's files stay as they were and no temporary is left."""
    from medmax_pipeline.stages import collect as collect_module

    out = tree["tmp"] / "out"
    collect(tree["rows"], tree["public"], out, tree["sources"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["image_path_problems.parquet", "image_paths.parquet", "img_paths.csv"]

    def full_disk(table, path):
        Path(path).write_text("img_path\n")  # a partial CSV, then the failure
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(collect_module, "write_csv", full_disk)
    fewer_rows = write_jsonl(tree["tmp"] / "one.jsonl", [public_row("slake/a.jpg")])
    with pytest.raises(OSError, match="No space left"):
        collect([("train", fewer_rows)], tree["public"], out, tree["sources"])
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_public_only_rows_give_a_public_artifact(tree: dict) -> None:
    rows = write_jsonl(tree["tmp"] / "public_only.jsonl", [public_row("slake/a.jpg"), public_row("slake/b.png")])
    result = collect([("train", rows)], tree["public"], tree["tmp"] / "pub", tree["sources"])
    assert result.image_paths.credential == "public" and result.n_images == 2


def test_no_include_public_lists_credentialed_images_only(tree: dict) -> None:
    images, problems = build_tables(tree["rows"], None, tree["sources"], include_public=False)
    assert images.column("root_name").to_pylist() == ["mimic_cxr"]
    assert set(problems.column("credential").to_pylist()) <= {"yes", None}  # public rows are not looked at


def test_public_image_inside_a_credentialed_root_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    mimic = data / "mimic"
    rel = TEMPLATE_PRESETS["mimic_cxr_jpg"].format(**MIMIC)
    (mimic / rel).parent.mkdir(parents=True)
    (mimic / rel).write_bytes(b"cxr")
    rows = write_jsonl(tmp_path / "t.jsonl", [public_row(f"mimic/{rel}"), credentialed_row(MIMIC)])
    images, problems = build_tables([("train", rows)], data, [CredentialedSource("mimic_cxr", str(mimic), "mimic_cxr_jpg")])
    assert images.column("image_key").to_pylist() == [f"mimic_cxr:{rel}"]
    assert problem_category(problems.column("reason")[0].as_py()) == REASON_IN_CREDENTIALED


def test_fingerprints_are_deterministic(tree: dict) -> None:
    first = collect(tree["rows"], tree["public"], tree["tmp"] / "one", tree["sources"])
    second = collect(tree["rows"], tree["public"], tree["tmp"] / "two", tree["sources"])
    assert first.image_paths.fingerprint == second.image_paths.fingerprint
    assert first.problems.fingerprint == second.problems.fingerprint
    assert first.csv_path.read_bytes() == second.csv_path.read_bytes()


@pytest.mark.parametrize(
    "relative, category",
    [
        ("/etc/passwd", REASON_ABSOLUTE),
        ("C:\\images\\a.jpg", REASON_ABSOLUTE),
        ("a/../../b.jpg", REASON_OUTSIDE),
        ("..", REASON_OUTSIDE),
        ("a\\..\\..\\b.jpg", REASON_OUTSIDE),
        ("a\x00.jpg", "unusable path"),
    ],
)
def test_unsafe_relative_paths(relative: str, category: str) -> None:
    reason = check_relative_path(relative)
    assert reason is not None and problem_category(reason) == category


def test_safe_relative_paths_pass() -> None:
    for relative in ("a.jpg", "slake/x/y.png", "c:d.jpg", "weird name ..jpg"):
        assert check_relative_path(relative) is None, relative


def test_symlink_loop_is_reported_not_raised(tmp_path: Path) -> None:
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    resolved, reason = resolve_inside_root(tmp_path.resolve(), "loop.jpg")
    assert resolved is None and reason is not None and "loop.jpg" in reason


def test_symlinked_root_is_followed(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.jpg").write_bytes(b"x")
    (tmp_path / "alias").symlink_to(real)
    rows = write_jsonl(tmp_path / "t.jsonl", [public_row("a.jpg")])
    images, problems = build_tables([("train", rows)], tmp_path / "alias")
    assert problems.num_rows == 0 and images.column("img_path").to_pylist() == [str((real / "a.jpg").resolve())]


def test_row_needs_image() -> None:
    assert row_needs_image({"credential": "yes", "text": f"{IMG} x"})
    assert not row_needs_image({"credential": "yes", "text": "x", "image_path": "a.jpg"})
    assert row_needs_image({"credential": "no", "text": "x", "image_path": "a.jpg"})
    assert not row_needs_image({"credential": "no", "text": f"{IMG} x", "image_path": None})


def test_missing_root_stops_with_its_name(tree: dict) -> None:
    with pytest.raises(CollectError, match="mimic_cxr.*does not exist"):
        build_tables(tree["rows"], tree["public"], [CredentialedSource("mimic_cxr", str(tree["tmp"] / "nope"), "mimic_cxr_jpg")])


def test_cli(tree: dict, capsys: pytest.CaptureFixture) -> None:
    out = tree["tmp"] / "cli"
    argv = [
        "collect", "--rows", f"train={tree['train']}", "--rows", f"validation={tree['validation']}",
        "--public-root", str(tree["public"]), "--credentialed", f"mimic_cxr={tree['mimic']}=mimic_cxr_jpg",
        "--include-public", "--output-dir", str(out),
    ]
    assert cli.main(argv) == 0
    assert sorted(os.listdir(out)) == ["image_path_problems.parquet", "image_paths.parquet", "img_paths.csv"]
    assert read_meta(out / "image_paths.parquet").num_rows == 5
    assert "5 distinct image(s)" in capsys.readouterr().out
    bad = [a if not a.startswith("mimic_cxr=") else f"mimic_cxr={tree['tmp'] / 'nope'}=mimic_cxr_jpg" for a in argv]
    assert cli.main(bad) == 1
    assert "does not exist" in capsys.readouterr().err


def test_spellings_of_one_image_each_keep_their_key_with_one_file(tree: dict) -> None:
    """'./a.jpg', 'a.jpg/' and a symlink alias name one file: each row keeps its own key (assembly
    joins rows by the key of their own spelling) and all of them point at the same resolved file."""
    rows = write_jsonl(tree["tmp"] / "aliases.jsonl", [
        public_row("slake/a.jpg"), public_row("./slake/a.jpg"), public_row("slake/a.jpg/"),
        public_row("slake//a.jpg"), public_row("link_in.jpg"),
    ])
    images, problems = build_tables([("train", rows)], tree["public"])
    assert problems.num_rows == 0
    keys = images.column("image_key").to_pylist()
    assert keys == sorted(f"public:{p}" for p in ("slake/a.jpg", "./slake/a.jpg", "slake/a.jpg/", "slake//a.jpg", "link_in.jpg"))
    assert set(images.column("img_path").to_pylist()) == {str((tree["public"] / "slake" / "a.jpg").resolve())}


def test_csv_write_failure_leaves_no_temp_file_and_a_retry_works(tree: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from medmax_pipeline.stages import collect as collect_module

    out = tree["tmp"] / "full"

    class FullDiskWriter:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def writerow(self, row) -> None:
            pass

        def writerows(self, rows) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(collect_module.csv, "writer", FullDiskWriter)
        with pytest.raises(OSError) as info:
            collect(tree["rows"], tree["public"], out, tree["sources"])
    assert info.value.errno == errno.ENOSPC
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    collect(tree["rows"], tree["public"], out, tree["sources"])
    assert sorted(os.listdir(out)) == ["image_path_problems.parquet", "image_paths.parquet", "img_paths.csv"]


def test_outputs_honour_the_umask(tree: dict) -> None:
    old = os.umask(0o022)
    try:
        collect(tree["rows"], tree["public"], tree["tmp"] / "modes", tree["sources"])
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in (tree["tmp"] / "modes").iterdir()} == {oct(0o644)}


# ----------------------------------------------------------------------------------------------
# Credentialed rows without identifiers: a mapping file (row_id or text_sha256 -> image path)
# ----------------------------------------------------------------------------------------------


def no_id_row(text: str) -> dict:
    """A credentialed row as the real release may have it: no MIMIC identifier columns at all."""
    return {"text": text, "tokens": [], "task": "Report Understanding", "source": "mimic_cxr", "credential": "yes"}


@pytest.fixture()
def mapped(tmp_path: Path) -> dict:
    root = tmp_path / "cxr"
    for rel in ("a.jpg", "b.jpg", "sub/c.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"cxr:" + rel.encode())
    (tmp_path / "secret.jpg").write_bytes(b"not yours")
    (root / "escape.jpg").symlink_to(tmp_path / "secret.jpg")
    texts = [f"{IMG}\nReport {i}.{SEP}Findings {i}." for i in range(6)]
    rows = write_jsonl(tmp_path / "train.jsonl", [
        no_id_row(texts[0]),                          # 1 mapped to a.jpg
        no_id_row(texts[1]),                          # 2 mapped to b.jpg (listed twice, same path)
        no_id_row(texts[2]),                          # 3 no entry
        no_id_row(texts[3]),                          # 4 mapped to sub/c.jpg
        no_id_row(texts[4]),                          # 5 mapped to a file that does not exist
        no_id_row(texts[5]),                          # 6 mapped through a symlink out of the root
        no_id_row("Text only, no image." + SEP + "ok"),  # 7 needs no image: never looked up
    ])
    return {"tmp": tmp_path, "root": root, "rows": rows, "texts": texts}


def test_mapping_by_row_id_maps_rows_and_reports_the_unmapped(mapped: dict) -> None:
    mapping = mapped["tmp"] / "map.csv"
    mapping.write_text(
        "row_id,image_path,note\n"
        "train:1,a.jpg,first\n"
        "train:2,b.jpg,\n"
        "\n"
        "train:2,b.jpg,listed again with the same path: kept once\n"
        "train:4,sub/c.jpg,\n"
        "train:5,gone.jpg,\n"
        "train:6,escape.jpg,\n"
        "validation:1,a.jpg,a row of another split\n"
    )
    sources = parse_credentialed_specs([f"mimic_cxr={mapped['root']}=mapping:{mapping}"])
    assert sources["mimic_cxr"].mapping.key_column == "row_id"
    result = collect([("train", mapped["rows"])], None, mapped["tmp"] / "out", list(sources.values()), include_public=False)
    images = read_artifact(mapped["tmp"] / "out" / "image_paths.parquet", artifact="image_paths")
    assert images.column("image_key").to_pylist() == ["mimic_cxr:a.jpg", "mimic_cxr:b.jpg", "mimic_cxr:sub/c.jpg"]
    assert images.column("img_path").to_pylist() == [str((mapped["root"] / r).resolve()) for r in ("a.jpg", "b.jpg", "sub/c.jpg")]
    problems = problems_by_row(read_artifact(mapped["tmp"] / "out" / "image_path_problems.parquet", artifact="image_path_problems"))
    assert sorted(problems) == ["train:3", "train:5", "train:6"]
    assert problems["train:3"] == f"{REASON_NO_MAPPING}: row_id 'train:3' is not in {mapping}"
    assert problem_category(problems["train:5"]) == REASON_MISSING
    assert problem_category(problems["train:6"]) == REASON_OUTSIDE  # confined to the root like a template path
    assert result.problem_counts == {REASON_MISSING: 1, REASON_NO_MAPPING: 1, REASON_OUTSIDE: 1}
    meta = read_meta(mapped["tmp"] / "out" / "image_paths.parquet")
    assert meta.lineage["params"]["credentialed"][0]["mapping"] == str(mapping)
    mapping_input = [i for i in meta.lineage["inputs"] if i["path"] == str(mapping)]
    assert len(mapping_input) == 1 and mapping_input[0]["credential"] == "credentialed"


def test_mapping_by_text_hash(mapped: dict) -> None:
    mapping = mapped["tmp"] / "map.jsonl"
    entries = [(0, "a.jpg"), (1, "b.jpg"), (3, "sub/c.jpg")]
    mapping.write_text("".join(json.dumps({"text_sha256": text_sha256(mapped["texts"][i]).upper(), "image_path": p}) + "\n" for i, p in entries))
    sources = parse_credentialed_specs([f"mimic_cxr={mapped['root']}=mapping:{mapping}"])
    images, problems = build_tables([("train", mapped["rows"])], None, list(sources.values()), include_public=False)
    assert images.column("image_key").to_pylist() == ["mimic_cxr:a.jpg", "mimic_cxr:b.jpg", "mimic_cxr:sub/c.jpg"]
    by_row = problems_by_row(problems)
    assert sorted(by_row) == ["train:3", "train:5", "train:6"]
    assert all(by_row[r].startswith(f"{REASON_NO_MAPPING}: text_sha256 ") for r in by_row)
    assert text_sha256(mapped["texts"][2]) in by_row["train:3"]


def test_collect_and_assembly_compute_the_same_mapped_keys(mapped: dict) -> None:
    """Assembly keys its rows with image_key_for_row over the same parsed sources: the keys collect lists."""
    mapping = mapped["tmp"] / "map.csv"
    mapping.write_text("row_id,image_path\ntrain:1,a.jpg\ntrain:4,sub/c.jpg\n")
    sources = parse_credentialed_specs([f"mimic_cxr={mapped['root']}=mapping:{mapping}"])
    images, _ = build_tables([("train", mapped["rows"])], None, list(sources.values()), include_public=False)
    keys = set()
    for batch, _ in read_row_batches(mapped["rows"], "train"):
        keys |= {image_key_for_row(row, sources).key for row in batch.to_pylist()}
    assert set(images.column("image_key").to_pylist()) == keys - {None}


def test_mapping_giving_a_row_two_paths_is_refused_naming_file_and_lines(mapped: dict, capsys: pytest.CaptureFixture) -> None:
    mapping = mapped["tmp"] / "map.csv"
    mapping.write_text("row_id,image_path\ntrain:1,a.jpg\ntrain:2,b.jpg\ntrain:1,b.jpg\n")
    with pytest.raises(CredentialedSpecError, match=rf"mapping file {mapping}:4: row_id 'train:1' is mapped to 'b.jpg' here and to 'a.jpg' on line 2"):
        load_image_mapping(mapping)
    argv = ["collect", "--rows", f"train={mapped['rows']}", "--no-include-public",
            "--credentialed", f"mimic_cxr={mapped['root']}=mapping:{mapping}", "--output-dir", str(mapped["tmp"] / "out")]
    assert cli.main(argv) == 1
    assert f"{mapping}:4" in capsys.readouterr().err
    assert not (mapped["tmp"] / "out").exists()  # nothing written


def test_cli_with_a_mapping_reports_unmapped_rows(mapped: dict, capsys: pytest.CaptureFixture) -> None:
    mapping = mapped["tmp"] / "map.csv"
    mapping.write_text("row_id,image_path\ntrain:1,a.jpg\n")
    argv = ["collect", "--rows", f"train={mapped['rows']}", "--no-include-public",
            "--credentialed", f"mimic_cxr={mapped['root']}=mapping:{mapping}", "--output-dir", str(mapped["tmp"] / "out")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "1 distinct image(s)" in out
    assert re.search(rf"\s5\s+{REASON_NO_MAPPING}\n", out), out


@pytest.mark.parametrize(
    "name, content, where",
    [
        ("map.csv", b"row_id,image_path\ntrain:1,a.jpg\ntrain:2,b\xed\xa0\x80.jpg\n", ":3: not valid UTF-8"),
        ("map.jsonl", b'{"row_id": "train:1", "image_path": "a\\ud800.jpg"}\n', ":1: column 'image_path' hold(s) a lone surrogate"),
    ],
)
def test_mapping_with_a_lone_surrogate_stops_collect_with_one_error_line(
    mapped: dict, capsys: pytest.CaptureFixture, name: str, content: bytes, where: str
) -> None:
    mapping = mapped["tmp"] / name
    mapping.write_bytes(content)
    argv = ["collect", "--rows", f"train={mapped['rows']}", "--no-include-public",
            "--credentialed", f"mimic_cxr={mapped['root']}=mapping:{mapping}", "--output-dir", str(mapped["tmp"] / "out")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and err.startswith(f"error: mapping file {mapping}{where}"), err
    assert "Traceback" not in err and not (mapped["tmp"] / "out").exists()


def test_parquet_rows_that_are_not_utf8_are_row_problems_with_file_and_row(tree: dict) -> None:
    """Parquet does not check its strings: a lone surrogate written unchecked is ED A0 80. Like a
    jsonl row with a lone surrogate, such a row is a problem naming file and row; the rest is read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [public_row("slake/a.jpg"), public_row("slake/b.png"), public_row("pathvqa/c.jpg"), public_row("slake/a.jpg")]
    table = pa.Table.from_pylist(rows)
    texts = [r["text"].encode() for r in rows]
    texts[1] += b" \xed\xa0\x80"
    sources = [r["source"].encode() for r in rows]
    sources[2] = b"sl\xffake"
    table = table.set_column(table.schema.get_field_index("text"), "text", pa.array(texts, pa.binary()).view(pa.string()))
    table = table.set_column(table.schema.get_field_index("source"), "source", pa.array(sources, pa.binary()).view(pa.string()))
    path = tree["tmp"] / "train.parquet"
    pq.write_table(table, path)
    images, problems = build_tables([("train", path)], tree["public"])
    assert images.column("image_key").to_pylist() == ["public:slake/a.jpg"]
    assert images.column("n_rows").to_pylist() == [2]
    assert [(p["file"], p["line"], p["row_id"]) for p in problems.to_pylist()] == [(str(path), 2, "train:2"), (str(path), 3, "train:3")]
    reasons = problems.column("reason").to_pylist()
    assert reasons[0].startswith("malformed row: column 'text' is not valid UTF-8: byte(s) ed a0 80 at byte ")
    assert reasons[0].endswith("(an encoded lone surrogate)")
    assert reasons[1] == "malformed row: column 'source' is not valid UTF-8: byte(s) ff at byte 2 (invalid start byte)"
