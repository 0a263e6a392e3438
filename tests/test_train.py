"""Stage 5: loss mask, collation, batching, DeepSpeed config, input checks, and real tiny trainings."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from medmax_pipeline.core import artifacts
from medmax_pipeline.core import constants as C
from medmax_pipeline.demo_models import build_tiny_chameleon
from medmax_pipeline.models import chameleon as H
from medmax_pipeline.core.artifacts import read_artifact, read_meta, write_artifact
from medmax_pipeline.core.text_tokenizer import layout_tokens
from medmax_pipeline.stages.train import (
    DEFAULT_TARGET_MODULES,
    TrainConfig,
    TrainInputError,
    collate,
    label_profile,
    length_grouped_batches,
    load_token_rows,
    resolve_deepspeed_config,
    response_labels,
    shard_batches,
    steps_per_epoch,
    free_port as _free_port,
    train,
)

M = C.IGNORE_INDEX
SEP = C.SEPARATOR_ID
TEXT = list(range(8800, 8864))
REPO = Path(__file__).resolve().parents[1]


def tiny_vocabulary_map() -> dict[str, int]:
    vocab = {name: i for i, name in enumerate(layout_tokens(modified=True))}
    vocab.update({f"tok{i}": token_id for i, token_id in enumerate(TEXT)})
    return vocab


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # initializer_range 0.2: logits wide enough for a 64-wide model to fit a few rows in seconds.
    return build_tiny_chameleon(tmp_path_factory.mktemp("base"), tiny_vocabulary_map(), seed=0, initializer_range=0.2)


def write_dataset(path: Path, train_rows: Sequence[Sequence[int]], validation_rows: Sequence[Sequence[int]] = ()) -> Path:
    rows = [("train", r) for r in train_rows] + [("validation", r) for r in validation_rows]
    table = pa.table(
        {
            "row_id": [f"{split}-{i}" for i, (split, _) in enumerate(rows)],
            "split": [split for split, _ in rows],
            "text": ["" for _ in rows],
            "task": ["VQA" for _ in rows],
            "source": ["test" for _ in rows],
            "credential": ["no" for _ in rows],
            "tokens": pa.array([list(r) for _, r in rows], pa.list_(pa.int32())),
            "n_tokens": pa.array([len(r) for _, r in rows], pa.int32()),
            "truncated": [False for _ in rows],
        }
    )
    write_artifact(table, path, artifact="dataset")
    return path


def text_rows(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [rng.choice(TEXT) for _ in range(rng.randrange(3, 8))]
        response = [rng.choice(TEXT) for _ in range(rng.randrange(3, 8))]
        rows.append([C.BOS_ID, *prompt, SEP, *response, C.EOS_ID])
    return rows


def quick(base_dir: Path, dataset: Path, output: Path, **overrides) -> TrainConfig:
    settings = dict(
        dataset=dataset, base_model=base_dir, output=output, lr=1e-2, warmup_ratio=0.0, scheduler="constant",
        epochs=10, batch_size=2, save_every=0, progress=False, device="cpu",
    )
    settings.update(overrides)
    return TrainConfig(**settings)


# ----------------------------------------------------------------------------------------------
# Loss mask and collation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["first_separator", "alternating"])
def test_response_labels_single_turn_trains_response_and_eos(policy: str) -> None:
    ids = [0, 10, 11, SEP, 20, 21, 2]
    assert response_labels(ids, policy) == [M, M, M, M, 20, 21, 2]


def test_first_separator_trains_everything_after_the_first_separator() -> None:
    # user1 SEP resp1 SEP user2 SEP resp2 eos: the public rule trains user2 (30, 31) too.
    ids = [0, 10, SEP, 20, 21, SEP, 30, 31, SEP, 40, 2]
    assert response_labels(ids) == [M, M, M, 20, 21, SEP, 30, 31, SEP, 40, 2]
    assert response_labels([0, 10, 11, 2]) == [0, 10, 11, 2]  # no separator: trained whole
    assert response_labels([0, 10, SEP]) == [M, M, M]


def test_alternating_masks_every_user_turn_of_a_multi_turn_row() -> None:
    ids = [0, 10, SEP, 20, 21, SEP, 30, 31, SEP, 40, 2]
    assert response_labels(ids, "alternating") == [M, M, M, 20, 21, SEP, M, M, M, 40, 2]
    # An even number of separators: the row ends in a user turn and its eos is masked.
    assert response_labels([0, 10, SEP, 20, SEP, 30, 2], "alternating") == [M, M, M, 20, SEP, M, M]
    assert response_labels([0, 10, 11, 2], "alternating") == [M, M, M, M]


def test_response_labels_image_blocks_follow_their_turn() -> None:
    prompt_image = [C.BEGIN_IMAGE_ID, 4, 8195, C.END_IMAGE_ID]
    answer_image = [C.BEGIN_IMAGE_ID, 57, 60, C.END_IMAGE_ID]
    ids = [0, *prompt_image, 10, SEP, *answer_image, 2]
    labels = response_labels(ids)
    assert labels[: 1 + len(prompt_image) + 2] == [M] * (1 + len(prompt_image) + 2)
    assert labels[-len(answer_image) - 1 :] == [*answer_image, 2]


HAND_MADE_ROWS = [
    [0, 10, SEP, 20, 2],  # single turn
    [0, 10, SEP, 20, SEP, 30, SEP, 40, 2],  # multi-turn, odd separators
    [0, 10, SEP, 20, SEP, 30, 2],  # even separators
    [0, 10, 11, 2],  # no separator
    [0, 10, SEP],  # nothing after the separator
    [SEP, SEP, 5, 2],  # leading and doubled separators
    [0],  # one token
]


@pytest.mark.parametrize("policy", ["first_separator", "alternating"])
def test_label_profile_counts_what_response_labels_trains(policy: str) -> None:
    rng = random.Random(3)
    rows = HAND_MADE_ROWS + [[rng.choice([0, 2, 7, SEP, SEP]) for _ in range(rng.randrange(1, 12))] for _ in range(300)]
    values = np.array([t for r in rows for t in r], dtype=np.int32)
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    labels, eos_masked = label_profile(values, offsets, policy)
    for i, row in enumerate(rows):
        expected = response_labels(row, policy)
        assert labels[i] == sum(label != M for label in expected[1:]), (policy, row)
        assert eos_masked[i] == (row[-1] == C.EOS_ID and expected[-1] == M), (policy, row)


def test_collate_pads_ids_with_1_and_labels_with_ignore() -> None:
    batch = collate([[0, 10, SEP, 20, 2], [0, 11, SEP, 21, 22, 23, 2]], "alternating")
    assert batch["input_ids"].tolist() == [[0, 10, SEP, 20, 2, 1, 1], [0, 11, SEP, 21, 22, 23, 2]]
    assert batch["labels"].tolist() == [[M, M, M, 20, 2, M, M], [M, M, M, 21, 22, 23, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0, 0], [1] * 7]
    assert batch["input_ids"].dtype == torch.long


# ----------------------------------------------------------------------------------------------
# Batching
# ----------------------------------------------------------------------------------------------


def test_length_grouped_batches_are_seeded_complete_and_tight() -> None:
    lengths = np.random.default_rng(0).integers(10, 2000, size=1000)
    a = length_grouped_batches(lengths, batch_size=4, seed=7, epoch=0, group_size=16)
    assert a == length_grouped_batches(lengths, batch_size=4, seed=7, epoch=0, group_size=16)
    assert a != length_grouped_batches(lengths, batch_size=4, seed=7, epoch=1, group_size=16)
    assert a != length_grouped_batches(lengths, batch_size=4, seed=8, epoch=0, group_size=16)
    assert sorted(i for b in a for i in b) == list(range(1000))

    def padding(batches: list[list[int]]) -> int:
        return sum(len(b) * lengths[b].max() - lengths[b].sum() for b in batches)

    shuffled = np.random.default_rng(0).permutation(1000)
    random_batches = [shuffled[i : i + 4].tolist() for i in range(0, 1000, 4)]
    assert padding(a) < padding(random_batches) / 5


def test_shard_batches_and_steps_per_epoch() -> None:
    batches = [[i] for i in range(7)]
    assert shard_batches(batches, 0, 2) == [[0], [2], [4]]
    assert shard_batches(batches, 1, 2) == [[1], [3], [5]]  # [6] dropped so both ranks take 3 steps
    assert steps_per_epoch(7, 2) == 4
    assert steps_per_epoch(8, 2) == 4


# ----------------------------------------------------------------------------------------------
# DeepSpeed config
# ----------------------------------------------------------------------------------------------


def test_zero2_json_resolves_and_deepspeed_accepts_it() -> None:
    cfg = resolve_deepspeed_config(
        REPO / "workflow" / "deepspeed" / "zero2.json", micro_batch_size=1, grad_accum=4, world_size=8, bf16=True, max_grad_norm=1.0
    )
    assert cfg["zero_optimization"]["stage"] == 2
    assert cfg["train_micro_batch_size_per_gpu"] == 1
    assert cfg["gradient_accumulation_steps"] == 4
    assert cfg["train_batch_size"] == 32
    assert cfg["bf16"]["enabled"] is True
    assert cfg["gradient_clipping"] == 1.0
    from deepspeed.runtime.config import DeepSpeedConfig

    parsed = DeepSpeedConfig({k: v for k, v in cfg.items() if k != "train_batch_size"})
    assert parsed.zero_optimization_stage == 2


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"train_micro_batch_size_per_gpu": 2}, "train_micro_batch_size_per_gpu is 2 but the command line implies 1"),
        ({"optimizer": {"type": "AdamW"}}, "remove the 'optimizer' section"),
        ({"zero_optimization": {"stage": 3}}, "stage 3 is not supported"),
        ({"bf16": {"enabled": False}}, "bf16.enabled is False"),
        ({"zero_optimization": {"stage": 2, "no_such_key": 1}}, "DeepSpeed rejects it"),
    ],
)
def test_deepspeed_config_contradictions_are_refused(config: dict, message: str) -> None:
    with pytest.raises(TrainInputError, match=message):
        resolve_deepspeed_config(config, micro_batch_size=1, grad_accum=1, world_size=1, bf16=True, max_grad_norm=1.0)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------


def test_load_token_rows_truncates_and_drops_rows_with_nothing_to_train(tmp_path: Path) -> None:
    rows = [[0, 10, SEP, 20, 21, 22, 2], [0, 10, 11, 12, 2], [0, 10, 11, 12, 13, SEP, 20, 2]]
    path = write_dataset(tmp_path / "d.parquet", [[t + 8790 if t >= 10 and t < 30 else t for t in r] for r in rows])
    # first_separator: row 2 (no separator) is trained whole; row 3, cut to 6 ids, ends on its separator.
    loaded = load_token_rows(path, "train", max_length=6, vocab_size=8864)
    assert loaded.row_ids == ["train-0", "train-1"]
    assert loaded.sequence(0) == [0, 8800, SEP, 8810, 8811, 8812]
    assert (loaded.rows_read, loaded.truncated, loaded.dropped_no_labels) == (3, 2, 1)
    # alternating: row 2 has no response either.
    loaded = load_token_rows(path, "train", max_length=6, vocab_size=8864, loss_mask="alternating")
    assert loaded.row_ids == ["train-0"] and loaded.dropped_no_labels == 2
    assert loaded.eos_masked_by_task == {"VQA": (3, 1)}  # row 2's eos (row 1 lost its eos to the cut)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([[0, 8800, SEP, 9000, 2]], "token id\\(s\\) outside the model's vocabulary \\[0, 8864\\), first 9000 in row 'train-0'"),
        ([[0, C.IMAGE_PLACEHOLDER_ID, SEP, 8800, 2]], "still holds the <image> placeholder 8711"),
        ([[0, 8800, SEP, 8801, 2], []], "1 train row\\(s\\) have no tokens, first 'train-1'"),
        ([[0, 8800, SEP]], "none of the 1 train row\\(s\\) has a token to train on"),
    ],
)
def test_bad_rows_are_refused_with_one_message(tmp_path: Path, rows: list, message: str) -> None:
    path = write_dataset(tmp_path / "d.parquet", rows)
    with pytest.raises(TrainInputError, match=message):
        load_token_rows(path, "train", max_length=2048, vocab_size=8864)


def test_bad_artifacts_and_empty_split_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    only_validation = write_dataset(tmp_path / "v.parquet", [], [[0, 8800, SEP, 8801, 2]])
    with pytest.raises(TrainInputError, match="split 'train' has no rows \\(splits present: \\['validation'\\]\\)"):
        load_token_rows(only_validation, "train", 2048, 8864)
    other = tmp_path / "other.parquet"
    write_artifact(pa.table({"step": [1]}), other, artifact="train_metrics")
    with pytest.raises(TrainInputError, match="found artifact 'train_metrics', expected 'dataset'"):
        load_token_rows(other, "train", 2048, 8864)
    monkeypatch.setitem(artifacts.ARTIFACT_SCHEMA_VERSIONS, "dataset", 99)
    future = write_dataset(tmp_path / "future.parquet", [[0, 8800, SEP, 8801, 2]])
    monkeypatch.undo()
    with pytest.raises(TrainInputError, match="schema version 99, expected 1"):
        load_token_rows(future, "train", 2048, 8864)


def test_cli_reports_bad_base_model_in_one_line(base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from medmax_pipeline.cli import main

    dataset = write_dataset(tmp_path / "d.parquet", text_rows(2))
    tokenizer = tmp_path / "tok.json"
    # A tokenizer whose text tokens sit at other ids than the model's vocabulary_map says.
    swapped = {**tiny_vocabulary_map(), "tok0": TEXT[1], "tok1": TEXT[0]}
    tokenizer.write_text(json.dumps({"model": {"type": "BPE", "vocab": swapped, "merges": []}, "added_tokens": []}))
    code = main(["train", "--dataset", str(dataset), "--base-model", str(base_dir), "--output", str(tmp_path / "out"), "--tokenizer", str(tokenizer), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1  # cli.main owns the error boundary: one error line, exit 1
    assert "error: base model:" in err and "disagree at 2 id(s)" in err
    assert not (tmp_path / "out" / "adapter").exists()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def world_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variables torchrun would set, for an in-process DeepSpeed run; restored afterwards."""
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")


def test_tiny_model_overfits_and_writes_outputs(base_dir: Path, tmp_path: Path, world_of_one: None, capsys: pytest.CaptureFixture) -> None:
    """Through the command line and a DeepSpeed ZeRO-2 engine, as the demo's rule runs it."""
    from medmax_pipeline.cli import main

    # A fifth row with nothing after its separator: dropped, and counted in the lineage.
    dataset = write_dataset(tmp_path / "d.parquet", [*text_rows(4), [C.BOS_ID, TEXT[0], SEP]], text_rows(1, seed=1))
    out = tmp_path / "out"
    args = [
        "train", "--dataset", str(dataset), "--eval-dataset", str(dataset), "--base-model", str(base_dir), "--output", str(out),
        "--lr", "1e-2", "--warmup-ratio", "0.1", "--epochs", "10", "--batch-size", "2", "--lora-dropout", "0",
        "--save-every", "0", "--no-progress", "--device", "cpu", "--log-interval", "0",
        "--deepspeed", str(REPO / "workflow" / "deepspeed" / "zero2.json"),  # gloo on CPU
    ]
    assert main(args) == 1  # 1 of 5 rows dropped > the default --max-dropped-fraction 1%
    assert "1 of 5 train rows would not be trained" in capsys.readouterr().err
    code = main([*args, "--max-dropped-fraction", "0.25"])
    assert code == 0
    # No terminal: one progress line per step (--log-interval 0) with step, loss, tokens/s and ETA.
    lines = [line for line in capsys.readouterr().err.splitlines() if " ETA " in line]
    assert len(lines) == 20
    assert re.fullmatch(r"medmax train: steps 1/20 \(5\.0%\), \d+\.\d tokens/s, ETA \S+, loss \d+\.\d{4}, lr \S+", lines[0]), lines[0]
    assert lines[-1].startswith("medmax train: steps 20/20 (100.0%)") and "ETA 0h00m00s, loss " in lines[-1]
    rows = artifacts.read_meta(out / "train_metrics.parquet").lineage["params"]["rows"]
    assert (rows["train_rows_read"], rows["train_rows_trained"], rows["train_rows_dropped_no_labels"]) == (5, 4, 1)
    assert rows["final_eos_masked_by_task"] == {"VQA": {"rows": 5, "masked": 0}}
    metrics = read_artifact(out / "train_metrics.parquet", artifact="train_metrics").to_pylist()
    assert len(metrics) == 20  # 2 batches per epoch x 10 epochs
    assert [m["step"] for m in metrics] == list(range(1, 21))
    first, last = metrics[0]["loss"], np.mean([m["loss"] for m in metrics[-3:]])
    assert last < first / 2, (first, last)
    assert metrics[0]["lr"] == 0.0 and metrics[2]["lr"] == pytest.approx(1e-2)  # 2 warmup steps, then cosine
    assert metrics[-1]["lr"] < 1e-3
    assert all(np.isfinite(m["grad_norm"]) and m["tokens"] > 0 for m in metrics)
    evals = [m["eval_loss"] for m in metrics if m["eval_loss"] is not None]
    assert len(evals) == 10  # one per epoch
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 16
    provenance = json.loads((out / "adapter" / "medmax_provenance.json").read_text())
    assert provenance["credential"] == "public"
    assert provenance["run_config"]["engine"] == "deepspeed"
    (run_folder,) = (out / "checkpoints").iterdir()
    assert run_folder.name == provenance["run_id"]
    assert sorted(p.name for p in run_folder.iterdir()) == ["medmax_provenance.json", "step-20"]
    assert (run_folder / "step-20" / "engine").is_dir()  # DeepSpeed's own checkpoint


def test_image_token_labels_train_and_the_model_emits_them(base_dir: Path, tmp_path: Path) -> None:
    image = [C.BEGIN_IMAGE_ID, 57, 1000, 8000, C.END_IMAGE_ID]
    rows = [[C.BOS_ID, TEXT[i], TEXT[i + 1], SEP, *image, C.EOS_ID] for i in range(4)]
    dataset = write_dataset(tmp_path / "d.parquet", rows)
    result = train(quick(base_dir, dataset, tmp_path / "out", epochs=12, lora_dropout=0.0))
    losses = [m["loss"] for m in result.metrics]
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0] / 2
    prompt = torch.tensor([[C.BOS_ID, TEXT[0], TEXT[1], SEP, C.BEGIN_IMAGE_ID]])
    model = H.load_model_for_generation(base_dir, result.adapter_dir, allow_image_output=True, device="cpu")
    with torch.no_grad():
        assert int(model(input_ids=prompt).logits[0, -1].argmax()) == 57
        H.set_image_logits(model, False)  # with HF's mask back, the image token cannot be chosen
        assert int(model(input_ids=prompt).logits[0, -1].argmax()) != 57


def test_resume_after_kill_ends_where_an_uninterrupted_run_ends(base_dir: Path, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "d.parquet", text_rows(8))
    # Dropout on, cosine with warmup, accumulation: RNG, scheduler and data position all matter.
    common = dict(epochs=3, grad_accum=2, lora_dropout=0.1, scheduler="cosine", warmup_ratio=0.2, save_every=2, keep_checkpoints=0)
    whole = train(quick(base_dir, dataset, tmp_path / "whole", **common))
    assert whole.steps == 6

    killed = train(quick(base_dir, dataset, tmp_path / "killed", stop_after_step=3, **common))
    assert not killed.completed and killed.adapter_dir is None
    ckpts = tmp_path / "killed" / "checkpoints"
    (run_folder,) = ckpts.iterdir()  # OUTPUT/checkpoints/<run id>
    assert sorted(p.name for p in run_folder.glob("step-*")) == ["step-2"]  # step 3 was lost with the "kill"
    (run_folder / ".tmp-step-4").mkdir()  # as if killed while writing a checkpoint
    resumed = train(quick(base_dir, dataset, tmp_path / "killed", **common))
    assert resumed.resumed_from_step == 2 and resumed.completed
    (resumed_run,) = [p.name for p in ckpts.iterdir()]
    assert not (ckpts / resumed_run / ".tmp-step-4").exists()

    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma = read_artifact(tmp_path / "whole" / "train_metrics.parquet")
    mb = read_artifact(tmp_path / "killed" / "train_metrics.parquet")
    assert ma.equals(mb)
    # Every column is deterministic (no wall-clock throughput), so the fingerprints agree too.
    assert read_meta(tmp_path / "whole" / "train_metrics.parquet").fingerprint == read_meta(tmp_path / "killed" / "train_metrics.parquet").fingerprint

    # Other settings in the same folder (what Snakemake reruns after a config change): a run of
    # its own from step 0; when it completes, the other run's checkpoints go, foreign folders stay.
    foreign = [ckpts / "my-notes", ckpts / "0123456789abcdef"]  # the second looks like a run id but has no record
    for folder in foreign:
        folder.mkdir()
        (folder / "keep.txt").write_text("mine")
    (old_run,) = [p for p in ckpts.iterdir() if p.name == resumed_run]
    changed = train(quick(base_dir, dataset, tmp_path / "killed", **{**common, "lr": 2e-2}))
    assert changed.resumed_from_step is None and changed.completed and changed.steps == 6
    assert not old_run.exists()
    assert all((folder / "keep.txt").read_text() == "mine" for folder in foreign)


def test_resume_refuses_checkpoints_it_did_not_write_and_never_unpickles_code(base_dir: Path, tmp_path: Path) -> None:
    """A checkpoint folder without this pipeline's record, with a changed file, or with a pickle
    that would run code (even with the record forged to match) is refused, and nothing runs."""
    import shutil

    from medmax_pipeline.stages.train.checkpoints import file_manifest

    dataset = write_dataset(tmp_path / "d.parquet", text_rows(8))
    common = dict(epochs=1, save_every=1, keep_checkpoints=0, stop_after_step=1)
    train(quick(base_dir, dataset, tmp_path / "good", **common))
    (run_folder,) = (tmp_path / "good" / "checkpoints").iterdir()
    assert {"rng-rank0.safetensors", "optimizer.pt", "medmax_provenance.json"} <= {p.name for p in (run_folder / "step-1").iterdir()}
    marker = tmp_path / "pwned"

    def tampered(name: str, change) -> Path:
        out = tmp_path / name
        shutil.copytree(tmp_path / "good", out)
        step = out / "checkpoints" / run_folder.name / "step-1"
        change(step)
        return out

    def evil_pickle(step: Path, forge_record: bool) -> None:
        torch.save({"state": EvilPickle(str(marker))}, step / "optimizer.pt")
        if forge_record:
            record = json.loads((step / "medmax_provenance.json").read_text())
            record["files"] = file_manifest(step)
            (step / "medmax_provenance.json").write_text(json.dumps(record))

    cases = {
        "no_record": (lambda step: (step / "medmax_provenance.json").unlink(), "was not written by this pipeline"),
        "changed": (lambda step: evil_pickle(step, forge_record=False), "optimizer.pt changed since the checkpoint was written"),
        "forged": (lambda step: evil_pickle(step, forge_record=True), "refusing to unpickle it"),
        "extra_file": (lambda step: (step / "latest").write_text("x"), "latest is not in the checkpoint's record"),
    }
    for name, (change, message) in cases.items():
        out = tampered(name, change)
        with pytest.raises(TrainInputError, match=message):
            train(quick(base_dir, dataset, out, **{**common, "stop_after_step": None}))
        assert not marker.exists(), name


class EvilPickle:
    """Unpickling it creates a file: what a tampered checkpoint would do with a shell command."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_adapter_and_merged_model_reproduce_the_trained_logits(base_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    dataset = write_dataset(tmp_path / "d.parquet", text_rows(4))
    result = train(quick(base_dir, dataset, tmp_path / "out", epochs=2, merge=True))
    ids = torch.tensor([[C.BOS_ID, *TEXT[:6], SEP, TEXT[7]]])
    trained = result.model.eval()
    reloaded = PeftModel.from_pretrained(H.load_base_model(base_dir), str(result.adapter_dir)).eval()
    merged = H.load_base_model(result.merged_dir).eval()
    base = H.load_base_model(base_dir).eval()
    for m in (reloaded, merged, base):
        H.allow_image_logits(m)
    with torch.no_grad():
        expected = trained(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
        assert (base(input_ids=ids).logits - expected).abs().max() > 1e-2  # training changed something
    # The merged model carries the adapter's credential; a rerun replaces its own adapter and merged/.
    merged_record = artifacts.read_provenance(result.merged_dir)
    assert (merged_record["kind"], merged_record["credential"]) == ("merged_model", "public")
    assert artifacts.read_provenance(result.adapter_dir)["credential"] == "public"
    again = train(quick(base_dir, dataset, tmp_path / "out", epochs=2, merge=True))
    assert again.merged_dir == result.merged_dir and not list((tmp_path / "out").glob(".tmp-*"))


@pytest.mark.parametrize("name", ["adapter", "merged"])
def test_a_folder_train_did_not_write_is_refused_before_training(base_dir: Path, tmp_path: Path, name: str) -> None:
    dataset = write_dataset(tmp_path / "d.parquet", text_rows(2))
    out = tmp_path / "out"
    (out / name).mkdir(parents=True)
    (out / name / "weights.bin").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match=rf"{out / name} exists and was not written by medmax train"):
        train(quick(base_dir, dataset, out, epochs=1, merge=True))
    assert (out / name / "weights.bin").read_bytes() == b"precious"
    assert sorted(p.name for p in out.iterdir()) == [name]  # refused before anything was written


# ----------------------------------------------------------------------------------------------
# DeepSpeed ZeRO-2: ranks, resumption, bf16
# ----------------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """Environment for a child `medmax train`: DeepSpeed on CPU, and none of the rank variables
    that torchrun sets (or an in-process run left behind)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return {**env, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}


def torchrun_train(base_dir: Path, dataset: Path, output: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "medmax_pipeline",
        "train", "--dataset", str(dataset), "--base-model", str(base_dir), "--output", str(output), "--device", "cpu",
        "--deepspeed", str(REPO / "workflow" / "deepspeed" / "zero2.json"), "--no-progress", *extra,
    ]
    return subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600)


def test_two_deepspeed_ranks_equal_the_plain_loop_and_resume_after_a_kill(base_dir: Path, tmp_path: Path) -> None:
    """torchrun, 2 ranks, ZeRO-2 over gloo: a killed and resumed run ends where one plain process
    with the same global batch (2 ranks x 1 micro-batch = 1 process x 2 accumulated) ends."""
    dataset = write_dataset(tmp_path / "d.parquet", text_rows(8), text_rows(3, seed=1))
    recipe = dict(lr=1e-2, epochs=3, batch_size=2, lora_dropout=0.0, scheduler="cosine", warmup_ratio=0.2, save_every=2, keep_checkpoints=0)
    plain = train(quick(base_dir, dataset, tmp_path / "plain", grad_accum=2, eval_dataset=dataset, **recipe))
    assert plain.steps == 6

    flags = [
        "--eval-dataset", str(dataset), "--lr", "1e-2", "--epochs", "3", "--batch-size", "2", "--lora-dropout", "0", "--scheduler", "cosine",
        "--warmup-ratio", "0.2", "--save-every", "2", "--keep-checkpoints", "0",
    ]
    out = tmp_path / "ranks"
    killed = torchrun_train(base_dir, dataset, out, *flags, "--stop-after-step", "3")
    assert killed.returncode == 0, killed.stderr[-3000:]
    (run_folder,) = (out / "checkpoints").iterdir()
    step2 = run_folder / "step-2"
    assert sorted(p.name for p in run_folder.glob("step-*")) == ["step-2"]
    assert {"engine", "adapter", "rng-rank0.safetensors", "rng-rank1.safetensors", "trainer_state.json"} <= {p.name for p in step2.iterdir()}
    assert not (out / "adapter").exists()

    resumed = torchrun_train(base_dir, dataset, out, *flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "(step 2 of 6)" in resumed.stderr

    columns = ["step", "epoch", "loss", "lr", "grad_norm", "label_tokens", "tokens", "eval_loss"]
    expected = read_artifact(tmp_path / "plain" / "train_metrics.parquet", columns=columns).to_pydict()
    got = read_artifact(out / "train_metrics.parquet", columns=columns).to_pydict()
    for name in ("step", "epoch", "lr", "label_tokens", "tokens"):
        assert got[name] == expected[name], name
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-6)
    # The validation rows are split over the ranks and the loss summed back (3 evaluations).
    assert [v is None for v in got["eval_loss"]] == [v is None for v in expected["eval_loss"]] == [True, False, True, False, True, False]
    np.testing.assert_allclose([v for v in got["eval_loss"] if v], [v for v in expected["eval_loss"] if v], rtol=1e-6)
    np.testing.assert_allclose(got["grad_norm"], expected["grad_norm"], rtol=1e-5)
    a = load_file(str(plain.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    # Loss and grad norm match per step (above). Under row_mean the per-row sums are added in
    # another order across ranks than in one process, and Adam's sign-like update lifts that
    # rounding-level gradient difference of a near-zero entry to 2e-6 .. 1.5e-5 (measured on two
    # runs): every element within 1e-4, the adapter as a whole within 1e-5 relative.
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-4)
    flat_a = torch.cat([a[k].flatten() for k in sorted(a)])
    flat_b = torch.cat([b[k].flatten() for k in sorted(a)])
    assert float((flat_a - flat_b).norm() / flat_a.norm()) < 1e-5
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-2  # training moved the adapter
    run_config = json.loads((out / "adapter" / "medmax_provenance.json").read_text())["run_config"]
    assert (run_config["engine"], run_config["world_size"]) == ("deepspeed", 2)
    assert run_config["loss_normalization"] == "row_mean"

    # token_mean across ranks: two steps against the same one-process reference.
    plain_tokens = train(quick(base_dir, dataset, tmp_path / "plain_tokens", grad_accum=2, max_steps=2, loss_normalization="token_mean", **recipe))
    ranks_tokens = torchrun_train(base_dir, dataset, tmp_path / "ranks_tokens", *flags[2:], "--max-steps", "2", "--loss-normalization", "token_mean")
    assert ranks_tokens.returncode == 0, ranks_tokens.stderr[-3000:]
    expected = read_artifact(tmp_path / "plain_tokens" / "train_metrics.parquet", columns=["loss", "grad_norm"]).to_pydict()
    got = read_artifact(tmp_path / "ranks_tokens" / "train_metrics.parquet", columns=["loss", "grad_norm"]).to_pydict()
    np.testing.assert_allclose(got["loss"], expected["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["grad_norm"], expected["grad_norm"], rtol=1e-5)
    assert got["loss"][0] != pytest.approx(metrics_row_mean_first_loss(tmp_path / "plain"), rel=1e-3)  # the two normalisations differ here


def metrics_row_mean_first_loss(output: Path) -> float:
    return read_artifact(output / "train_metrics.parquet", columns=["loss"]).column("loss")[0].as_py()


def test_deepspeed_bf16_engine_resumes_bitwise_and_saves_fp32_masters(base_dir: Path, tmp_path: Path, world_of_one: None) -> None:
    """The GPU recipe's engine (bf16 compute, fp32 master weights in the ZeRO optimizer) on CPU."""
    dataset = write_dataset(tmp_path / "d.parquet", text_rows(8))
    zero2 = REPO / "workflow" / "deepspeed" / "zero2.json"
    common = dict(
        epochs=2, grad_accum=2, lora_dropout=0.1, scheduler="cosine", warmup_ratio=0.2, save_every=1, keep_checkpoints=0,
        precision="bf16", deepspeed=zero2,
    )
    whole = train(quick(base_dir, dataset, tmp_path / "whole", **common))
    killed = train(quick(base_dir, dataset, tmp_path / "killed", stop_after_step=3, **common))
    assert not killed.completed

    # DeepSpeed's own pickles are loaded weights-only: a tampered one (record forged to match) is refused, not run.
    import shutil

    from medmax_pipeline.stages.train.checkpoints import file_manifest

    shutil.copytree(tmp_path / "killed", tmp_path / "tampered")
    (step3,) = (tmp_path / "tampered" / "checkpoints").glob("*/step-3")
    (optim,) = (step3 / "engine").glob("*optim_states.pt")
    state = torch.load(optim, weights_only=False)  # our own file, to keep everything else DeepSpeed expects
    state["optimizer_state_dict"]["evil"] = EvilPickle(str(tmp_path / "pwned"))
    torch.save(state, optim)
    record = json.loads((step3 / "medmax_provenance.json").read_text())
    (step3 / "medmax_provenance.json").write_text(json.dumps({**record, "files": file_manifest(step3)}))
    with pytest.raises(TrainInputError, match="refusing to unpickle it"):
        train(quick(base_dir, dataset, tmp_path / "tampered", **common))
    assert not (tmp_path / "pwned").exists()

    resumed = train(quick(base_dir, dataset, tmp_path / "killed", **common))
    assert resumed.resumed_from_step == 3 and resumed.completed and resumed.steps == whole.steps == 4

    a = load_file(str(whole.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert {t.dtype for t in a.values()} == {torch.float32}
    assert all(torch.equal(a[k], b[k]) for k in a)
    # fp32 masters, not bf16 copies: some entries are not representable in bf16.
    assert any(not torch.equal(t, t.bfloat16().float()) for k, t in a.items() if "lora_B" in k)
    columns = ["step", "loss", "lr", "grad_norm"]
    assert read_artifact(tmp_path / "whole" / "train_metrics.parquet", columns=columns).equals(
        read_artifact(tmp_path / "killed" / "train_metrics.parquet", columns=columns)
    )


def test_sigkill_mid_run_then_rerun_ends_where_an_uninterrupted_run_ends(base_dir: Path, tmp_path: Path) -> None:
    """A real kill (SIGKILL of `medmax train`, the demo rule's command, on the DeepSpeed engine) at
    whatever point it lands after the first checkpoint, then the same command again."""
    import signal
    import time

    dataset = write_dataset(tmp_path / "d.parquet", text_rows(48))
    command = [
        sys.executable, "-m", "medmax_pipeline", "train", "--dataset", str(dataset), "--base-model", str(base_dir),
        "--device", "cpu", "--lr", "1e-2", "--epochs", "2", "--batch-size", "2", "--lora-dropout", "0.1",
        "--save-every", "2", "--keep-checkpoints", "2", "--no-progress",
        "--deepspeed", str(REPO / "workflow" / "deepspeed" / "zero2.json"),
    ]
    env = child_env()

    def run_to_end(out: Path) -> subprocess.CompletedProcess:
        done = subprocess.run([*command, "--output", str(out)], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    run_to_end(tmp_path / "whole")

    killed_out = tmp_path / "killed"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen([*command, "--output", str(killed_out)], env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not any((killed_out / "checkpoints").glob("*/step-*")):
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL  # killed mid-run: 48 steps, the first checkpoint after 2
    log.close()
    assert not (killed_out / "adapter").exists()

    resumed = run_to_end(killed_out)
    match = re.search(r"resumed from \S+step-(\d+) \(step \d+ of 48\)", resumed.stderr)
    assert match and int(match.group(1)) >= 2, resumed.stderr[-3000:]
    assert not list((killed_out / "checkpoints").rglob(".tmp-*"))

    a = load_file(str(tmp_path / "whole" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(killed_out / "adapter" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    columns = ["step", "epoch", "loss", "lr", "grad_norm", "label_tokens", "tokens", "eval_loss"]
    assert read_artifact(tmp_path / "whole" / "train_metrics.parquet", columns=columns).equals(
        read_artifact(killed_out / "train_metrics.parquet", columns=columns)
    )


def test_gradient_checkpointing_trains_the_same_adapter(base_dir: Path, tmp_path: Path) -> None:
    dataset = write_dataset(tmp_path / "d.parquet", text_rows(4))
    plain = train(quick(base_dir, dataset, tmp_path / "plain", epochs=2, lora_dropout=0.0))
    recomputed = train(quick(base_dir, dataset, tmp_path / "recomputed", epochs=2, lora_dropout=0.0, gradient_checkpointing=True))
    a = load_file(str(plain.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(recomputed.adapter_dir / "adapter_model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-3


# ----------------------------------------------------------------------------------------------
# Loss normalisation, final-eos and dropped-row guards, progress lines, adapter bytes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalization", ["row_mean", "token_mean"])
def test_loss_normalization_is_exact_under_accumulation_and_ranks(normalization: str) -> None:
    """Micro-batches of unequal width spread over 2 simulated ranks, each rank's gradient averaged
    as DDP / ZeRO do, equal one process holding every row: the mean over rows of HF's mean CE per
    row (row_mean) or the mean over every label token (token_mean)."""
    from medmax_pipeline.stages.train import loss_denominator, loss_numerator

    rows = [[0, 10, SEP, 20, 21, 22, 23, 2], [0, 11, 12, SEP, 24, 2], [0, 13, SEP, 25, 26, 2], [0, 14, 15, 16, SEP, 27, 28, 29, 30, 31, 2]]
    torch.manual_seed(0)
    table = torch.randn(40, 40, requires_grad=True)  # a bigram "model": logits = the table's row of each input id

    def small(batch: dict) -> dict:  # ids folded into the table's 40 classes, masked labels kept
        labels = batch["labels"]
        return {**batch, "input_ids": batch["input_ids"] % 40, "labels": torch.where(labels == M, labels, labels % 40)}

    def collate_small(batch_rows: list) -> dict:
        return small(collate(batch_rows))

    def logits(batch: dict) -> torch.Tensor:
        return table[batch["input_ids"]]

    full = collate_small(rows)
    per_row = [
        torch.nn.functional.cross_entropy(logits(b)[0, :-1], b["labels"][0, 1:], ignore_index=M) for b in (collate_small([r]) for r in rows)
    ]
    if normalization == "row_mean":
        reference = torch.stack(per_row).mean()
    else:
        reference = torch.nn.functional.cross_entropy(logits(full)[:, :-1].reshape(-1, 40), full["labels"][:, 1:].reshape(-1), ignore_index=M)
    (expected_grad,) = torch.autograd.grad(reference, table)

    ranks = [[[rows[0]], [rows[1], rows[2]]], [[rows[3]]]]  # rank 0: 2 micro-batches; rank 1: 1
    world = len(ranks)
    batches = [[collate_small(mb) for mb in rank] for rank in ranks]
    denominator = sum(loss_denominator(b, normalization) for rank in batches for b in rank)
    grads, total = [], 0.0
    for rank in batches:
        rank_grad = torch.zeros_like(table)
        for b in rank:
            numerator = loss_numerator(logits(b), b["labels"], normalization)
            rank_grad += torch.autograd.grad(numerator * (world / denominator), table)[0]
            total += float(numerator)
        grads.append(rank_grad)
    torch.testing.assert_close(sum(grads) / world, expected_grad, rtol=1e-5, atol=1e-7)  # DDP's average over ranks
    assert total / denominator == pytest.approx(float(reference), rel=1e-6)


def write_separator_stats(path: Path, dataset: Path) -> Path:
    from medmax_pipeline.stages.assemble.separator_stats import SeparatorStats

    stats = SeparatorStats("train")
    table = read_artifact(dataset, artifact="dataset")
    stats.add(table.filter(pa.compute.equal(table.column("split"), "train")).combine_chunks().to_batches()[0])
    write_artifact(stats.table(), path, artifact="separator_stats")
    return path


def test_a_loss_mask_that_masks_final_eos_is_refused_naming_the_tasks(base_dir: Path, tmp_path: Path) -> None:
    """Rows without a separator: `alternating` would mask their eos (the model never learns to
    stop); measured by assembly's separator_stats, refused before any model is built."""
    rows = [*text_rows(6), [C.BOS_ID, TEXT[0], TEXT[1], C.EOS_ID], [C.BOS_ID, TEXT[2], SEP, TEXT[3], SEP, TEXT[4], C.EOS_ID]]
    dataset = write_dataset(tmp_path / "d.parquet", rows)
    stats = write_separator_stats(tmp_path / "separator_stats.parquet", dataset)
    with pytest.raises(TrainInputError, match=r"'alternating' would mask the final eos .* of 1 task\(s\) \(measured by assembly .*\): VQA: 2 of 8 \(25\.0%\)"):
        train(quick(base_dir, dataset, tmp_path / "out", loss_mask="alternating", separator_stats=stats, max_dropped_fraction=1.0))
    with pytest.raises(TrainInputError, match="VQA: 2 of 8"):  # without the artifact, measured on the rows read
        train(quick(base_dir, dataset, tmp_path / "out", loss_mask="alternating", max_dropped_fraction=1.0))
    other = write_separator_stats(tmp_path / "other.parquet", write_dataset(tmp_path / "d2.parquet", rows[:3]))
    with pytest.raises(TrainInputError, match="count 3 rows but the dataset's training split has 8"):
        train(quick(base_dir, dataset, tmp_path / "out", separator_stats=other))
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_progress_lines_come_at_the_interval_and_at_the_last_step(capsys: pytest.CaptureFixture) -> None:
    from medmax_pipeline.stages.train.distributed import Dist
    from medmax_pipeline.core.progress import eta_text
    from medmax_pipeline.stages.train.recipe import step_details, step_reporter

    now = [0.0]
    reporter = step_reporter(10, 0, quick(Path(), Path(), Path(), log_interval=30.0), Dist(), clock=lambda: now[0])
    for step in range(1, 11):
        now[0] += 10.0  # 10 s and 100 tokens a step
        reporter.update(1, 100, step_details(1.5, 1e-4))
    lines = capsys.readouterr().err.splitlines()
    assert [int(re.search(r"steps (\d+)/10", line).group(1)) for line in lines] == [1, 4, 7, 10]
    # The one progress line of every stage (core/progress), training's loss and lr at its end.
    assert lines[1] == "medmax train: steps 4/10 (40.0%), 10.0 tokens/s, ETA 0h01m00s, loss 1.5000, lr 1.00e-04"
    assert eta_text(1, 2, 1, 3725.0) == "1h02m05s"
    # Other ranks print nothing.
    quiet = step_reporter(10, 0, quick(Path(), Path(), Path(), log_interval=0.0), Dist(rank=1, world_size=2), clock=lambda: now[0])
    quiet.update(1, 100, step_details(1.5, 1e-4))
    assert capsys.readouterr().err == ""


def test_adapter_config_bytes_do_not_depend_on_the_hash_seed(base_dir: Path, tmp_path: Path) -> None:
    """peft keeps target_modules as a set; the adapter is written with them sorted."""
    script = (
        "import sys; from peft import LoraConfig, get_peft_model; from pathlib import Path\n"
        "from medmax_pipeline.models import chameleon as H\n"
        "from medmax_pipeline.stages.train.config import DEFAULT_TARGET_MODULES\n"
        "from medmax_pipeline.stages.train.outputs import save_adapter_weights\n"
        "model = get_peft_model(H.load_base_model(sys.argv[1]), LoraConfig(r=4, target_modules=list(DEFAULT_TARGET_MODULES)))\n"
        "save_adapter_weights(model, Path(sys.argv[2]))\n"
    )
    written = []
    for seed in ("1", "2"):
        out = tmp_path / f"seed{seed}"
        done = subprocess.run([sys.executable, "-c", script, str(base_dir), str(out)], env={**child_env(), "PYTHONHASHSEED": seed},
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        written.append((out / "adapter_config.json").read_bytes())
    assert written[0] == written[1]
    assert json.loads(written[0])["target_modules"] == sorted(DEFAULT_TARGET_MODULES)


def test_a_diverging_run_stops_naming_the_step_and_keeps_earlier_checkpoints(
    base_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """learning_rate 1e10: the run stops non-zero naming the step, instead of ending with exit 0
    and an adapter of weights ~1e10; the checkpoint written before stays. (Its loss does not
    explode: the logits saturate to a uniform guess, so the adapter weights are what gives it away.)"""
    from medmax_pipeline.cli import main
    from medmax_pipeline.stages.train.recipe import TrainingDivergedError, divergence

    nan, inf = float("nan"), float("inf")
    assert divergence(nan, 9.0, 1.0, 0.1) == "the loss is nan" and divergence(inf, 9.0, 1.0, 0.1) == "the loss is inf"
    assert divergence(80.0, 9.0, 1.0, 0.1) is None and "exploded" in divergence(95.0, 9.0, 1.0, 0.1)
    assert "gradient norm is nan" in divergence(9.0, 9.0, nan, 0.1)
    assert "adapter weight reached 5e+10" in divergence(9.09, 9.25, 0.0, 5e10) and divergence(2.0, 9.0, 3.0, 14.0) is None
    dataset = write_dataset(tmp_path / "d.parquet", text_rows(4))
    from medmax_pipeline.stages.train.config import TrainConfig

    # The settings' bounds refuse lr 1e10 before any step (learning_rate is in (0, 1]) ...
    bounded = main(["train", "--dataset", str(dataset), "--base-model", str(base_dir), "--output", str(tmp_path / "bounded"),
                    "--lr", "1e10", "--no-progress", "--device", "cpu"])
    assert bounded == 1 and "--lr must be in (0, 1], got 10000000000.0" in capsys.readouterr().err
    # ... but a real model can diverge within them; the tiny one needs 1e10, so the checks step aside here.
    monkeypatch.setattr(TrainConfig, "validate", lambda self: None)
    out = tmp_path / "out"
    # Warmup: step 1 runs at rate 0 (and is checkpointed), step 2 at 5e9.
    with pytest.raises(TrainingDivergedError, match=r"training diverged at step 2 of 20: .* adapter weight reached") as caught:
        train(quick(base_dir, dataset, out, lr=1e10, warmup_ratio=0.1, scheduler="cosine", save_every=1, lora_dropout=0.0))
    (run_folder,) = (out / "checkpoints").iterdir()
    assert sorted(p.name for p in run_folder.glob("step-*")) == ["step-1"]  # the diverged step is not saved
    assert "the checkpoint of step 1 is kept" in str(caught.value)
    assert not (out / "adapter").exists() and not (out / "train_metrics.parquet").exists()
    code = main(["train", "--dataset", str(dataset), "--base-model", str(base_dir), "--output", str(tmp_path / "cli"), "--lr", "1e10",
                 "--warmup-ratio", "0", "--scheduler", "constant", "--epochs", "10", "--batch-size", "2", "--save-every", "0",
                 "--no-progress", "--device", "cpu"])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert code != 0
    assert len(errors) == 1 and "training diverged at step 1 of 20" in errors[0] and "no checkpoint was written" in errors[0]
    assert not (tmp_path / "cli" / "adapter").exists()
