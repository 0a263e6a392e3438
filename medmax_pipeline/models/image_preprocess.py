"""Image preprocessing of the original Chameleon ImageTokenizer (the one MedMax ran), step by step.

    1. to_rgb:          non-RGB -> RGBA; any alpha < 255 -> blend onto white in float64 and cast
                        to uint8 (truncation, as numpy's astype does); else img.convert("RGB").
    2. resized_size:    shorter side -> 512: scale = 512 / min(w, h), size (round(scale*w),
                        round(scale*h)) with Python's round (ties to even), PIL LANCZOS.
    3. center_crop_box: (x0, y0) = ((w' - 512) // 2, (h' - 512) // 2).
    4. to_pixels:       x / 255.0 * 2 - 1 computed in float64, then float32, CHW.

Choices beyond the original (which relied on whatever PIL did), and what PIL does:
- High bit depth grayscale (modes I;16, I;16L, I;16B, I;16N: how PIL opens 16-bit PNG and TIFF;
  I: 32-bit TIFF; F: float TIFF) goes through PIL's convert("RGBA") / convert("RGB") exactly as
  the original did. PIL clips there, it does not scale: 16-bit values above 255 become 255 (so most
  16-bit medical images come out nearly white), negative values 0, floats are truncated then
  clipped (NaN becomes 0). HIGH_BIT_DEPTH_MODES names them, so the tokenize stage can count them.
- CMYK, YCbCr, LAB, 1, P, PA, LA, La, RGBa, RGBX go through PIL's convert("RGBA") exactly as the
  original would have (CMYK uses PIL's naive conversion, no ICC profile).
- Only the first frame of a multi-frame file (GIF, TIFF) is used. EXIF orientation is not applied
  (the original did not apply it either).
- Files are opened safely: missing, empty, unidentifiable, truncated or over-large files raise
  ImageDecodeError naming the file and the reason; nothing is ever replaced by a blank image.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from medmax_pipeline.core.constants import IMAGE_SIZE

if TYPE_CHECKING:
    import torch

# PIL's own bomb threshold (it only warns above it, and errors above twice it). We raise above it.
DEFAULT_MAX_PIXELS: int = 89_478_485

# Grayscale with more than 8 bits a pixel: PIL's convert clips these to 0..255 (see above).
HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
# Modes PIL converts to RGBA in a well-defined way (what the original tokenizer relied on).
CONVERTIBLE_MODES = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"} | HIGH_BIT_DEPTH_MODES
)


class ImageDecodeError(ValueError):
    """An image file cannot become pixels; `reason` is a short phrase for the errors artifact."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclass(frozen=True)
class PreprocessedImage:
    """The VQGAN input of one image and what it looked like before preprocessing."""

    pixels: torch.Tensor  # float32 [3, 512, 512] in [-1, 1]
    orig_width: int
    orig_height: int
    orig_mode: str


# ----------------------------------------------------------------------------------------------
# Opening
# ----------------------------------------------------------------------------------------------


def open_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode the first frame of an image file, refusing anything doubtful.

    Raises ImageDecodeError for: a missing or non-regular file, zero bytes, a file PIL cannot
    identify, more than `max_pixels` pixels (checked from the header, before decoding), and a
    truncated or corrupt pixel stream (PIL's LOAD_TRUNCATED_IMAGES must stay False).
    """
    path = Path(path)
    if not path.exists():
        raise ImageDecodeError(path, "file not found")
    if not path.is_file():
        raise ImageDecodeError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone switched PIL to silently pad truncated files with grey: refuse to run like that.
        raise ImageDecodeError(path, "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set; refusing to decode")
    try:
        with warnings.catch_warnings():
            # We apply our own limit below; PIL's warning is not an error and is silenced here.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(path, f"decompression bomb refused ({exc})") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(path, f"cannot open image: {exc}") from None
    try:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise ImageDecodeError(path, f"image has no pixels ({width}x{height})")
        if width * height > max_pixels:
            raise ImageDecodeError(
                path, f"decompression bomb refused: {width}x{height} = {width * height} pixels > limit {max_pixels}"
            )
        try:
            image.seek(0)
            image.load()
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageDecodeError(path, f"truncated or corrupt image data: {exc}") from None
        if image.size != (width, height):  # some decoders (JPEG draft) could change it; be sure
            raise ImageDecodeError(path, f"size changed while decoding: {width}x{height} -> {image.size}")
        return image
    except ImageDecodeError:
        image.close()
        raise


# ----------------------------------------------------------------------------------------------
# Step 1: colour
# ----------------------------------------------------------------------------------------------


def blend_onto_white(rgba: np.ndarray) -> np.ndarray:
    """The original's alpha blend: (1 - a/255) * 255 + a/255 * rgb in float64, cast to uint8."""
    alpha = rgba[:, :, 3] / 255.0
    blended = (1 - alpha[:, :, np.newaxis]) * 255 + alpha[:, :, np.newaxis] * rgba[:, :, :3]
    return blended.astype("uint8")


def to_rgb(image: Image.Image, path: str | Path = "<image>") -> Image.Image:
    """Step 1: an RGB image, alpha blended onto white as the original ImageTokenizer did."""
    if image.mode == "RGB":
        return image
    if image.mode not in CONVERTIBLE_MODES:
        raise ImageDecodeError(path, f"unsupported image mode {image.mode!r}")
    rgba = np.array(image.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():
        return image.convert("RGB")
    return Image.fromarray(blend_onto_white(rgba), "RGB")


# ----------------------------------------------------------------------------------------------
# Steps 2-4: geometry and pixels
# ----------------------------------------------------------------------------------------------


def resized_size(width: int, height: int, target: int = IMAGE_SIZE) -> tuple[int, int]:
    """Step 2's size: shorter side -> target, (round(scale*w), round(scale*h)), ties to even."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = target / min(width, height)
    return round(scale * width), round(scale * height)


def center_crop_box(width: int, height: int, target: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """Step 3's crop box (x0, y0, x0 + target, y0 + target) with x0 = (w - target) // 2."""
    if width < target or height < target:
        raise ValueError(f"cannot crop {target}x{target} out of {width}x{height}")
    x0 = (width - target) // 2
    y0 = (height - target) // 2
    return x0, y0, x0 + target, y0 + target


def to_pixels(image: Image.Image) -> torch.Tensor:
    """Step 4: uint8 RGB HWC -> float32 CHW in [-1, 1], computed in float64 like the original."""
    if image.mode != "RGB":
        raise ValueError(f"to_pixels needs an RGB image, got mode {image.mode!r}")
    values = np.array(image) / 255.0
    values = values * 2 - 1
    import torch  # here, not at the top: the workflow reads this module's constants at planning

    return torch.from_numpy(values).permute(2, 0, 1).float().contiguous()


def preprocess_image(
    image: Image.Image, path: str | Path = "<image>", target: int = IMAGE_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS
) -> torch.Tensor:
    """Steps 1-4 on a decoded image: float32 [3, target, target] in [-1, 1].

    `max_pixels` also bounds the resized image, so that an extreme aspect ratio (1 x 100000)
    cannot blow up memory; such an image is refused with ImageDecodeError.
    """
    rgb = to_rgb(image, path)
    new_width, new_height = resized_size(rgb.width, rgb.height, target)
    if new_width * new_height > max_pixels:
        raise ImageDecodeError(
            path,
            f"aspect ratio too extreme: {rgb.width}x{rgb.height} resizes to {new_width}x{new_height}, "
            f"more than {max_pixels} pixels",
        )
    resized = rgb.resize((new_width, new_height), Image.LANCZOS)
    cropped = resized.crop(center_crop_box(new_width, new_height, target))
    return to_pixels(cropped)


def load_image_pixels(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> PreprocessedImage:
    """Open an image file safely and preprocess it; the pixels plus the original size and mode."""
    image = open_image(path, max_pixels=max_pixels)
    try:
        orig_width, orig_height, orig_mode = image.width, image.height, image.mode
        pixels = preprocess_image(image, path, max_pixels=max_pixels)
    except ImageDecodeError:
        raise
    except (OSError, ValueError) as exc:  # e.g. a mode PIL cannot convert
        raise ImageDecodeError(path, f"cannot preprocess image: {exc}") from None
    finally:
        image.close()
    return PreprocessedImage(pixels=pixels, orig_width=orig_width, orig_height=orig_height, orig_mode=orig_mode)
