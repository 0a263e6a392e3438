"""Stage 4, dataset assembly: sequence building, checks, truncation, credentials, coverage, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medmax_pipeline.core import constants as C
from medmax_pipeline.core.artifacts import CredentialLeakError, ArtifactWriter, describe_input, read_artifact, read_meta, write_artifact
from medmax_pipeline.core.sequences import build_sequence, check_image_block
from medmax_pipeline.stages.assemble import (
    CATEGORIES,
    DATASET_SCHEMA,
    AssemblyError,
    assemble,
    check_published_tokens,
    take_prefixes,
    truncation_lengths,
)
from medmax_pipeline.cli import main as cli_main
from medmax_pipeline.core.text_tokenizer import build_chameleon_tokenizer, encode_text, load_tokenizer

CORPUS = ["What does the chest x-ray show? <reserved08706> No acute findings.", "Describe the image. <image> A lesion."] * 20
SOURCE = "mimic"
TEMPLATE = "files/{subject_id}/{dicom_id}.jpg"


def block_for(seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [C.BEGIN_IMAGE_ID] + (rng.integers(0, C.NUM_IMAGE_CODES, C.CODES_PER_IMAGE) + C.IMAGE_CODE_OFFSET).tolist() + [C.END_IMAGE_ID]


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory) -> Path:
    _, modified = build_chameleon_tokenizer(tmp_path_factory.mktemp("tok"), CORPUS, text_vocab_size=300)
    return modified


def published(tokenizer_path: Path, text: str, image_seed: int | None) -> list[int]:
    ids = encode_text(load_tokenizer(tokenizer_path), text)
    return build_sequence(ids, block_for(image_seed) if image_seed is not None else None).tolist()


def cred_row(i: int, text: str = "Describe the image. <image> A lesion.", **extra) -> dict:
    row = {"text": text, "tokens": [], "task": "Report Understanding", "source": SOURCE, "credential": "yes",
           "subject_id": f"1000{i:04d}", "dicom_id": f"d{i}"}
    row.update(extra)
    return row


def cred_key(i: int) -> str:
    return f"{SOURCE}:files/1000{i:04d}/d{i}.jpg"


@pytest.fixture()
def inputs(tmp_path, tokenizer_path):
    """A small world: row file with public and credentialed rows, and the upstream artifacts."""
    text = "Describe the image. <image> A lesion."
    lines = [
        json.dumps({"text": text, "tokens": published(tokenizer_path, text, 1), "image_path": "a/1.jpg", "task": "VQA", "source": "slake", "credential": "no"}),
        json.dumps({"text": "What does the chest x-ray show?", "tokens": published(tokenizer_path, "What does the chest x-ray show?", None), "task": "Visual Chat", "source": "slake", "credential": "no"}),
        "{not json",  # malformed line 3
        json.dumps(cred_row(1)),  # filled from its block
        json.dumps(cred_row(2)),  # image missing (path problem)
        json.dumps(cred_row(3)),  # image unreadable (token error)
        json.dumps(cred_row(4, dicom_id=None)),  # no image key
        json.dumps(cred_row(5, text="No image here.")),  # names an image but no <image>: malformed
        json.dumps({"text": text, "tokens": published(tokenizer_path, text, 2)[:-1] + [5], "image_path": "a/2.jpg", "task": "VQA", "source": "pathvqa", "credential": "no"}),  # bad eos
        json.dumps({"text": text, "tokens": published(tokenizer_path, text, 3), "task": "VQA", "source": "pathvqa", "credential": "no"}),  # <image> without image_path
        json.dumps(cred_row(6)),  # not collected at all
    ]
    rows = tmp_path / "train.jsonl"
    rows.write_text("\n".join(lines) + "\n")
    blocks = tmp_path / "image_blocks.parquet"
    write_artifact(
        pa.table({"image_key": [cred_key(1), "public:a/1.jpg"], "img_path": ["/x/d1.jpg", "/p/a/1.jpg"], "credential": ["yes", "no"],
                  "block": pa.array([block_for(11), block_for(1)], pa.list_(pa.int32()))}),
        blocks, artifact="image_blocks")
    path_problems = tmp_path / "image_path_problems.parquet"
    write_artifact(
        pa.table({"file": [str(rows)], "line": pa.array([5], pa.int64()), "row_id": ["train:5"], "split": ["train"], "source": [SOURCE],
                  "credential": ["yes"], "image_key": [cred_key(2)], "reason": ["missing file"]}),
        path_problems, artifact="image_path_problems")
    token_errors = tmp_path / "image_token_errors.parquet"
    write_artifact(
        pa.table({"img_path": ["/x/d3.jpg"], "image_key": [cred_key(3)], "credential": ["yes"], "reason": ["cannot identify image file"]}),
        token_errors, artifact="image_token_errors")
    return {"rows": rows, "image_blocks": blocks, "path_problems": path_problems, "token_errors": token_errors, "tokenizer_path": tokenizer_path}


def run_stage(inputs, out: Path, credentialed=(f"{SOURCE}=/data/mimic={TEMPLATE}",), **kwargs):
    return assemble(inputs["rows"], "train", out, tokenizer_path=inputs["tokenizer_path"], image_blocks=inputs["image_blocks"],
                    path_problems=inputs["path_problems"], token_errors=inputs["token_errors"], credentialed=list(credentialed),
                    max_error_fraction=kwargs.pop("max_error_fraction", 0.5), **kwargs)


# --- pure functions -----------------------------------------------------------------------------


def test_build_sequence_against_hand_computed_ids():
    block = [8197] + [4] * 1024 + [8196]
    seq = build_sequence([9000, 8711, 9001], block)
    assert seq.tolist() == [0, 9000, 8197] + [4] * 1024 + [8196, 9001, 2]
    assert build_sequence([9000], None).tolist() == [0, 9000, 2]
    with pytest.raises(ValueError):
        build_sequence([8711], None)


def test_check_image_block():
    assert check_image_block(block_for(0)) is None
    assert "1026" in check_image_block([8197, 8196])
    assert "not an image token" in check_image_block([8197] + [8196] * 1024 + [8196])


def test_check_published_tokens_reasons():
    good = [0, 9000] + block_for(0) + [9001, 2]
    cases = [good, good[:-1] + [3], [5] + good[1:], [0, 70000, 2], [0, 8711, 2], [0, 9000] + block_for(0)[:-1] + [9, 2], [0, 5, 2], []]
    offsets = np.cumsum([0] + [len(c) for c in cases])
    reasons, truncated = check_published_tokens(np.concatenate([np.array(c, np.int64) for c in cases]), offsets,
                                                np.array([1, 1, 1, 0, 0, 1, 0, 0]))
    assert reasons[0] is None
    assert "eos" in reasons[1] and "bos" in reasons[2] and "outside" in reasons[3] and "8711" in reasons[4]
    assert "image block" in reasons[5] and "image block" in reasons[6] and "empty" in reasons[7]
    assert not truncated.any()
    # Same row, but text has no <image>: count mismatch.
    reasons, _ = check_published_tokens(np.array(good), np.array([0, len(good)]), np.array([0]))
    assert "1 image block(s), text has 0" in reasons[0]


def single_block_mutations() -> dict[str, list[int]]:
    """One valid block and blocks broken in one way each, by name."""
    good = block_for(5)
    cases = {"valid": good, "valid, other codes": block_for(6)}
    cases["valid, extreme codes"] = [C.BEGIN_IMAGE_ID] + [C.FIRST_IMAGE_TOKEN_ID, C.LAST_IMAGE_TOKEN_ID] * 512 + [C.END_IMAGE_ID]
    for begin in (9000, C.END_IMAGE_ID, C.FIRST_IMAGE_TOKEN_ID, C.EOS_ID):
        cases[f"begin {begin}"] = [begin] + good[1:]
    for end in (9000, C.BEGIN_IMAGE_ID, C.LAST_IMAGE_TOKEN_ID, C.EOS_ID):
        cases[f"end {end}"] = good[:-1] + [end]
    for position in (1, 500, 1024):
        for inner in (0, 1, 2, 3, C.LAST_IMAGE_TOKEN_ID + 1, C.BEGIN_IMAGE_ID, C.SEPARATOR_ID, C.IMAGE_PLACEHOLDER_ID, 9000, 65535, 70000, -1):
            cases[f"inner {inner} at {position}"] = good[:position] + [inner] + good[position + 1:]
    cases["too short by one code"] = good[:-2] + good[-1:]
    cases["too short by 100 codes"] = good[:-101] + good[-1:]
    cases["too long by one code"] = good[:-1] + [good[1]] + good[-1:]
    cases["too long by 100 codes"] = good[:-1] + good[1:101] + good[-1:]
    return cases


def test_published_check_agrees_with_the_block_validator():
    """check_published_tokens (vectorised, in whole sequences) accepts and refuses exactly the
    blocks that check_image_block (one block) accepts and refuses, each block as [0, *block, 2]
    of a text with one <image>; all cases in one call, so rows cannot leak into each other."""
    cases = single_block_mutations()
    sequences = [[C.BOS_ID, *block, C.EOS_ID] for block in cases.values()]
    offsets = np.cumsum([0] + [len(s) for s in sequences])
    values = np.concatenate([np.array(s, np.int64) for s in sequences])
    reasons, truncated = check_published_tokens(values, offsets, np.ones(len(sequences), np.int64))
    assert not truncated.any()
    verdicts = {name: (check_image_block(block) is None, reason is None) for (name, block), reason in zip(cases.items(), reasons)}
    assert {name for name, (alone, _) in verdicts.items() if alone} == {"valid", "valid, other codes", "valid, extreme codes"}
    disagree = {name: verdict for name, verdict in verdicts.items() if verdict[0] != verdict[1]}
    assert disagree == {}


def test_publisher_truncated_rows_are_accepted():
    seq = ([0] + [9000] * 1000 + block_for(0) + block_for(1))[:2048]  # ends inside the second block
    reasons, truncated = check_published_tokens(np.array(seq), np.array([0, 2048]), np.array([2]), published_max_length=2048)
    assert reasons == [None] and truncated.tolist() == [True]
    # The partial block is cut off: the row keeps its first complete block only.
    assert truncation_lengths(np.array(seq), np.array([0, 2048]), 4096).tolist() == [1 + 1000 + 1026]


def test_truncation_never_cuts_inside_an_image_block():
    seq = np.array([0] + [9000] * 10 + block_for(0) + [9001] * 20 + [2])
    offsets = np.array([0, len(seq)])
    assert truncation_lengths(seq, offsets, 500).tolist() == [11]  # cut before the block's 8197
    assert truncation_lengths(seq, offsets, 1037).tolist() == [1037]  # right after the 8196
    assert truncation_lengths(seq, offsets, 5000).tolist() == [len(seq)]
    values, new_offsets = take_prefixes(seq, offsets, np.array([11]))
    assert values.tolist() == seq[:11].tolist() and new_offsets.tolist() == [0, 11]


# --- the stage ----------------------------------------------------------------------------------


def test_every_row_is_in_dataset_or_problems_and_coverage_adds_up(inputs, tmp_path):
    out = tmp_path / "out"
    coverage = run_stage(inputs, out)
    dataset = read_artifact(out / "dataset.parquet", "dataset")
    problems = read_artifact(out / "dataset_problems.parquet", "dataset_problems")
    n_input = sum(1 for line in inputs["rows"].read_text().splitlines() if line.strip())
    assert dataset.num_rows + problems.num_rows == n_input
    assert sorted(dataset.column("line").to_pylist() + problems.column("line").to_pylist()) == list(range(1, n_input + 1))
    by_line = {r["line"]: r for r in problems.to_pylist()}
    assert by_line[3]["category"] == "malformed_row" and by_line[3]["file"] == str(inputs["rows"])
    assert by_line[5]["category"] == "image_missing" and "missing file" in by_line[5]["reason"]
    assert by_line[6]["category"] == "image_unreadable"
    assert by_line[7]["category"] == "no_image_key"
    assert by_line[8]["category"] == "malformed_row"
    assert by_line[9]["category"] == "invalid_published_tokens" and "eos" in by_line[9]["reason"]
    assert by_line[10]["category"] == "malformed_row"
    assert by_line[11]["category"] == "image_missing"
    table = read_artifact(out / "coverage.parquet", "coverage")
    for row in table.to_pylist():
        assert row["rows_missing"] == sum(row[c] for c in CATEGORIES)
        assert row["rows_expected"] == row["rows_filled"] + row["rows_missing"]
    assert sum(table.column("rows_expected").to_pylist()) == n_input
    assert sum(table.column("rows_filled").to_pylist()) == dataset.num_rows == coverage.totals()["rows_filled"]
    assert "rows filled" in (out / "coverage_summary.txt").read_text()


def test_credentialed_row_gets_built_tokens(inputs, tmp_path):
    out = tmp_path / "out"
    run_stage(inputs, out)
    dataset = read_artifact(out / "dataset.parquet", "dataset")
    row = [r for r in dataset.to_pylist() if r["line"] == 4][0]
    text_ids = encode_text(load_tokenizer(inputs["tokenizer_path"]), row["text"])
    place = text_ids.index(C.IMAGE_PLACEHOLDER_ID)
    assert row["tokens"] == [0] + text_ids[:place] + block_for(11) + text_ids[place + 1:] + [2]
    assert row["n_tokens"] == len(row["tokens"]) and row["truncated"] is False
    public_row = [r for r in dataset.to_pylist() if r["line"] == 1][0]
    assert public_row["tokens"] == json.loads(inputs["rows"].read_text().splitlines()[0])["tokens"]


def test_public_dataset_never_holds_credentialed_data_across_reruns(inputs, tmp_path):
    runs = {}
    for name, creds in (("with", (f"{SOURCE}=/data/mimic={TEMPLATE}",)), ("without", ()), ("again", (f"{SOURCE}=/data/mimic={TEMPLATE}",))):
        out = tmp_path / name
        run_stage(inputs, out, credentialed=creds)
        meta = read_meta(out / "dataset_public.parquet")
        table = read_artifact(out / "dataset_public.parquet", "dataset_public")
        assert meta.credential == "public"
        assert set(table.column("credential").to_pylist()) == {"no"}
        assert [i["path"] for i in meta.lineage["inputs"]] == [str(inputs["rows"])]
        assert read_meta(out / "dataset.parquet").credential == "credentialed" or name == "without"
        runs[name] = (meta.fingerprint, table.column("row_id").to_pylist())
    assert runs["with"] == runs["without"] == runs["again"]
    # Public rows of dataset and dataset_public are the same rows.
    dataset = read_artifact(tmp_path / "with" / "dataset.parquet")
    public = dataset.filter(pa.compute.equal(dataset.column("credential"), "no"))
    assert public.equals(read_artifact(tmp_path / "with" / "dataset_public.parquet"))


def test_leak_through_the_writer_is_refused(tmp_path):
    row = {name: [None] for name in DATASET_SCHEMA.names}
    row.update(row_id=["train:1"], credential=["yes"], tokens=[[0, 2]])
    with pytest.raises(CredentialLeakError):
        with ArtifactWriter(tmp_path / "x.parquet", DATASET_SCHEMA, artifact="dataset_public", credential="public") as writer:
            writer.write(pa.Table.from_pydict(row, schema=DATASET_SCHEMA))
    # Nor can a public artifact name a credentialed input.
    with pytest.raises(CredentialLeakError):
        ArtifactWriter(tmp_path / "y.parquet", DATASET_SCHEMA, artifact="dataset_public", credential="public",
                       inputs=[{"path": "blocks", "artifact": "image_blocks", "fingerprint": "x", "credential": "credentialed"}])
    assert not (tmp_path / "x.parquet").exists()


def test_truncate_and_drop(inputs, tmp_path):
    run_stage(inputs, tmp_path / "t", max_length=600)
    dataset = read_artifact(tmp_path / "t" / "dataset.parquet")
    by_line = {r["line"]: r for r in dataset.to_pylist()}
    assert by_line[1]["truncated"] and C.BEGIN_IMAGE_ID not in by_line[1]["tokens"] and by_line[1]["n_tokens"] < 600
    assert by_line[2]["truncated"] is False
    run_stage(inputs, tmp_path / "d", max_length=600, overflow="drop")
    dropped = read_artifact(tmp_path / "d" / "dataset_problems.parquet").to_pylist()
    assert {r["line"] for r in dropped if r["category"] == "dropped_too_long"} == {1, 4}
    assert set(read_artifact(tmp_path / "d" / "dataset.parquet").column("line").to_pylist()) == {2}


def test_too_many_malformed_rows_fail_and_write_nothing(inputs, tmp_path):
    out = tmp_path / "out"
    run_stage(inputs, out)  # a complete earlier run must not survive a failed one
    with pytest.raises(AssemblyError, match=r"train.jsonl:3:"):
        run_stage(inputs, out, max_error_fraction=0.01)
    assert not list(out.glob("*.parquet"))
    assert not list(out.glob(".*tmp"))


def test_determinism_of_row_ids_and_fingerprints(inputs, tmp_path):
    metas = []
    for name, batch_size in (("a", 2048), ("b", 3)):
        run_stage(inputs, tmp_path / name, batch_size=batch_size)
        metas.append({f: read_meta(tmp_path / name / f).fingerprint for f in ("dataset.parquet", "dataset_public.parquet", "dataset_problems.parquet", "coverage.parquet")})
        assert read_artifact(tmp_path / name / "dataset.parquet").column("row_id").to_pylist()[:2] == ["train:1", "train:2"]
    assert metas[0] == metas[1]


def test_outputs_load_with_datasets_and_polars(inputs, tmp_path):
    import datasets
    import polars as pl

    out = tmp_path / "out"
    run_stage(inputs, out)
    for name in ("dataset.parquet", "dataset_public.parquet"):
        expected = pq.read_table(out / name)
        ds = datasets.load_dataset("parquet", data_files=str(out / name), split="train", cache_dir=str(tmp_path / "hf"))
        assert ds.num_rows == expected.num_rows and ds[0]["tokens"] == expected.column("tokens")[0].as_py()
        df = pl.read_parquet(out / name)
        assert df.height == expected.num_rows and df["n_tokens"].to_list() == [len(t) for t in df["tokens"].to_list()]


def test_cli(inputs, tmp_path):
    out = tmp_path / "cli"
    argv = ["assemble", "--rows", str(inputs["rows"]), "--split", "train", "--image-blocks", str(inputs["image_blocks"]),
            "--path-problems", str(inputs["path_problems"]), "--token-errors", str(inputs["token_errors"]),
            "--tokenizer", str(inputs["tokenizer_path"]), "--credentialed", f"{SOURCE}=/data/mimic={TEMPLATE}",
            "--max-length", "2048", "--overflow", "truncate", "--max-error-fraction", "0.5", "--output-dir", str(out)]
    assert cli_main(argv) == 0
    assert read_meta(out / "dataset.parquet").num_rows == 3
    argv[argv.index("0.5")] = "0.01"
    assert cli_main(argv) == 1


def test_plain_tokenizer_is_refused(inputs, tmp_path):
    plain = inputs["tokenizer_path"].parent / "text_tokenizer.json"
    with pytest.raises(AssemblyError, match="modified"):
        run_stage({**inputs, "tokenizer_path": plain}, tmp_path / "out")


def test_parallel_workers_give_the_serial_outputs(inputs, tmp_path):
    """Worker processes (byte ranges of the row file, merged in order) write the same files as the
    serial path: fingerprints, lineage (the row file hashed while read) and the parquet bytes, with
    malformed lines reported with their own file and line, whatever the batch size."""
    rows = inputs["rows"]
    lines = rows.read_text().splitlines()
    # Blank lines and a last line without a newline move line numbers and batch boundaries.
    rows.write_text("\n".join(lines[:4] + ["", "   "] + lines[4:] + ["[1, 2]", "{\"text\": 5}"] + lines[:2]) + "\n" + lines[0])
    names = ("dataset.parquet", "dataset_public.parquet", "dataset_problems.parquet", "coverage.parquet")
    for batch_size in (2048, 3):
        outs = {}
        for workers in (1, 2):
            out = tmp_path / f"w{workers}-b{batch_size}"
            run_stage(inputs, out, workers=workers, batch_size=batch_size)
            outs[workers] = out
        for name in names:
            serial, parallel = read_meta(outs[1] / name), read_meta(outs[2] / name)
            assert (serial.fingerprint, serial.lineage) == (parallel.fingerprint, parallel.lineage), name
            assert (outs[1] / name).read_bytes() == (outs[2] / name).read_bytes(), name
        problems = read_artifact(outs[2] / "dataset_problems.parquet").to_pylist()
        malformed = {(p["file"], p["line"]) for p in problems if p["category"] == "malformed_row"}
        assert {(str(rows), 3), (str(rows), 14), (str(rows), 15)} <= malformed
        assert read_meta(outs[2] / "dataset.parquet").lineage["inputs"][0]["fingerprint"] == describe_input(rows)["fingerprint"]
        assert not list(tmp_path.glob("w2-*/*.arrow"))


# --- separator statistics (issue 12 item 4) -----------------------------------------------------


def random_sequences(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        body = rng.choice([C.SEPARATOR_ID, 9000, 9001, C.BEGIN_IMAGE_ID], size=int(rng.integers(0, 12)), p=[0.3, 0.3, 0.3, 0.1]).tolist()
        out.append([0] + body + ([2] if rng.random() < 0.8 else []))
    return out + [[], [0], [0, 2], [0, 8710, 2], [0, 8710], [8710], [0, 8710, 8710, 8710, 2]]


def test_alternating_policy_is_the_train_stage_rule():
    """The reference mask of `alternating` is train.response_labels' (read, not imported, by the stage)."""
    from medmax_pipeline.stages.assemble.separator_stats import masked_positions
    from medmax_pipeline.stages.train import response_labels

    for ids in random_sequences(300, 0):
        assert masked_positions(ids, "alternating") == [label == -100 for label in response_labels(ids, "alternating")]
        assert masked_positions(ids, "first_separator") == [label == -100 for label in response_labels(ids, "first_separator")]
    assert masked_positions([0, 10, 8710, 20, 2], "first_separator") == [True, True, True, False, False]
    assert masked_positions([0, 10, 2], "first_separator") == [False, False, False]


def test_separator_profile_matches_the_per_row_rule():
    from medmax_pipeline.stages.assemble.separator_stats import final_eos_masked, separator_profile

    sequences = random_sequences(400, 1)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])])
    profile = separator_profile(np.concatenate([np.asarray(s, np.int32) for s in sequences]), offsets)
    for i, ids in enumerate(sequences):
        assert profile["n_separators"][i] == ids.count(C.SEPARATOR_ID)
        assert profile["ends_with_eos"][i] == (final_eos_masked(ids, "alternating") is not None)
        for policy in ("first_separator", "alternating"):
            assert profile[f"eos_masked_{policy}"][i] == bool(final_eos_masked(ids, policy)), (ids, policy)
    # Hand-computed: no separator -> eos masked by alternating, trained by first_separator.
    assert final_eos_masked([0, 9000, 2], "alternating") is True and final_eos_masked([0, 9000, 2], "first_separator") is False
    assert final_eos_masked([0, 8710, 9000, 8710, 9001, 2], "alternating") is True
    assert final_eos_masked([0, 8710, 9000, 2], "alternating") is False and final_eos_masked([0, 8710], "alternating") is None


def test_separator_stats_artifact(inputs, tmp_path):
    out = tmp_path / "out"
    run_stage(inputs, out)
    meta = read_meta(out / "separator_stats.parquet")
    assert meta.artifact == "separator_stats" and meta.credential == "credentialed"  # credentialed rows are counted
    stats = read_artifact(out / "separator_stats.parquet", "separator_stats").to_pylist()
    dataset = read_artifact(out / "dataset.parquet").to_pylist()
    assert sum(r["rows"] for r in stats) == len(dataset)
    for row in stats:
        assert row["rows"] == row["sep_0"] + row["sep_1"] + row["sep_2_plus"]
        group = [d["tokens"] for d in dataset if (d["task"], d["source"], d["credential"]) == (row["task"], row["source"], row["credential"])]
        assert row["rows"] == len(group)
        assert row["sep_0"] == sum(t.count(C.SEPARATOR_ID) == 0 for t in group)
        assert row["eos_masked_alternating"] == sum(t[-1] == 2 and t.count(C.SEPARATOR_ID) % 2 == 0 for t in group)
        assert row["eos_masked_first_separator"] == 0
    # The fixture's "What does the chest x-ray show?" row has no separator: its eos is masked by alternating.
    assert any(r["sep_0"] and r["eos_masked_alternating"] for r in stats if r["task"] == "Visual Chat")


# --- label-only trust (issue 11 item 12) --------------------------------------------------------


def test_public_row_with_a_credentialed_image_block_is_refused(inputs, tmp_path):
    text = "Describe the image. <image> A lesion."
    smuggled = json.dumps({"text": text, "tokens": published(inputs["tokenizer_path"], text, 11), "image_path": "a/9.jpg",
                           "task": "VQA", "source": "slake", "credential": "no"})  # block_for(11) is cred_key(1)'s image
    with open(inputs["rows"], "a") as f:
        f.write(smuggled + "\n")
    line = len(inputs["rows"].read_text().splitlines())
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run_stage(inputs, out, workers=workers)
        problems = {p["line"]: p for p in read_artifact(out / "dataset_problems.parquet").to_pylist()}
        assert problems[line]["category"] == "credentialed_image_in_public_row" and "credentialed image" in problems[line]["reason"]
        assert line not in read_artifact(out / "dataset_public.parquet").column("line").to_pylist()
        assert line not in read_artifact(out / "dataset.parquet").column("line").to_pylist()
        coverage = read_artifact(out / "coverage.parquet", "coverage").to_pylist()
        assert sum(r["credentialed_image_in_public_row"] for r in coverage) == 1
    # Without the credentialed blocks at hand there is nothing to compare with: the row is public data.
    run_stage(inputs, tmp_path / "nocred", credentialed=())
    assert line in read_artifact(tmp_path / "nocred" / "dataset_public.parquet").column("line").to_pylist()


# --- published tokens against re-derived public blocks (issue 12 item 7) -------------------------


def test_published_token_check_identical(inputs, tmp_path):
    out = tmp_path / "out"
    run_stage(inputs, out)
    check = read_artifact(out / "published_token_check.parquet", "published_token_check").to_pylist()
    assert [(r["image_key"], r["rows"], r["compared_rows"], r["identical"], r["differing_codes"]) for r in check] == [("public:a/1.jpg", 1, 1, True, 0)]
    assert "published token check: 1 public images compared, 1 identical, 0 differing" in (out / "coverage_summary.txt").read_text()


def test_published_token_check_finds_an_altered_block(inputs, tmp_path):
    lines = inputs["rows"].read_text().splitlines()
    row = json.loads(lines[0])
    start = row["tokens"].index(C.BEGIN_IMAGE_ID)
    row["tokens"][start + 10] = 4 + (row["tokens"][start + 10] - 4 + 1) % C.NUM_IMAGE_CODES  # one code changed, still valid
    row["tokens"][start + 20] = 4 + (row["tokens"][start + 20] - 4 + 7) % C.NUM_IMAGE_CODES
    inputs["rows"].write_text("\n".join([json.dumps(row)] + lines[1:]) + "\n")
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run_stage(inputs, out, workers=workers, max_published_mismatch_fraction=1.0)
        check = read_artifact(out / "published_token_check.parquet").to_pylist()
        assert [(r["image_key"], r["identical"], r["differing_rows"], r["differing_codes"]) for r in check] == [("public:a/1.jpg", False, 1, 2)]
        assert "1 differing" in (out / "coverage_summary.txt").read_text()
        # The public row keeps its published tokens: the check reports, it does not rewrite.
        assert read_artifact(out / "dataset_public.parquet").to_pylist()[0]["tokens"] == row["tokens"]
        with pytest.raises(AssemblyError, match=r"(?s)1 of 1 public images differ.*max-published-mismatch-fraction.*public:a/1.jpg: 2 of 1024"):
            run_stage(inputs, out, workers=workers, max_published_mismatch_fraction=0.5)
        assert not list(out.iterdir())


def test_published_token_check_without_public_blocks(inputs, tmp_path):
    blocks = read_artifact(inputs["image_blocks"])
    only_credentialed = tmp_path / "blocks.parquet"
    write_artifact(blocks.filter(pa.compute.equal(blocks.column("credential"), "yes")), only_credentialed, artifact="image_blocks")
    out = tmp_path / "out"
    run_stage({**inputs, "image_blocks": only_credentialed}, out, max_published_mismatch_fraction=0.0)
    assert read_artifact(out / "published_token_check.parquet").num_rows == 0
    assert "published token check: skipped" in (out / "coverage_summary.txt").read_text()


# --- cleanup on failure (issue 11 item 4) --------------------------------------------------------


@pytest.fixture()
def scratch_root(tmp_path, monkeypatch):
    """Shared-memory folders of the stage and of the range reader, made under a folder of the test."""
    import tempfile

    from medmax_pipeline.core import parallel_rows
    from medmax_pipeline.stages.assemble import stage

    root = tmp_path / "shm"
    root.mkdir()

    def scratch(prefix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=root))

    monkeypatch.setattr(parallel_rows, "shared_scratch_dir", scratch)
    monkeypatch.setattr(stage, "shared_scratch_dir", scratch)
    return root


def failing_tokenizer_lineage(tokenizer_path):
    from medmax_pipeline.stages.assemble import stage

    real = stage.describe_input

    def describe(path, *args, **kwargs):
        if Path(path) == Path(tokenizer_path):
            raise OSError("tokenizer vanished")
        return real(path, *args, **kwargs)

    return describe


def failing_group(writer_artifact: str | None = None, whole_artifact: str | None = None):
    """The stage's ArtifactGroup, failing to open the streamed writer of one artifact or to write
    one whole artifact (as a full disk would)."""
    from medmax_pipeline.core.artifacts import ArtifactGroup

    class Failing(ArtifactGroup):
        def writer(self, path, schema, **kwargs):
            if kwargs.get("artifact") == writer_artifact:
                raise OSError(f"cannot open the {writer_artifact} writer")
            return super().writer(path, schema, **kwargs)

        def write_artifact(self, table, path, **kwargs):
            if kwargs.get("artifact") == whole_artifact:
                raise OSError(f"disk full while writing {whole_artifact}")
            return super().write_artifact(table, path, **kwargs)

    return Failing


def failing_public_batches(batch):
    raise OSError("disk full while writing dataset_public")


@pytest.mark.parametrize("failure", ["tokenizer_lineage", "problems_writer", "public_writer", "late_artifact"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_failure_anywhere_leaves_nothing_and_a_retry_succeeds(inputs, tmp_path, scratch_root, monkeypatch, failure, workers):
    from medmax_pipeline.stages.assemble import stage

    out = tmp_path / "out"
    run_stage(inputs, out, workers=workers)  # a complete earlier run must not survive a failed one
    with monkeypatch.context() as patch:
        if failure == "tokenizer_lineage":
            patch.setattr(stage, "describe_input", failing_tokenizer_lineage(inputs["tokenizer_path"]))
        elif failure == "problems_writer":
            patch.setattr(stage, "ArtifactGroup", failing_group(writer_artifact="dataset_problems"))
        elif failure == "public_writer":
            patch.setattr(stage, "_public_rows", failing_public_batches)
        else:
            patch.setattr(stage, "ArtifactGroup", failing_group(whole_artifact="separator_stats"))
        with pytest.raises(OSError):
            run_stage(inputs, out, workers=workers)
        assert list(out.iterdir()) == []  # no output, old or new, and no temporary file
        assert list(scratch_root.iterdir()) == []  # no shared-memory handoff or codes folder
    run_stage(inputs, out, workers=workers)
    assert sorted(p.name for p in out.iterdir()) == sorted(stage.OUTPUT_FILES)


# --- an image input with a renamed column (issue 20 item 14) --------------------------------------


@pytest.mark.parametrize(
    "option, rename, message",
    [
        ("image_blocks", {"image_key": "key"}, "the image_blocks file has no column 'image_key'"),
        ("image_blocks", {"block": "codes"}, "the image_blocks file has no column 'block'"),
        ("token_errors", {"reason": "why"}, "the image_token_errors file has no column 'reason'"),
        ("path_problems", {"image_key": "key"}, "the image_path_problems file has no column 'image_key'"),
    ],
)
def test_an_image_input_with_a_renamed_column_is_one_error_naming_file_and_column(inputs, tmp_path, capsys, option, rename, message):
    artifact = {"image_blocks": "image_blocks", "token_errors": "image_token_errors", "path_problems": "image_path_problems"}[option]
    table = read_artifact(inputs[option])
    renamed = tmp_path / f"renamed_{option}.parquet"
    write_artifact(table.rename_columns([rename.get(n, n) for n in table.column_names]), renamed, artifact=artifact)
    out = tmp_path / "out"
    argv = ["assemble", "--rows", str(inputs["rows"]), "--split", "train", "--image-blocks", str(inputs["image_blocks"]),
            "--path-problems", str(inputs["path_problems"]), "--token-errors", str(inputs["token_errors"]),
            "--tokenizer", str(inputs["tokenizer_path"]), "--credentialed", f"{SOURCE}=/data/mimic={TEMPLATE}",
            "--max-error-fraction", "0.5", "--output-dir", str(out)]
    argv[argv.index(str(inputs[option]))] = str(renamed)
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {renamed}: {message} (its columns: {', '.join(rename.get(n, n) for n in table.column_names)})"]
    assert not (out / "dataset.parquet").exists()


def test_an_image_blocks_file_whose_block_column_holds_text_is_refused(inputs, tmp_path):
    table = read_artifact(inputs["image_blocks"])
    bad = tmp_path / "bad_blocks.parquet"
    write_artifact(table.set_column(table.column_names.index("block"), "block", pa.array(["x"] * table.num_rows)), bad, artifact="image_blocks")
    with pytest.raises(ValueError, match=rf"{bad}: column 'block' of the image_blocks file is string, expected a list of integer ids"):
        run_stage({**inputs, "image_blocks": bad}, tmp_path / "out")


# --- text copied from a credentialed row into a public row (issue 20 item 6) ---------------------

REPORT = ("Findings: There is a small left apical pneumothorax measuring 8 mm. The cardiomediastinal silhouette "
          "is within normal limits. Impression: small left apical pneumothorax.")


def test_response_digest_normalises_and_ignores_short_answers():
    from medmax_pipeline.stages.assemble.copied_text import MIN_RESPONSE_CHARS, normalise, response_digest, response_text

    sep = C.SEPARATOR_TOKEN
    assert response_text(f"Q?{sep}A{sep}B") == f"A{sep}B" and response_text("no separator") == "no separator"
    assert normalise("  Ｆｉｎｄｉｎｇｓ:\u00a0NO\tacute\n\nDISEASE ") == "findings: no acute disease"
    digest = response_digest(f"Describe.{sep}{REPORT}")
    assert digest is not None
    assert response_digest(f"Other question <image>{sep}  {REPORT.upper().replace(' ', '   ')}\n") == digest
    assert response_digest(REPORT) == digest  # a row without separator: its whole text
    assert response_digest(f"Q{sep}{REPORT} Extra sentence.") != digest
    for short in ("yes", "No", "A", "No acute cardiopulmonary process.", "x" * (MIN_RESPONSE_CHARS - 1)):
        assert response_digest(f"Question?{sep}{short}") is None


def test_credentialed_responses_are_read_from_jsonl_and_parquet(tmp_path):
    from medmax_pipeline.stages.assemble.copied_text import credentialed_response_digests, response_digest

    rows = [
        {"text": f"a{C.SEPARATOR_TOKEN}{REPORT}", "tokens": [], "task": "t", "source": "s", "credential": "YES"},
        {"text": f"b{C.SEPARATOR_TOKEN}{REPORT} Public.", "tokens": [0, 5, 2], "task": "t", "source": "s", "credential": " No "},
        {"text": f"c{C.SEPARATOR_TOKEN}{REPORT} Unlabelled.", "tokens": [], "task": "t", "source": "s"},
    ]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "tokens"} for r in rows]), parquet)
    expected = {response_digest(rows[0]["text"]), response_digest(rows[2]["text"])}  # all but the credential = no row
    assert credentialed_response_digests(jsonl) == expected
    assert credentialed_response_digests(parquet) == expected


def test_public_row_with_a_credentialed_rows_text_is_refused(inputs, tmp_path):
    sep = C.SEPARATOR_TOKEN
    tok = inputs["tokenizer_path"]

    def public(text: str) -> str:
        return json.dumps({"text": text, "tokens": published(tok, text, None), "task": "VQA", "source": "slake", "credential": "no"})

    copies = [
        public(f"What does the report say?{sep}{REPORT}"),  # exact response
        public("Summarize." + sep + "  " + REPORT.lower().replace(". ", ".\n") + "  "),  # case and whitespace changed
        public(f"Is there an effusion?{sep}Yes"),  # a short common answer, also a credentialed row's: kept
    ]
    lines = inputs["rows"].read_text().splitlines()
    # The public copies come first, the credentialed rows they copy last: the pre-pass sees them anyway.
    lines = copies + lines + [json.dumps(cred_row(1, text=f"Describe the image. <image>{sep}{REPORT}")),
                              json.dumps(cred_row(9, text=f"Is there an effusion?{sep}Yes", dicom_id=None))]
    inputs["rows"].write_text("\n".join(lines) + "\n")
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run_stage(inputs, out, workers=workers)
        problems = {p["line"]: p for p in read_artifact(out / "dataset_problems.parquet").to_pylist()}
        for line in (1, 2):
            assert problems[line]["category"] == "credentialed_text_in_public_row" and "credential = yes row" in problems[line]["reason"]
        public_lines = read_artifact(out / "dataset_public.parquet").column("line").to_pylist()
        dataset_lines = read_artifact(out / "dataset.parquet").column("line").to_pylist()
        assert 1 not in public_lines and 2 not in public_lines and 1 not in dataset_lines and 2 not in dataset_lines
        assert 3 in public_lines and 3 not in problems  # "Yes" is too short to say anything was copied
        assert len(lines) - 1 in dataset_lines  # the credentialed report row itself is assembled
        coverage = read_artifact(out / "coverage.parquet", "coverage").to_pylist()
        assert sum(r["credentialed_text_in_public_row"] for r in coverage) == 2
    # Not counted as malformed input: the error budget the fixture needs is unchanged.
    run_stage(inputs, tmp_path / "budget", max_error_fraction=5 / len(lines))
