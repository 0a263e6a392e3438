"""Files the pipeline writes follow the umask (model files included), and manifests are replaced
through unique temporary names (two nodes may write one at once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from medmax_pipeline.core.file_modes import current_umask, honour_umask, unique_temp_path
from medmax_pipeline.core.folder_identity import folder_fingerprint, write_manifest_if_changed

# Under the umask given as argv[1], write each kind of output into argv[2]; print path -> mode.
WRITER = r"""
import json, os, shutil, sys
from pathlib import Path
os.umask(int(sys.argv[1], 8))
out = Path(sys.argv[2])
import pyarrow as pa, torch
from safetensors.torch import save_file
from peft import LoraConfig, get_peft_model
from medmax_pipeline.core.artifacts import write_artifact
from medmax_pipeline.core.text_tokenizer import layout_tokens
from medmax_pipeline.core.output_folder import finish_output_folder, start_output_folder
from medmax_pipeline.demo_models import build_tiny_chameleon
from medmax_pipeline.models import chameleon as H
from medmax_pipeline.stages.train.outputs import merge_adapter

write_artifact(pa.table({"x": [1]}), out / "artifact.parquet", artifact="scores")
vocab = {name: i for i, name in enumerate(layout_tokens(modified=True))}
base = build_tiny_chameleon(out / "base", vocab, seed=0, hidden_size=32, num_layers=1, num_heads=2)
model = get_peft_model(H.load_base_model(base), LoraConfig(r=2, target_modules=["q_proj"]))
model.save_pretrained(str(out / "adapter"))
merge_adapter(base, out / "adapter", out / "merged_hf")  # train's merged/
# export's and convert's output folders: weights by safetensors, a tokenizer folder copied whole
source_tokenizer = out / "source_tokenizer"
source_tokenizer.mkdir()
(source_tokenizer / "text_tokenizer.json").write_text("{}")
os.chmod(source_tokenizer / "text_tokenizer.json", 0o644)
tmp = start_output_folder(out / "exported", "medmax_export.json", "medmax export")
save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
shutil.copytree(source_tokenizer, tmp / "tokenizer")
finish_output_folder(tmp, out / "exported", "medmax_export.json", {})
names = ["artifact.parquet", "base/model.safetensors", "merged_hf/model.safetensors", "merged_hf/config.json",
         "exported/model.safetensors", "exported/tokenizer/text_tokenizer.json", "exported/tokenizer"]
print(json.dumps({n: os.stat(out / n).st_mode & 0o777 for n in names}))
"""


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_kind_of_output_follows_the_umask(tmp_path: Path, umask: int) -> None:
    done = subprocess.run([sys.executable, "-c", WRITER, f"{umask:o}", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-3000:]
    modes = json.loads(done.stdout.strip().splitlines()[-1])
    expected = {name: (0o777 if name == "exported/tokenizer" else 0o666) & ~umask for name in modes}
    assert {n: oct(m) for n, m in modes.items()} == {n: oct(m) for n, m in expected.items()}


def test_honour_umask_keeps_executable_bits_and_leaves_symlinks(tmp_path: Path) -> None:
    mask = current_umask()
    (tmp_path / "d").mkdir(mode=0o700)
    script, data = tmp_path / "d" / "run.sh", tmp_path / "d" / "w.bin"
    script.write_text("#!/bin/sh\n")
    data.write_bytes(b"x")
    os.chmod(script, 0o700)
    os.chmod(data, 0o600)
    outside = tmp_path / "outside"
    outside.write_text("not ours")
    os.chmod(outside, 0o600)
    (tmp_path / "d" / "link").symlink_to(outside)
    honour_umask(tmp_path / "d")
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~mask
    assert script.stat().st_mode & 0o777 == 0o777 & ~mask
    assert data.stat().st_mode & 0o777 == 0o666 & ~mask
    assert outside.stat().st_mode & 0o777 == 0o600  # a link's target is not ours to change


def test_a_manifest_is_replaced_through_a_unique_temporary_name(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"a")
    manifest = tmp_path / "manifests" / "public_root.json"
    manifest.parent.mkdir()
    # Another node is mid-write under the name every writer used to share: it is not touched.
    other = manifest.parent / f".{manifest.name}.tmp"
    other.mkdir()
    write_manifest_if_changed(folder, manifest)
    assert json.loads(manifest.read_text())["fingerprint"] == folder_fingerprint(folder)
    assert other.is_dir() and sorted(p.name for p in manifest.parent.iterdir()) == sorted([manifest.name, other.name])
    a, b = unique_temp_path(manifest), unique_temp_path(manifest)
    assert a != b and str(os.getpid()) in a.name and a.name.startswith(f".{manifest.name}.")


def test_concurrent_manifest_writers_never_collide(tmp_path: Path) -> None:
    folders = []
    for i in range(2):
        folder = tmp_path / f"f{i}"
        folder.mkdir()
        (folder / f"{i}.jpg").write_bytes(b"x" * (i + 1))
        folders.append(folder)
    manifest = tmp_path / "m.json"
    errors: list[BaseException] = []

    def writer(folder: Path) -> None:  # two folders: each write changes the file, so every call rewrites it
        try:
            for _ in range(200):
                write_manifest_if_changed(folder, manifest)
        except BaseException as exc:  # noqa: BLE001 (collected for the assertion)
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(f,)) for f in folders]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert json.loads(manifest.read_text())["fingerprint"] in {folder_fingerprint(f) for f in folders}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
