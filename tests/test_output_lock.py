"""One writer per output: every writing stage holds a lock beside its outputs (core/output_lock),
with a fallback for filesystems without flock; a refused run does not truncate the earlier log."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from medmax_pipeline import cli
from medmax_pipeline.core import output_lock
from medmax_pipeline.core.output_lock import (
    OUTPUT_ARGUMENTS,
    OutputLockedError,
    hold_lock,
    hold_output_locks,
    lock_path_for,
)

REPO = Path(__file__).resolve().parents[1]
# Hold the lock of argv[1] (taken as `medmax argv[2]` would) until stdin closes.
HOLDER = (
    "import sys\n"
    "from medmax_pipeline.core.output_lock import hold_lock, lock_path_for\n"
    "with hold_lock(lock_path_for(sys.argv[1]), 'medmax ' + sys.argv[2]):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.read()\n"
)


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def start_holder(output: Path, command: str) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output), command], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=child_env())
    assert holder.stdout.readline().strip() == "held"
    return holder


def stop(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    holder.wait(timeout=60)


def test_every_writing_subcommand_locks_arguments_it_has() -> None:
    writes_nothing_or_locks_itself = {"inspect", "validate-config", "tokenize", "demo", "train-node"}
    assert set(OUTPUT_ARGUMENTS) == set(cli.SUBCOMMANDS) - writes_nothing_or_locks_itself
    for command, names in OUTPUT_ARGUMENTS.items():
        module = importlib.import_module(cli.SUBCOMMANDS[command][0])
        suffix = command.replace("-", "_")
        parser = argparse.ArgumentParser()
        (getattr(module, f"add_{suffix}_arguments", None) or module.add_arguments)(parser)
        dests = {action.dest for action in parser._actions}
        assert set(names) <= dests, f"{command}: {set(names) - dests} are not its arguments"


def test_a_second_assemble_into_one_folder_is_refused_and_appends_to_the_log(tmp_path: Path) -> None:
    out = tmp_path / "assemble" / "train"
    holder = start_holder(out, "assemble")
    log = tmp_path / "assemble.log"
    log.write_text("first run: assembling\n")
    try:
        # The rule's own redirect: >> keeps what the running job wrote.
        command = (f"{sys.executable} -m medmax_pipeline assemble --rows {tmp_path / 'rows.jsonl'} --split train"
                   f" --tokenizer {tmp_path / 'tok.json'} --output-dir {out} >> {log} 2>&1")
        done = subprocess.run(["bash", "-c", command], env=child_env(), timeout=300)
    finally:
        stop(holder)
    assert done.returncode == 1
    lines = log.read_text().splitlines()
    assert lines[0] == "first run: assembling" and len(lines) == 2
    lock = lock_path_for(out)
    assert lines[1] == (f"error: another medmax assemble run holds {lock} (pid {holder.pid} on {socket.gethostname()}); "
                        "wait for it to finish (or stop it) before running again")
    assert not out.exists()  # nothing of the refused run was written
    assert not lock.exists()  # released by the holder


def test_every_rule_appends_to_its_log() -> None:
    for rule_file in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        text = rule_file.read_text()
        assert not re.search(r"(?<!>)> \{log", text), f"{rule_file.name}: a rule truncates its log"


def test_outputs_are_locked_file_by_file_and_only_by_rank_0(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = argparse.Namespace(output=tmp_path / "t.parquet", errors=tmp_path / "e.parquet")
    with hold_output_locks("gather-tokens", args) as locks:
        assert sorted(p.name for p in locks) == [".e.parquet.lock", ".t.parquet.lock"]
        with pytest.raises(OutputLockedError, match=r"another medmax gather-tokens run holds .*\.e\.parquet\.lock"):
            with hold_output_locks("gather-tokens", args):
                pass
        # Other outputs in the same folder are free.
        with hold_output_locks("map-vocab", argparse.Namespace(output=tmp_path / "image_blocks.parquet")):
            pass
        monkeypatch.setenv("RANK", "1")  # another rank of a torchrun job: rank 0 holds for it
        monkeypatch.setenv("WORLD_SIZE", "2")
        with hold_output_locks("gather-tokens", args) as none:
            assert none == []
    assert not list(tmp_path.glob(".*.lock"))


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_without_flock_the_lock_is_an_exclusively_created_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    def no_flock(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(output_lock, "_flock", no_flock)
    lock = tmp_path / ".out.lock"
    with hold_lock(lock, "medmax score"):
        assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
        with pytest.raises(OutputLockedError) as info:
            with hold_lock(lock, "medmax score"):
                pass
        message = str(info.value)
        assert f"holds {lock} (pid {os.getpid()} on {socket.gethostname()})" in message and "no flock" in message
    assert not lock.exists()


def test_without_flock_a_dead_runs_lock_is_taken_and_another_hosts_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output_lock, "_flock", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOLCK, "no locks")))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = tmp_path / ".out.lock"
    lock.write_text(f"{socket.gethostname()} {dead.pid}")  # left by a killed run on this host
    with hold_lock(lock, "medmax score"):
        assert lock.read_text() == f"{socket.gethostname()} {os.getpid()}"
    lock.write_text("other-node 12345")
    with pytest.raises(OutputLockedError, match=r"pid 12345 on other-node.*remove .*\.out\.lock yourself"):
        with hold_lock(lock, "medmax score"):
            pass
    assert lock.read_text() == "other-node 12345"  # never removed on a guess


def test_an_unexpected_flock_error_is_not_taken_for_a_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(output_lock, "_flock", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        with hold_lock(tmp_path / ".out.lock"):
            pass
