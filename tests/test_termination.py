"""Stopped by a signal (SLURM's SIGTERM at the time limit or on scancel, Ctrl-C): every writing
stage removes its temporary files and /dev/shm folders, keeps its finished work, exits 128 +
signal with one `error:` line; a rerun resumes. And the debris of SIGKILLed runs (owner dead) is
removed by the next run, never anything else (issue 19 item 3, issue 20 item 9).

Each stage runs as a real process (termination_driver.py) that pauses, with its temporary files
open, at a patched-in hook; the test then sends SIGTERM."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_assemble import inputs, tokenizer_path  # noqa: E402,F401  (fixtures)
from test_assemble import SOURCE, TEMPLATE  # noqa: E402
from test_train import base_dir, text_rows, write_dataset  # noqa: E402,F401  (fixtures)
from vqgan_fixtures import write_checkpoint, write_images  # noqa: E402

from medmax_pipeline.core import termination  # noqa: E402
from medmax_pipeline.core.artifacts import read_artifact, write_artifact  # noqa: E402
from medmax_pipeline.stages.tokenize_images import tokenize_shard  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("termination_driver.py")
WRITE = "medmax_pipeline.core.artifacts:ArtifactWriter.write"
TEMPORARY = re.compile(r"(^\..*\.tmp$)|(^\.tmp-)|(\.tmp$)")


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}


def start_paused(tmp_path: Path, argv: list[str], target: str = WRITE, call: int = 1) -> subprocess.Popen:
    """Start `medmax ARGV` and wait until it pauses after the `call`-th call of `target`."""
    marker = tmp_path / f"paused-{time.monotonic_ns()}"
    spec = {"pause": {"target": target, "call": call, "marker": str(marker)}}
    process = subprocess.Popen(
        [sys.executable, str(DRIVER), json.dumps(spec), *argv], env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    while not marker.exists():
        if process.poll() is not None:
            out, err = process.communicate()
            pytest.fail(f"exited {process.returncode} before pausing:\n{out}\n{err[-4000:]}")
        time.sleep(0.05)
    return process


def run_counting(argv: list[str], target: str, file: Path) -> subprocess.CompletedProcess:
    spec = {"count": {"target": target, "file": str(file)}}
    return subprocess.run([sys.executable, str(DRIVER), json.dumps(spec), *argv], env=child_env(), capture_output=True, text=True, timeout=600)


def stop(process: subprocess.Popen, signum: int = signal.SIGTERM) -> tuple[int, str]:
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*") if TEMPORARY.search(p.name)]


def scratch_of(pid: int) -> list[Path]:
    """The pipeline's scratch folders of process `pid` (in /dev/shm or the temp folder)."""
    return [p for root in (termination.SHM_ROOT, Path(os.environ.get("TMPDIR", "/tmp"))) if root.is_dir()
            for p in root.glob(f"medmax-*~{pid}~*")]


def assert_stopped_cleanly(returncode: int, err: str, *folders: Path, pid: int) -> None:
    assert returncode == 128 + signal.SIGTERM, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error:") or ": error:" in line]
    assert len(errors) == 1 and "SIGTERM" in errors[0], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert temporaries(*folders) == []
    assert scratch_of(pid) == []


# ----------------------------------------------------------------------------------------------
# The start-up sweep
# ----------------------------------------------------------------------------------------------


def wait_until_gone(pids: list[int], limit: float = 120.0) -> None:
    deadline = time.monotonic() + limit
    while any(termination.pid_is_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            pytest.fail(f"processes {[p for p in pids if termination.pid_is_alive(p)]} still run")
        time.sleep(0.2)


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: no process has it (until the kernel reuses it, which takes a while)


def fake_scratch(root: Path, kind: str, host: str, pid: int, started: str | None = None) -> Path:
    folder = root / f"medmax-{kind}-{host}~{pid}~{secrets.token_hex(4)}"
    folder.mkdir()
    (folder / termination.SCRATCH_MARKER).write_text(json.dumps({"host": host, "pid": pid, "started": started, "kind": kind}))
    (folder / "data.arrow").write_bytes(b"x" * 10)
    return folder


def test_sweep_removes_dead_runs_debris_only(tmp_path: Path) -> None:
    host, dead, live = termination.this_host(), dead_pid(), os.getpid()
    shm = tmp_path / "shm"
    shm.mkdir()
    stale = fake_scratch(shm, "assemble", host, dead)
    reused = fake_scratch(shm, "rows", host, live, started="1")  # the pid now names another process
    kept = [
        fake_scratch(shm, "rows", host, live, started=termination.process_start(live)),  # a live run's
        fake_scratch(shm, "rows", "other-node", dead),  # another host's: its pid means nothing here
    ]
    unmarked = shm / f"medmax-rows-{host}~{dead}~0123abce"  # no marker: not provably ours
    unmarked.mkdir()
    lying = fake_scratch(shm, "rows", host, dead)
    (lying / termination.SCRATCH_MARKER).write_text(json.dumps({"host": host, "pid": live, "started": None, "kind": "rows"}))
    foreign = [shm / "medmax-notes", shm / "pymp-123", unmarked, lying]
    for folder in foreign[:2]:
        folder.mkdir()
    assert sorted(termination.sweep_stale_scratch((shm,))) == sorted([stale, reused])
    assert sorted(p for p in shm.iterdir()) == sorted(kept + foreign)

    out = tmp_path / "out"
    out.mkdir()
    target = out / "dataset.parquet"
    dead_tmp = out / f".dataset.parquet.{host}~{dead}~00000000.tmp"
    live_tmp = out / f".dataset.parquet.{host}~{live}~00000001.tmp"
    other_host_tmp = out / f".dataset.parquet.other-node~{dead}~00000002.tmp"
    old_style = out / ".dataset.parquet.1a2b3c4d.tmp"  # no owner in its name: left alone
    user_file = out / ".dataset.parquet.notes.tmp"
    for path in (dead_tmp, live_tmp, other_host_tmp, old_style, user_file):
        path.write_bytes(b"partial")
    # Writing the artifact again removes the dead run's temporary and nothing else.
    write_artifact(pa.table({"x": [1]}), target, artifact="dataset")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (target, live_tmp, other_host_tmp, old_style, user_file))


def test_a_rerun_sweeps_a_killed_runs_shm_folder_and_artifact_temporary(tmp_path: Path, inputs) -> None:
    """SIGKILL leaves debris; the next `medmax` run removes it (scratch at start, a temporary when
    it writes the same artifact)."""
    out = tmp_path / "out"
    argv = assemble_argv(inputs, out, workers=2)
    process = start_paused(tmp_path, argv, target="medmax_pipeline.stages.assemble.coverage:Coverage.add_filled")
    assert scratch_of(process.pid) and temporaries(out)
    workers = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert workers
    process.kill()
    process.wait()
    wait_until_gone([int(pid) for pid in workers])  # the pool's workers do not live on as orphans
    left = scratch_of(process.pid)
    assert left and temporaries(out)  # what SIGKILL leaves
    rerun = subprocess.run([sys.executable, "-m", "medmax_pipeline", *argv], env=child_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert scratch_of(process.pid) == [] and temporaries(out) == []
    assert (out / "dataset.parquet").is_file()


# ----------------------------------------------------------------------------------------------
# SIGTERM, stage by stage
# ----------------------------------------------------------------------------------------------


def assemble_argv(inputs: dict, out: Path, workers: int) -> list[str]:
    return [
        "assemble", "--rows", str(inputs["rows"]), "--split", "train", "--image-blocks", str(inputs["image_blocks"]),
        "--path-problems", str(inputs["path_problems"]), "--token-errors", str(inputs["token_errors"]),
        "--tokenizer", str(inputs["tokenizer_path"]), "--credentialed", f"{SOURCE}=/data/mimic={TEMPLATE}",
        "--max-error-fraction", "0.9", "--batch-size", "2", "--workers", str(workers), "--output-dir", str(out),
    ]


@pytest.mark.parametrize("workers", [2, 1])
def test_assemble_stopped_removes_temporaries_and_shm_folders(tmp_path: Path, inputs, workers: int) -> None:
    out = tmp_path / "out"
    argv = assemble_argv(inputs, out, workers)
    process = start_paused(tmp_path, argv, target="medmax_pipeline.stages.assemble.coverage:Coverage.add_filled")
    assert temporaries(out), "paused before the writers opened their files"
    if workers > 1:
        kinds = sorted(p.name.split("-")[1] for p in scratch_of(process.pid))
        assert kinds == ["assemble", "rows"]
    returncode, err = stop(process)
    assert_stopped_cleanly(returncode, err, out, pid=process.pid)
    assert list(out.iterdir()) == []  # assemble keeps nothing partial
    rerun = subprocess.run([sys.executable, "-m", "medmax_pipeline", *argv], env=child_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("images")
    write_checkpoint(root / "ckpt", seed=7)
    paths = write_images(root / "images", seed=3, count=4)
    csv_path = root / "img_paths.csv"
    csv_path.write_text("img_path,image_key,credential\n" + "".join(f"{p},public:{p.name},no\n" for p in paths))
    return {"root": root, "ckpt": root / "ckpt", "csv": csv_path, "paths": paths}


def tokenize_argv(images: dict, out: Path, *extra: str) -> list[str]:
    return [
        "tokenize", "--input", str(images["csv"]), "--output", str(out), "--ckpt", str(images["ckpt"]), "--batch-size", "1",
        "--chunk-size", "1", "--workers", "1", "--no-progress", *extra,
    ]


def test_tokenize_stopped_keeps_finished_chunks_and_the_rerun_encodes_only_the_rest(tmp_path: Path, images: dict) -> None:
    out = tmp_path / "tokens"
    argv = tokenize_argv(images, out, "--keep-chunks")
    # Paused inside the third chunk's write: chunks 0 and 1 are complete, chunk 2's temporary open.
    process = start_paused(tmp_path, argv, call=3)
    chunk_dir = out / "shard-0-of-1.chunks"
    assert temporaries(out) and len(list(chunk_dir.glob("chunk-*.parquet"))) == 2
    returncode, err = stop(process)
    assert_stopped_cleanly(returncode, err, out, pid=process.pid)
    assert sorted(p.name for p in chunk_dir.iterdir()) == ["chunk-000000.parquet", "chunk-000001.parquet"]
    assert not (out / ".shard-0-of-1.lock").exists()

    encodes = tmp_path / "encodes"
    rerun = run_counting(argv, "medmax_pipeline.models.vqgan:VQGAN.encode_codes", encodes)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(encodes.read_text().splitlines()) == 2  # images 2 and 3 only (batch size 1)
    assert "2 chunks computed, 2 reused" in rerun.stdout
    assert read_artifact(out / "shard-0-of-1.parquet").num_rows == 4


def test_tokenize_stopped_with_several_decoding_workers_leaves_no_process(tmp_path: Path, images: dict) -> None:
    out = tmp_path / "tokens"
    process = start_paused(tmp_path, tokenize_argv(images, out, "--workers", "2"), call=2)
    children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the DataLoader workers run"
    returncode, err = stop(process)
    assert_stopped_cleanly(returncode, err, out, pid=process.pid)
    for child in children:
        assert not termination.pid_is_alive(int(child)) or Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"


@pytest.fixture(scope="module")
def shards(images: dict) -> Path:
    out = images["root"] / "shards"
    for shard in (0, 1):
        tokenize_shard(images["csv"], out, images["ckpt"], shard=shard, num_shards=2, batch_size=2, workers=0, chunk_size=2, progress=False)
    return out


def test_gather_tokens_stopped_removes_its_temporary(tmp_path: Path, shards: Path) -> None:
    out = tmp_path / "gathered"
    argv = ["gather-tokens", "--shards", str(shards), "--num-shards", "2", "--output", str(out / "image_tokens.parquet"),
            "--errors", str(out / "image_token_errors.parquet")]
    process = start_paused(tmp_path, argv)
    assert temporaries(out)
    returncode, err = stop(process)
    assert_stopped_cleanly(returncode, err, out, shards, pid=process.pid)
    assert list(out.iterdir()) == []
    rerun = subprocess.run([sys.executable, "-m", "medmax_pipeline", *argv], env=child_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert read_artifact(out / "image_tokens.parquet").num_rows == 4


def test_collect_and_map_vocab_stopped_remove_their_temporaries(tmp_path: Path, shards: Path, tokenizer_path: Path) -> None:
    public = tmp_path / "public"
    (public / "slake").mkdir(parents=True)
    (public / "slake" / "a.jpg").write_bytes(b"img")
    rows = tmp_path / "train.jsonl"
    rows.write_text(json.dumps({"text": "<image>\nIs this normal?", "tokens": [0, 5, 2], "image_path": "slake/a.jpg", "task": "VQA",
                                "source": "slake", "credential": "no"}) + "\n")
    gathered = shards / "image_tokens.parquet"
    if not gathered.exists():
        from medmax_pipeline.stages.tokenize_images import gather_tokens

        gather_tokens(shards, 2, gathered, shards / "image_token_errors.parquet")
    for argv, out in (
        (["collect", "--rows", f"train={rows}", "--public-root", str(public), "--output-dir", str(tmp_path / "collect")], tmp_path / "collect"),
        (["map-vocab", "--tokens", str(gathered), "--tokenizer", str(tokenizer_path), "--output", str(tmp_path / "vocab" / "image_blocks.parquet")],
         tmp_path / "vocab"),
    ):
        process = start_paused(tmp_path, argv)
        assert temporaries(out), argv[0]
        returncode, err = stop(process)
        assert_stopped_cleanly(returncode, err, out, pid=process.pid)
        rerun = subprocess.run([sys.executable, "-m", "medmax_pipeline", *argv], env=child_env(), capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert temporaries(out) == []


def train_argv(base_dir: Path, dataset: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--dataset", str(dataset), "--base-model", str(base_dir), "--output", str(out), "--device", "cpu", "--lr", "1e-2",
        "--epochs", "1", "--batch-size", "1", "--save-every", "1", "--keep-checkpoints", "0", "--no-progress", *extra,
    ]


def test_train_stopped_while_saving_a_checkpoint_keeps_the_last_one_and_resumes(tmp_path: Path, base_dir: Path) -> None:
    dataset = write_dataset(tmp_path / "d.parquet", text_rows(4))
    out = tmp_path / "train"
    argv = train_argv(base_dir, dataset, out)
    # Paused in the second checkpoint's save (.tmp-step-2 half written): step-1 is complete.
    process = start_paused(tmp_path, argv, target="medmax_pipeline.stages.train.checkpoints:save_rng_state", call=2)
    (run_folder,) = (out / "checkpoints").iterdir()
    assert (run_folder / ".tmp-step-2").is_dir() and (run_folder / "step-1").is_dir()
    returncode, err = stop(process)
    assert_stopped_cleanly(returncode, err, out, pid=process.pid)
    assert sorted(p.name for p in run_folder.iterdir() if p.name.startswith(("step-", ".tmp"))) == ["step-1"]
    assert not (out / "adapter").exists()
    rerun = subprocess.run([sys.executable, "-m", "medmax_pipeline", *argv], env=child_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr and "(step 1 of 4)" in rerun.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_train_stopped_while_saving_the_final_adapter_removes_it_and_the_rerun_saves_it(tmp_path: Path, base_dir: Path) -> None:
    dataset = write_dataset(tmp_path / "d.parquet", text_rows(2))
    out = tmp_path / "train"
    argv = train_argv(base_dir, dataset, out)
    # Paused inside save_adapter: .tmp-adapter holds the weights, the provenance is not written yet.
    process = start_paused(tmp_path, argv, target="medmax_pipeline.stages.train.outputs:read_meta")
    assert (out / ".tmp-adapter" / "adapter_model.safetensors").is_file() and not (out / "adapter").exists()
    returncode, err = stop(process)
    assert_stopped_cleanly(returncode, err, out, pid=process.pid)
    assert not (out / ".tmp-adapter").exists() and not (out / "adapter").exists()
    (run_folder,) = (out / "checkpoints").iterdir()
    assert sorted(p.name for p in run_folder.iterdir() if p.name.startswith(("step-", ".tmp"))) == ["step-1", "step-2"]
    rerun = subprocess.run([sys.executable, "-m", "medmax_pipeline", *argv], env=child_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr and "(step 2 of 2)" in rerun.stderr
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and temporaries(out) == []


def test_torchrun_forwards_sigterm_and_every_rank_cleans_up(tmp_path: Path, base_dir: Path) -> None:
    """SIGTERM to torchrun (what SLURM signals) reaches both DeepSpeed ranks: the job stops
    non-zero, the half-written checkpoint goes, the complete one stays and a rerun resumes."""
    dataset = write_dataset(tmp_path / "d.parquet", text_rows(8))
    out = tmp_path / "ranks"
    argv = train_argv(base_dir, dataset, out, "--deepspeed", str(REPO / "workflow" / "deepspeed" / "zero2.json"))
    marker = tmp_path / "paused"
    spec = {"pause": {"target": "medmax_pipeline.stages.train.checkpoints:save_rng_state", "call": 2, "marker": str(marker)}}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    process = subprocess.Popen([*launcher, str(DRIVER), json.dumps(spec), *argv], env=child_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    while not marker.exists():
        if process.poll() is not None:
            pytest.fail(process.communicate()[1][-4000:])
        time.sleep(0.05)
    ranks = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2
    returncode, err = stop(process)
    assert returncode != 0
    assert err.count("SIGTERM") >= 2, err[-4000:]  # each rank names the signal
    for rank in ranks:
        assert not termination.pid_is_alive(int(rank))
    (run_folder,) = (out / "checkpoints").iterdir()
    assert sorted(p.name for p in run_folder.iterdir() if p.name.startswith(("step-", ".tmp"))) == ["step-1"]
    rerun = subprocess.run([*launcher, "-m", "medmax_pipeline", *argv], env=child_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" in rerun.stderr and "(step 1 of 4)" in rerun.stderr


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory):
    from medmax_pipeline.demo import default_paths, generate_demo

    paths = default_paths(tmp_path_factory.mktemp("demo"))
    generate_demo(paths, seed=0, rows_per_task=2)
    return paths


def test_generate_stopped_keeps_its_finished_rows_and_the_rerun_generates_only_the_rest(tmp_path: Path, demo) -> None:
    out = tmp_path / "pred.parquet"
    argv = ["generate", "--eval-set", str(demo.eval_set), "--image-root", str(demo.eval_image_root), "--ckpt", str(demo.checkpoint),
            "--base-model", str(demo.base_model), "--model-name", "base", "--output", str(out), "--batch-size", "1",
            "--max-items", "4", "--max-new-tokens", "closed=2", "open=3", "mcq=2"]
    appended = "medmax_pipeline.core.resume:UnitLog.append"
    process = start_paused(tmp_path, argv, target=appended, call=2)
    returncode, err = stop(process)
    assert_stopped_cleanly(returncode, err, tmp_path, pid=process.pid)
    partial = out.with_name(out.name + ".partial.jsonl")
    assert len(partial.read_text().splitlines()) == 1 + 2  # header + the two finished rows
    appends = tmp_path / "appends"
    rerun = run_counting(argv, appended, appends)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(appends.read_text().splitlines()) == 2  # rows 3 and 4 only
    assert read_artifact(out).num_rows == 4 and not partial.exists()
