"""Stage 2's summary counts the high bit depth grayscale images (16-bit, 32-bit, float), which
PIL's convert clips to 0..255 as the original preprocessing did (issue 20 item 17)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from vqgan_fixtures import cheap_params, smooth_image, write_checkpoint  # noqa: E402

from medmax_pipeline import cli  # noqa: E402


def test_tokenize_and_gather_count_high_bit_depth_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_checkpoint(tmp_path / "ckpt", seed=5, params=cheap_params())
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(smooth_image(rng, 520, 512)).save(images / "rgb.png")
    Image.fromarray(smooth_image(rng, 512, 530, 1).astype(np.uint16) * 250).save(images / "gray16.png")
    Image.fromarray(smooth_image(rng, 512, 512, 1).astype(np.float32) * 3.5).save(images / "float.tiff")
    with Image.open(images / "gray16.png") as a, Image.open(images / "float.tiff") as b:
        assert (a.mode, b.mode) == ("I;16", "F")
    rows = ["img_path,image_key,credential"]
    rows += [f"{p},public:{p.name},no" for p in sorted(images.iterdir())]
    rows.append(f"{images / 'gray16.png'},public:alias.png,no")  # one file, two keys: counted once
    (tmp_path / "img_paths.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "shards"
    argv = ["tokenize", "--input", str(tmp_path / "img_paths.csv"), "--output", str(out), "--ckpt", str(tmp_path / "ckpt"),
            "--workers", "0", "--no-progress"]
    assert cli.main(argv) == 0
    assert "\n  2 high bit depth grayscale image(s) (16-bit, 32-bit or float): pixel values clipped to 0..255" in capsys.readouterr().out
    gather = ["gather-tokens", "--shards", str(out), "--num-shards", "1", "--output", str(tmp_path / "t.parquet"),
              "--errors", str(tmp_path / "e.parquet")]
    assert cli.main(gather) == 0
    assert "\n  2 high bit depth grayscale image(s)" in capsys.readouterr().out
