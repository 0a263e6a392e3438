"""`medmax inspect` on a small chain built from the stage functions: silent when nothing changed,
flags a replaced credentialed image. One identity per kind of input, recorded and recomputed alike."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from medmax_pipeline.core.artifacts import current_fingerprint, describe_input, read_meta
from medmax_pipeline.core.folder_identity import folder_fingerprint
from medmax_pipeline.core.image_keys import CredentialedSource
from medmax_pipeline.demo import CREDENTIALED_SOURCE, default_paths, generate_demo
from medmax_pipeline.stages.assemble import assemble
from medmax_pipeline.stages.collect import collect
from medmax_pipeline.stages.tokenize_images import gather_tokens, tokenize_shard
from medmax_pipeline.stages.vocab import map_vocab


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("chain")
    paths = default_paths(root / "inputs")
    paths.base_model = None
    generate_demo(paths, seed=3, vqgan_channels=32, rows_per_task=1)
    cred_root = paths.credentialed_root
    out = root / "results"
    collect([("train", paths.train), ("validation", paths.validation)], paths.public_root, out / "collect",
            [CredentialedSource(CREDENTIALED_SOURCE, str(cred_root), "mimic_cxr_jpg")])
    for shard in range(2):
        tokenize_shard(out / "collect" / "img_paths.csv", out / "tokenize", paths.checkpoint, shard=shard, num_shards=2,
                       workers=0, progress=False, credentialed_roots=[cred_root])
    tokens, errors = out / "tokenize" / "image_tokens.parquet", out / "tokenize" / "image_token_errors.parquet"
    gather_tokens(out / "tokenize", 2, tokens, errors)
    tokenizer = paths.checkpoint / "tokenizer" / "text_tokenizer_modified.json"
    map_vocab(tokens, tokenizer, out / "vocab" / "image_blocks.parquet")
    assemble(paths.train, "train", out / "assemble", tokenizer_path=tokenizer, image_blocks=out / "vocab" / "image_blocks.parquet",
             path_problems=out / "collect" / "image_path_problems.parquet", token_errors=errors,
             credentialed=[f"{CREDENTIALED_SOURCE}={cred_root}=mimic_cxr_jpg"], max_error_fraction=1.0, workers=1, log=io.StringIO())
    return {"paths": paths, "out": out, "dataset": out / "assemble" / "dataset.parquet", "tokens": tokens}


def inspect(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medmax_pipeline", "inspect", str(path)], capture_output=True, text=True)


def test_one_identity_per_kind_of_input(chain: dict) -> None:
    checkpoint, tokens = chain["paths"].checkpoint, chain["tokens"]
    assert describe_input(checkpoint)["fingerprint"] == current_fingerprint(checkpoint) == folder_fingerprint(checkpoint)
    assert describe_input(tokens)["fingerprint"] == current_fingerprint(tokens) == read_meta(tokens).fingerprint
    shard = read_meta(read_meta(tokens).lineage["inputs"][0]["path"])
    assert {i["path"]: i["fingerprint"] for i in shard.lineage["inputs"]}[str(checkpoint)] == folder_fingerprint(checkpoint)


def test_inspect_is_silent_on_an_untouched_chain_and_flags_a_replaced_credentialed_image(chain: dict) -> None:
    cred_root = chain["paths"].credentialed_root
    fresh = inspect(chain["dataset"])
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "stale" not in fresh.stdout
    # The shards are reached through image_tokens and again through image_token_errors.
    assert "(listed above)" in fresh.stdout and f"{chain['paths'].checkpoint}: folder" in fresh.stdout

    image = sorted(p for p in cred_root.rglob("*.jpg"))[0]
    image.write_bytes(sorted(chain["paths"].public_root.rglob("*.jpg"))[0].read_bytes())  # another image in its place
    for artifact in (chain["dataset"], chain["tokens"]):  # through collect's lineage and tokenize's
        stale = inspect(artifact)
        assert stale.returncode == 1
        flagged = [line for line in stale.stdout.splitlines() if line.endswith("(changed since: stale)")]
        assert flagged and all(str(cred_root) in line for line in flagged), stale.stdout
