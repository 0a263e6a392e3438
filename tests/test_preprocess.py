"""Chameleon ImageTokenizer preprocessing: known answers per step and safe opening of bad files."""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # test_vqgan: the original preprocessing, written out

from medmax_pipeline.models.image_preprocess import (
    HIGH_BIT_DEPTH_MODES,
    ImageDecodeError,
    blend_onto_white,
    center_crop_box,
    load_image_pixels,
    open_image,
    preprocess_image,
    resized_size,
    to_pixels,
    to_rgb,
)


def expected_blend(r: int, g: int, b: int, a: int) -> tuple[int, ...]:
    # The formula of MEDMAX-FACTS step 1, one pixel at a time in Python floats, truncated.
    return tuple(int((1 - a / 255) * 255 + (a / 255) * v) for v in (r, g, b))


def test_alpha_blend_known_values() -> None:
    pixels = [(100, 200, 50, 128), (0, 0, 0, 0), (10, 20, 30, 255), (255, 0, 7, 1), (33, 66, 99, 254)]
    rgba = np.array([pixels], np.uint8)
    out = np.array(to_rgb(Image.fromarray(rgba, "RGBA")))
    assert [tuple(int(v) for v in p) for p in out[0]] == [expected_blend(*p) for p in pixels]
    assert tuple(out[0, 1]) == (255, 255, 255)  # fully transparent black becomes white
    assert tuple(out[0, 2]) == (10, 20, 30)  # opaque pixel unchanged
    assert np.array_equal(blend_onto_white(rgba), out)


def test_opaque_rgba_is_plain_convert() -> None:
    rgba = np.random.default_rng(0).integers(0, 256, (5, 7, 4), dtype=np.uint8)
    rgba[:, :, 3] = 255
    image = Image.fromarray(rgba, "RGBA")
    assert np.array_equal(np.array(to_rgb(image)), rgba[:, :, :3])


def test_palette_with_and_without_transparency() -> None:
    palette = [255, 0, 0, 0, 0, 255, 10, 200, 30] + [0] * (256 * 3 - 9)
    indices = np.array([[0, 1, 2], [2, 1, 0]], np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette)
    plain = np.array(to_rgb(image))
    assert tuple(plain[0, 0]) == (255, 0, 0) and tuple(plain[0, 2]) == (10, 200, 30)
    image.info["transparency"] = 1  # index 1 (blue) fully transparent
    blended = np.array(to_rgb(image))
    assert tuple(blended[0, 1]) == (255, 255, 255) and tuple(blended[1, 1]) == (255, 255, 255)
    assert tuple(blended[0, 0]) == (255, 0, 0)


def test_gray_and_gray_alpha() -> None:
    gray = Image.fromarray(np.array([[0, 77, 255]], np.uint8), "L")
    assert np.array_equal(np.array(to_rgb(gray))[0], [[0, 0, 0], [77, 77, 77], [255, 255, 255]])
    la = Image.fromarray(np.array([[[77, 0], [77, 255], [77, 51]]], np.uint8), "LA")
    out = np.array(to_rgb(la))[0]
    assert [tuple(int(v) for v in p) for p in out] == [expected_blend(77, 77, 77, a) for a in (0, 255, 51)]


# Values across each mode's range: 0..255 pass, everything else is clipped by PIL's convert.
SIXTEEN_BIT_VALUES = [0, 1, 127, 128, 254, 255, 256, 257, 385, 1000, 4095, 32767, 32768, 65534, 65535]
I_VALUES = [-(2**31), -70000, -1, 0, 1, 200, 255, 256, 65535, 70000, 2**31 - 1]
F_VALUES = [-1e9, -1.5, -0.5, 0.0, 0.4, 0.99, 1.0, 2.7, 127.5, 254.99, 255.0, 255.5, 300.0, 1e9, float("nan"), float("inf"), -float("inf")]


def high_bit_depth_image(mode: str, size: tuple[int, int]) -> Image.Image:
    """A grayscale image of `mode` whose pixels cycle through the mode's test values."""
    width, height = size
    values = {"I": I_VALUES, "F": F_VALUES}.get(mode, SIXTEEN_BIT_VALUES)
    flat = np.resize(np.array(values, {"I": np.int32, "F": np.float32}.get(mode, np.int64)), width * height)
    if mode in ("I", "F"):
        return Image.fromarray(flat.reshape(height, width))
    data = flat.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    return Image.frombytes(mode, size, data)


def test_high_bit_depth_gray_is_clipped_as_pils_convert_does() -> None:
    """The original called convert("RGBA") / convert("RGB") on these modes; PIL clips to 0..255."""
    for mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        image = high_bit_depth_image(mode, (len(SIXTEEN_BIT_VALUES), 1))
        source = np.asarray(image).astype(np.int64)[0]
        assert np.array_equal(np.array(to_rgb(image))[0], np.repeat(np.clip(source, 0, 255)[:, None], 3, axis=1).astype(np.uint8)), mode
    out = np.array(to_rgb(high_bit_depth_image("I;16", (len(SIXTEEN_BIT_VALUES), 1))))[0, :, 0]
    assert out[SIXTEEN_BIT_VALUES.index(385)] == 255  # was round(385 / 257) = 1 before: not the original
    floats = np.array(to_rgb(high_bit_depth_image("F", (len(F_VALUES), 1))))[0, :, 0].tolist()
    # truncated toward zero, then clipped; NaN becomes 0
    assert floats == [0, 0, 0, 0, 0, 0, 1, 2, 127, 254, 255, 255, 255, 255, 0, 255, 0]


@pytest.mark.parametrize(
    "mode, fmt",
    [("I;16", "PNG"), ("I;16B", "PNG"), ("I;16", "TIFF"), ("I;16L", "TIFF"), ("I;16B", "TIFF"), ("I", "TIFF"), ("F", "TIFF")],
)
def test_high_bit_depth_files_match_the_original_procedure(tmp_path: Path, mode: str, fmt: str) -> None:
    """Bit for bit what the original ImageTokenizer makes of the opened file (its steps written out
    plainly in test_vqgan, sharing no code with the pipeline), resize included."""
    from test_vqgan import ref_vqgan_input_from, ref_whiten_transparency

    path = tmp_path / f"gray.{fmt.lower()}"
    high_bit_depth_image(mode, (523, 517)).save(path, format=fmt)
    with Image.open(path) as opened:
        assert opened.mode in HIGH_BIT_DEPTH_MODES  # what PIL opens such a file as
        expected = ref_vqgan_input_from(ref_whiten_transparency(opened))[0]
    loaded = load_image_pixels(path)
    assert loaded.orig_mode == opened.mode
    assert torch.equal(loaded.pixels, expected)


def test_cmyk_uses_pils_conversion() -> None:
    cmyk = Image.fromarray(np.random.default_rng(1).integers(0, 256, (4, 4, 4), dtype=np.uint8), "CMYK")
    assert np.array_equal(np.array(to_rgb(cmyk)), np.array(cmyk.convert("RGB")))


@pytest.mark.parametrize(
    "size",
    [(1025, 1024), (1027, 1024), (1024, 1029), (300, 701), (512, 512), (1, 3), (640, 480), (333, 777)],
)
def test_resized_size_uses_python_round(size: tuple[int, int]) -> None:
    width, height = size
    scale = 512 / min(width, height)
    assert resized_size(width, height) == (round(scale * width), round(scale * height))
    assert min(resized_size(width, height)) == 512


def test_resize_rounding_ties_go_to_even() -> None:
    # scale 0.5: 1025 * 0.5 = 512.5 -> 512 (even), 1027 * 0.5 = 513.5 -> 514 (even), never floor(x + 0.5) alone
    assert resized_size(1025, 1024) == (512, 512)
    assert resized_size(1027, 1024) == (514, 512)
    assert resized_size(1024, 1029) == (512, 514)


def test_center_crop_offsets() -> None:
    assert center_crop_box(512, 512) == (0, 0, 512, 512)
    assert center_crop_box(515, 512) == (1, 0, 513, 512)  # (3) // 2 = 1: extra column on the right
    assert center_crop_box(512, 1196) == (0, 342, 512, 854)
    with pytest.raises(ValueError):
        center_crop_box(511, 600)


def test_to_pixels_values_and_layout() -> None:
    data = np.zeros((512, 512, 3), np.uint8)
    data[0, 0] = (0, 128, 255)
    data[5, 9] = (1, 2, 3)
    pixels = to_pixels(Image.fromarray(data))
    assert pixels.shape == (3, 512, 512) and pixels.dtype == torch.float32
    assert pixels[:, 0, 0].tolist() == [np.float32(v / 255.0 * 2 - 1) for v in (0, 128, 255)]
    assert pixels[0, 0, 0] == -1.0 and pixels[2, 0, 0] == 1.0
    assert pixels[2, 5, 9] == np.float32(3 / 255.0 * 2 - 1)


def test_preprocess_odd_size_crops_the_centre() -> None:
    # A 300x701 image with a marker column band: after resize to 512x1196 the crop starts at row 342.
    rng = np.random.default_rng(3)
    data = rng.integers(0, 256, (701, 300, 3), dtype=np.uint8)
    image = Image.fromarray(data)
    expected = image.resize((512, 1196), Image.LANCZOS).crop((0, 342, 512, 854))
    assert torch.equal(preprocess_image(image), to_pixels(expected))


def test_load_image_pixels_reports_original_size_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "a.png"
    Image.fromarray(np.full((37, 600, 2), 200, np.uint8), "LA").save(path)
    loaded = load_image_pixels(path)
    assert (loaded.orig_width, loaded.orig_height, loaded.orig_mode) == (600, 37, "LA")
    assert loaded.pixels.shape == (3, 512, 512)


def png_with_header_size(path: Path, width: int, height: int) -> None:
    """A valid 1x1 PNG whose IHDR claims width x height (CRC fixed up): a decompression bomb header."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17])) & 0xFFFFFFFF
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_decompression_bombs_are_refused(tmp_path: Path) -> None:
    huge = tmp_path / "huge.png"
    png_with_header_size(huge, 100_000, 100_000)  # above PIL's own error threshold
    with pytest.raises(ImageDecodeError, match="decompression bomb") as info:
        open_image(huge)
    assert info.value.path == str(huge)
    large = tmp_path / "large.png"
    png_with_header_size(large, 10_000, 10_000)  # PIL would only warn here; we refuse
    with pytest.raises(ImageDecodeError, match="decompression bomb refused: 10000x10000"):
        open_image(large)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 40)).save(small)
    with pytest.raises(ImageDecodeError, match="1600 pixels > limit 1000"):
        load_image_pixels(small, max_pixels=1000)


def test_extreme_aspect_ratio_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "thin.png"
    Image.new("RGB", (1, 5000)).save(path)
    with pytest.raises(ImageDecodeError, match="aspect ratio too extreme"):
        load_image_pixels(path, max_pixels=10_000_000)


def test_broken_files_raise_typed_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    text = tmp_path / "text.png"
    text.write_text("this is not an image\n")
    cases = {
        truncated: "truncated",
        empty: "empty file",
        text: "not a recognised image",
        tmp_path / "missing.png": "file not found",
        tmp_path: "not a regular file",
    }
    for path, reason in cases.items():
        with pytest.raises(ImageDecodeError, match=reason) as info:
            load_image_pixels(path)
        assert info.value.path == str(path) and str(path) in str(info.value)
    assert load_image_pixels(good).pixels.shape == (3, 512, 512)
