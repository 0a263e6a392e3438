"""Stage 2: sharding, broken images, resume after a kill, gather, and the CLI."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_preprocess import png_with_header_size  # noqa: E402
from vqgan_fixtures import write_checkpoint, write_images  # noqa: E402

from medmax_pipeline.core.artifacts import ArtifactError, read_artifact, read_meta, write_artifact  # noqa: E402
from medmax_pipeline.models.image_preprocess import load_image_pixels  # noqa: E402
from medmax_pipeline.stages.tokenize_images import (  # noqa: E402
    ImageRow,
    TokenizeInputError,
    chunk_ranges,
    gather_tokens,
    prepare_vqgan,
    rank_chunks,
    read_image_list,
    shard_of,
    shard_paths,
    shard_rows,
    tokenize_shard,
)
from medmax_pipeline.models.vqgan import load_vqgan  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------------------------
# Pure logic
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7, 64])
def test_every_image_lands_in_exactly_one_shard(num_shards: int) -> None:
    rows = [ImageRow(f"images/{i:04d}/scan {i}.png", f"public:{i}", "no") for i in range(500)]
    shards = [shard_rows(rows, s, num_shards) for s in range(num_shards)]
    paths = [r.img_path for shard in shards for r in shard]
    assert len(paths) == len(set(paths)) == len(rows)
    assert set(paths) == {r.img_path for r in rows}
    assert all([r.img_path for r in shard] == sorted(r.img_path for r in shard) for shard in shards)
    # an image's shard does not depend on the other images of the list
    for s, shard in enumerate(shards):
        assert all(r in shard_rows([r], s, num_shards) for r in shard[:5])
    if num_shards > 1:
        assert sum(1 for shard in shards if shard) >= min(num_shards, 2)


def test_shard_of_rejects_bad_counts() -> None:
    with pytest.raises(ValueError):
        shard_of("a.png", 0)
    with pytest.raises(ValueError):
        shard_rows([], 3, 3)


def test_chunks_and_ranks_partition_the_shard() -> None:
    ranges = chunk_ranges(10, 3)
    assert [list(r) for r in ranges] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    for world in (1, 2, 3, 5):
        owned = [c for rank in range(world) for c in rank_chunks(len(ranges), rank, world)]
        assert sorted(owned) == list(range(len(ranges)))


def test_read_image_list_carries_columns_and_checks_them(tmp_path: Path) -> None:
    good = write_csv(
        tmp_path / "a.csv",
        [
            {"img_path": "b.png", "image_key": "public:b", "credential": "yes", "extra": "1"},
            {"img_path": "a.png", "image_key": "public:a", "credential": "", "extra": "2"},
            {"img_path": "b.png", "image_key": "public:b", "credential": "yes", "extra": "3"},
        ],
    )
    assert read_image_list(good) == [ImageRow("b.png", "public:b", "yes"), ImageRow("a.png", "public:a", "no")]
    plain = write_csv(tmp_path / "plain.csv", [{"img_path": "00123.png"}])  # digits stay text
    assert read_image_list(plain) == [ImageRow("00123.png", None, "no")]
    cases = {
        "no img_path column": [{"path": "a.png"}],
        "data row 2: empty img_path": [{"img_path": "a.png"}, {"img_path": ""}],
        "data row 1: credential must be 'yes' or 'no'": [{"img_path": "a.png", "credential": "maybe"}],
        "data row 2: img_path 'a.png' repeats data row 1": [
            {"img_path": "a.png", "credential": "no"}, {"img_path": "a.png", "credential": "yes"},
        ],
    }
    for message, rows in cases.items():
        path = write_csv(tmp_path / "bad.csv", rows)
        with pytest.raises(TokenizeInputError, match=message) as info:
            read_image_list(path)
        assert str(path) in str(info.value)


# ----------------------------------------------------------------------------------------------
# End to end on a small random VQGAN
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("tokenize")
    write_checkpoint(root / "ckpt", seed=7)
    good = write_images(root / "images", seed=3, count=4)
    broken_dir = root / "broken"
    broken_dir.mkdir()
    jpeg = good[1].read_bytes()
    (broken_dir / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (broken_dir / "zero.png").write_bytes(b"")
    (broken_dir / "text.png").write_text("<html>not found</html>\n")
    png_with_header_size(broken_dir / "bomb.png", 100_000, 100_000)
    broken = {
        broken_dir / "truncated.jpg": "truncated",
        broken_dir / "zero.png": "empty file",
        broken_dir / "text.png": "not a recognised image",
        broken_dir / "missing.png": "file not found",
        broken_dir / "bomb.png": "decompression bomb",
    }
    rows = [
        {"img_path": str(p), "image_key": f"public:{p.name}", "credential": "yes" if i == 0 else "no"}
        for i, p in enumerate([*good, *broken])
    ]
    csv_path = write_csv(root / "img_paths.csv", rows)
    return {"root": root, "ckpt": root / "ckpt", "csv": csv_path, "good": good, "broken": broken}


@pytest.fixture(scope="module")
def two_shard_run(dataset: dict) -> dict:
    out = dataset["root"] / "n2"
    results = [
        tokenize_shard(dataset["csv"], out, dataset["ckpt"], shard=s, num_shards=2, batch_size=2, workers=w, chunk_size=2, progress=False)
        for s, w in ((0, 1), (1, 0))
    ]
    gathered = gather_tokens(out, 2, out / "image_tokens.parquet", out / "image_token_errors.parquet")
    return {"out": out, "results": results, "gathered": gathered}


def test_tokens_and_errors_account_for_every_image(dataset: dict, two_shard_run: dict) -> None:
    out = two_shard_run["out"]
    tokens = read_artifact(out / "image_tokens.parquet", "image_tokens")
    errors = read_artifact(out / "image_token_errors.parquet", "image_token_errors")
    assert sorted(tokens.column("img_path").to_pylist()) == sorted(str(p) for p in dataset["good"])
    reasons = dict(zip(errors.column("img_path").to_pylist(), errors.column("reason").to_pylist()))
    assert set(reasons) == {str(p) for p in dataset["broken"]}
    for path, expected in dataset["broken"].items():
        assert expected in reasons[str(path)]
    assert tokens.column("img_path").to_pylist() == sorted(tokens.column("img_path").to_pylist())
    assert tokens.schema.field("img_tokens").type == pa.list_(pa.int16())
    # shards hold exactly their own images (by shard_of of the path: the tmp folder's name decides
    # how many each gets, so a run may put all nine in one shard)
    per_shard = [read_artifact(r.tokens_path).num_rows + read_artifact(r.errors_path).num_rows for r in two_shard_run["results"]]
    every_image = [*map(str, dataset["good"]), *map(str, dataset["broken"])]
    assert per_shard == [sum(shard_of(p, 2) == s for p in every_image) for s in (0, 1)] and sum(per_shard) == 9


def test_codes_and_metadata_match_a_direct_encode(dataset: dict, two_shard_run: dict) -> None:
    tokens = read_artifact(two_shard_run["out"] / "image_tokens.parquet", "image_tokens").to_pylist()
    model = load_vqgan(dataset["ckpt"])
    first = next(r for r in tokens if r["img_path"] == str(dataset["good"][3]))  # a 16-bit PNG
    loaded = load_image_pixels(first["img_path"])
    expected = model.encode_codes(loaded.pixels.unsqueeze(0))[0].tolist()
    assert first["img_tokens"] == expected and len(expected) == 1024
    assert (first["orig_width"], first["orig_height"], first["orig_mode"]) == (loaded.orig_width, loaded.orig_height, loaded.orig_mode)
    assert all(len(r["img_tokens"]) == 1024 and 0 <= min(r["img_tokens"]) and max(r["img_tokens"]) < 8192 for r in tokens)
    assert {r["image_key"] for r in tokens} == {f"public:{p.name}" for p in dataset["good"]}


def test_credential_and_lineage(dataset: dict, two_shard_run: dict) -> None:
    out = two_shard_run["out"]
    meta = read_meta(out / "image_tokens.parquet")
    assert meta.credential == "credentialed"  # the first good image is credential = yes
    tokens = read_artifact(out / "image_tokens.parquet").to_pylist()
    assert {r["img_path"]: r["credential"] for r in tokens}[str(dataset["good"][0])] == "yes"
    assert sorted(Path(i["path"]).name for i in meta.lineage["inputs"]) == sorted(
        [f"shard-{s}-of-2{x}.parquet" for s in (0, 1) for x in ("", ".errors")]
    )
    shard_meta = read_meta(two_shard_run["results"][0].tokens_path)
    assert shard_meta.lineage["params"]["precision"] == "fp32" and shard_meta.lineage["params"]["device"] == "cpu"
    assert shard_meta.lineage["params"]["vqgan_fingerprint"] == load_vqgan(dataset["ckpt"]).encoder_fingerprint()
    assert not shard_paths(out, 0, 2)[2].exists()  # chunk files removed once the shard is written


def test_gather_refuses_missing_or_wrong_shards(two_shard_run: dict, tmp_path: Path) -> None:
    out = two_shard_run["out"]
    with pytest.raises(ArtifactError, match="shard files missing"):
        gather_tokens(out, 3, tmp_path / "t.parquet", tmp_path / "e.parquet")
    fake = tmp_path / "fake"
    fake.mkdir()
    for name in ("shard-0-of-1.parquet", "shard-0-of-1.errors.parquet"):
        write_artifact(pa.table({"img_path": ["a.png"], "credential": ["no"]}), fake / name, artifact="image_paths")
    with pytest.raises(ArtifactError, match="found artifact 'image_paths', expected 'image_tokens'"):
        gather_tokens(fake, 1, tmp_path / "t.parquet", tmp_path / "e.parquet")
    assert not (tmp_path / "t.parquet").exists()


STOPPED_EXIT_CODE = 75
# `python -c` program: tokenize shard 0 of 1 of CSV into OUT with CKPT (argv 1..3) as the command
# below does, and exit STOPPED_EXIT_CODE right after the second chunk file is written.
KILLED_AFTER_TWO_CHUNKS = f"""
import os, sys
from medmax_pipeline.stages.tokenize_images import tokenize_shard
written = []
def die_after_two(chunk):
    written.append(chunk)
    if len(written) == 2:
        os._exit({STOPPED_EXIT_CODE})
tokenize_shard(sys.argv[1], sys.argv[2], sys.argv[3], batch_size=2, workers=1, chunk_size=2, after_chunk=die_after_two)
"""


def test_resume_after_kill_equals_uninterrupted_run(dataset: dict, two_shard_run: dict, tmp_path: Path) -> None:
    """One shard (N=1) killed after its second chunk, then resumed: the gathered result has the same
    fingerprints as the uninterrupted two-shard run (so resume and the shard count change nothing)."""
    out = tmp_path / "n1"
    command = [
        sys.executable, "-m", "medmax_pipeline", "tokenize", "--input", str(dataset["csv"]), "--output", str(out),
        "--ckpt", str(dataset["ckpt"]), "--shard", "0", "--num-shards", "1", "--batch-size", "2", "--workers", "1",
        "--chunk-size", "2",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # The first run dies (os._exit: no cleanup, as abrupt as a kill) once its second chunk file is written.
    killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_TWO_CHUNKS, str(dataset["csv"]), str(out), str(dataset["ckpt"])],
                            env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == STOPPED_EXIT_CODE, killed.stderr[-2000:]
    tokens_path, errors_path, chunk_dir = shard_paths(out, 0, 1)
    assert not tokens_path.exists() and len(list(chunk_dir.glob("chunk-*.parquet"))) == 2
    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "3 chunks computed, 2 reused" in resumed.stdout
    assert "img/s" in resumed.stderr  # tqdm progress bar on stderr
    gather = [sys.executable, "-m", "medmax_pipeline", "gather-tokens", "--shards", str(out), "--num-shards", "1",
              "--output", str(out / "t.parquet"), "--errors", str(out / "e.parquet")]
    assert subprocess.run(gather, env=env, capture_output=True, timeout=120).returncode == 0
    reference = two_shard_run["out"]
    assert read_meta(out / "t.parquet").fingerprint == read_meta(reference / "image_tokens.parquet").fingerprint
    assert read_meta(out / "e.parquet").fingerprint == read_meta(reference / "image_token_errors.parquet").fingerprint


def test_stale_chunks_are_recomputed(dataset: dict, tmp_path: Path) -> None:
    """A chunk made with other weights is not reused."""
    out = tmp_path / "stale"
    rows = [{"img_path": str(dataset["good"][0]), "credential": "no"}]
    csv_path = write_csv(tmp_path / "one.csv", rows)
    first = tokenize_shard(csv_path, out, dataset["ckpt"], chunk_size=1, workers=0, keep_chunks=True, progress=False)
    assert (first.chunks_done, first.chunks_reused) == (1, 0)
    other_ckpt = tmp_path / "other"
    write_checkpoint(other_ckpt, seed=8)
    second = tokenize_shard(csv_path, out, other_ckpt, chunk_size=1, workers=0, keep_chunks=True, progress=False)
    assert (second.chunks_done, second.chunks_reused) == (1, 0)
    third = tokenize_shard(csv_path, out, other_ckpt, chunk_size=1, workers=0, progress=False)
    assert (third.chunks_done, third.chunks_reused) == (0, 1)
    assert read_artifact(third.tokens_path).column("img_tokens").to_pylist() != [
        load_vqgan(dataset["ckpt"]).encode_codes(load_image_pixels(rows[0]["img_path"]).pixels[None])[0].tolist()
    ]


def test_tf32_on_cpu_is_refused(dataset: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tf32 only exists on CUDA"):
        tokenize_shard(dataset["csv"], tmp_path, dataset["ckpt"], precision="tf32", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            tokenize_shard(dataset["csv"], tmp_path, dataset["ckpt"], device="cuda", progress=False)


def test_bf16_precision_keeps_the_codebook_search_in_fp32(dataset: dict) -> None:
    model = prepare_vqgan(dataset["ckpt"], device="cpu", precision="bf16")
    assert model.encoder.conv_in.weight.dtype == torch.bfloat16
    assert model.quant_conv.weight.dtype == torch.bfloat16
    assert model.quantize.embedding.weight.dtype == torch.float32
    assert not model.training
    assert prepare_vqgan(dataset["ckpt"], device="cpu", precision="fp32").encoder.conv_in.weight.dtype == torch.float32


def test_torchrun_ranks_split_the_shard_and_give_the_same_artifact(dataset: dict, two_shard_run: dict, tmp_path: Path) -> None:
    """Two torchrun ranks (gloo on CPU) share shard 0 of 2: the artifact equals the single-process one."""
    out = tmp_path / "ranks"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "medmax_pipeline",
        "tokenize", "--input", str(dataset["csv"]), "--output", str(out), "--ckpt", str(dataset["ckpt"]),
        "--shard", "0", "--num-shards", "2", "--batch-size", "2", "--workers", "0", "--chunk-size", "1", "--no-progress",
    ]
    result = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    single = two_shard_run["out"]
    for name in ("shard-0-of-2.parquet", "shard-0-of-2.errors.parquet"):
        assert read_meta(out / name).fingerprint == read_meta(single / name).fingerprint, name


# ----------------------------------------------------------------------------------------------
# Issue 11: aliases of one image, credentialed roots, one error line, one run per shard
# ----------------------------------------------------------------------------------------------


def test_several_keys_for_one_file_are_all_tokenized(dataset: dict, tmp_path: Path) -> None:
    """collect lists './a.png', 'a.png/' and a symlink alias as their own keys with one resolved file:
    tokenize encodes the file and gives every key its row, never refusing the list."""
    image = str(dataset["good"][0])
    other = str(dataset["good"][1])
    keys = ["public:./a.png", "public:a.png", "public:a.png/", "public:link.png"]
    rows = [{"img_path": image, "image_key": k, "credential": "no"} for k in keys]
    rows.append({"img_path": other, "image_key": "public:b.png", "credential": "no"})
    rows.append({"img_path": image, "image_key": "public:a.png", "credential": "no"})  # an exact repeat collapses
    csv_path = write_csv(tmp_path / "aliases.csv", rows)
    assert [r.image_key for r in read_image_list(csv_path)] == [*keys, "public:b.png"]
    out = tmp_path / "out"
    for shard in (0, 1):
        tokenize_shard(csv_path, out, dataset["ckpt"], shard=shard, num_shards=2, chunk_size=2, workers=0, progress=False)
    gather_tokens(out, 2, out / "t.parquet", out / "e.parquet")
    tokens = read_artifact(out / "t.parquet", "image_tokens").to_pylist()
    by_key = {r["image_key"]: r for r in tokens}
    assert sorted(by_key) == sorted([*keys, "public:b.png"]) and len(tokens) == 5
    assert all(by_key[k]["img_path"] == image and by_key[k]["img_tokens"] == by_key[keys[0]]["img_tokens"] for k in keys)
    expected = load_vqgan(dataset["ckpt"]).encode_codes(load_image_pixels(image).pixels[None])[0].tolist()
    assert by_key[keys[0]]["img_tokens"] == expected


def test_images_under_a_credentialed_root_are_credentialed_whatever_the_csv_says(dataset: dict, tmp_path: Path) -> None:
    root = tmp_path / "mimic"
    (root / "files").mkdir(parents=True)
    inside = root / "files" / "x.png"
    inside.write_bytes(dataset["good"][0].read_bytes())
    alias = tmp_path / "alias.png"
    alias.symlink_to(inside)  # a path outside the root whose file lies inside it
    linked_root = tmp_path / "linked-root"
    linked_root.symlink_to(root)
    public = str(dataset["good"][1])
    csv_path = write_csv(tmp_path / "img_paths.csv", [{"img_path": p} for p in (str(inside), str(alias), public)])
    rows = read_image_list(csv_path, credentialed_roots=[linked_root])
    assert {r.img_path: r.credential for r in rows} == {str(inside): "yes", str(alias): "yes", public: "no"}
    assert [r.credential for r in read_image_list(csv_path)] == ["no", "no", "no"]  # the CSV alone says no
    result = tokenize_shard(csv_path, tmp_path / "out", dataset["ckpt"], workers=0, progress=False, credentialed_roots=[root])
    assert read_meta(result.tokens_path).credential == "credentialed"
    tokens = read_artifact(result.tokens_path).to_pylist()
    assert {r["img_path"]: r["credential"] for r in tokens} == {str(inside): "yes", str(alias): "yes", public: "no"}


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    from medmax_pipeline import cli

    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_ordinary_input_errors_print_one_error_line(dataset: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["tokenize", "--input", str(dataset["csv"]), "--output", str(tmp_path / "o"), "--ckpt", str(dataset["ckpt"]), "--no-progress"]
    assert "--num-shards must be at least 1, got 0" in _cli_error([*base, "--num-shards", "0"], capsys)
    assert "--shard 2 is outside 0..1" in _cli_error([*base, "--shard", "2", "--num-shards", "2"], capsys)
    assert "--batch-size must be at least 1" in _cli_error([*base, "--batch-size", "0"], capsys)
    assert "--chunk-size must be at least 1" in _cli_error([*base, "--chunk-size", "0"], capsys)
    missing = tmp_path / "missing.csv"
    assert str(missing) in _cli_error(["tokenize", *base[3:], "--input", str(missing)], capsys)
    assert "no img_path column" in _cli_error(
        ["tokenize", *base[3:], "--input", str(write_csv(tmp_path / "bad.csv", [{"path": "a.png"}]))], capsys)
    assert "checkpoint folder does not exist" in _cli_error([*base[:5], "--ckpt", str(tmp_path / "no-ckpt"), *base[7:]], capsys)
    gather = ["gather-tokens", "--shards", str(tmp_path), "--output", str(tmp_path / "t.parquet"), "--errors", str(tmp_path / "e.parquet")]
    assert "--num-shards must be at least 1, got 0" in _cli_error([*gather, "--num-shards", "0"], capsys)
    assert "shard files missing" in _cli_error([*gather, "--num-shards", "2"], capsys)


def test_main_turns_an_ordinary_error_of_any_subcommand_into_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import types

    from medmax_pipeline import cli

    module = types.ModuleType("medmax_fake_stage")
    module.add_arguments = lambda parser: parser.add_argument("--raise", dest="kind")
    errors = {"os": FileNotFoundError(2, "No such file or directory", "rows.jsonl"), "value": ValueError("bad value"),
              "artifact": ArtifactError("x.parquet is not a medmax artifact")}

    def run(args):
        if args.kind == "bug":
            raise TypeError("a bug keeps its traceback")
        raise errors[args.kind]

    module.run = run
    monkeypatch.setitem(sys.modules, "medmax_fake_stage", module)
    monkeypatch.setitem(cli.SUBCOMMANDS, "fake", ("medmax_fake_stage", "a test stage"))
    assert "rows.jsonl" in _cli_error(["fake", "--raise", "os"], capsys)
    assert _cli_error(["fake", "--raise", "value"], capsys) == "error: bad value"
    assert "not a medmax artifact" in _cli_error(["fake", "--raise", "artifact"], capsys)
    with pytest.raises(TypeError):
        cli.main(["fake", "--raise", "bug"])


def test_a_second_run_on_one_shard_is_refused_naming_the_lock_and_its_holder(dataset: dict, tmp_path: Path) -> None:
    out = tmp_path / "locked"
    out.mkdir()
    lock = out / ".shard-0-of-1.lock"
    holder_script = (
        "import fcntl, os, sys, time\n"
        f"f = open({str(lock)!r}, 'a+')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.seek(0); f.truncate(); f.write(str(os.getpid())); f.flush()\n"
        "print('held', flush=True)\n"
        "time.sleep(120)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", holder_script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(Exception) as info:
            tokenize_shard(dataset["csv"], out, dataset["ckpt"], workers=0, progress=False)
        message = str(info.value)
        assert "another medmax tokenize run" in message and str(lock) in message and f"pid {holder.pid}" in message
        assert not shard_paths(out, 0, 1)[0].exists()
        # Other shards of the same folder are not blocked (Snakemake runs them side by side).
        other = tokenize_shard(dataset["csv"], out, dataset["ckpt"], shard=1, num_shards=2, workers=0, progress=False)
        assert other.tokens_path.exists()
    finally:
        holder.kill()
        holder.wait()
    # Once the holder is gone the run goes ahead, and leaves no lock file behind.
    result = tokenize_shard(dataset["csv"], out, dataset["ckpt"], workers=0, progress=False)
    assert result.tokens_path.exists() and not list(out.glob(".*.lock"))


def test_workflow_passes_every_credentialed_root_quoted(tmp_path: Path) -> None:
    """tokenize.smk gives each configured credentialed root as --credentialed-root (one shell word,
    however it is spelled), and collect and tokenize get the custom template and roots unformatted."""
    import yaml

    with open(REPO / "config.yaml") as f:
        config = yaml.safe_load(f)
    config["results_dir"] = str(tmp_path / "results")
    # Inside the results folder: with the demo on, the demo writes them (config.py refuses others).
    roots = [str(tmp_path / "results" / "it's a root"), str(tmp_path / "results" / "second root")]
    template = "files/p{subject_id:.2}/p{subject_id}/s{study_id}/{dicom_id}.jpg"
    config["images"]["credentialed"] = [
        {"source": "mimic_cxr", "root": roots[0], "template": "mimic_cxr_jpg"},
        {"source": "other", "root": roots[1], "template": template},
    ]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "-p", "--nolock", "--until", "tokenize_shard", "--configfile", str(path),
         "-s", str(REPO / "Snakefile"), "--directory", str(tmp_path)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    quoted = ["'" + root.replace("'", "'\\''") + "'" for root in roots]
    tokenize_commands = [line for line in out.splitlines() if " tokenize --input " in line]
    assert len(tokenize_commands) == config["tokenize"]["num_shards"], out
    for command in tokenize_commands:
        assert f"--credentialed-root {quoted[0]} --credentialed-root {quoted[1]}" in command
    assert f"--credentialed 'other={roots[1]}={template}'" in out  # collect: the template as written
