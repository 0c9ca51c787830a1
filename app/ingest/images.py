"""Decode and check one image, hash its pixels, write the stored copy and a thumbnail.

Memory per image is bounded (docs/security.md, "Ingest input"): the file's bytes, the decoded
image, and, unless it is RGB already, one RGB copy of it. Conversion and hashing go strip by strip
and the thumbnail is reduced from the image itself, so no other full-size buffer is made.
"""
from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile, UnidentifiedImageError

from app.ingest.errors import IngestError

# A truncated file is an error, never silently padded with grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# Formats kept byte for byte when already RGB; anything else is re-encoded as PNG.
KEEP_AS_IS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}
SMALL_THUMB_PX = 256
#: pixels converted or hashed at a time (a strip of whole rows)
STRIP_PIXELS = 1 << 20


@dataclass
class CheckedImage:
    sha256: str
    width: int
    height: int
    #: the decoded pixels in RGB: the one full-size image held per image
    rgb: Image.Image
    #: True when the original file is stored byte for byte; else `rgb` is stored as PNG
    keep_original: bool
    suffix: str

    def write(self, target: Path, original: bytes) -> None:
        if self.keep_original:
            target.write_bytes(original)
        else:  # streamed to the file by the encoder, never held whole in memory
            self.rgb.save(target, format="PNG", optimize=False)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited over white (emoji and icons have clear backgrounds)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _strips(size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    width, height = size
    rows = max(1, STRIP_PIXELS // max(width, 1))
    return [(0, top, width, min(top + rows, height)) for top in range(0, height, rows)]


def to_rgb_in_strips(image: Image.Image) -> Image.Image:
    """to_rgb for a large image: the image itself when RGB, else one RGB canvas filled strip by
    strip, so the only full-size buffers are the decoded image and its RGB copy (to_rgb would
    make an RGBA copy of a transparent image first)."""
    if image.mode == "RGB":
        return image
    canvas = Image.new("RGB", image.size)
    for box in _strips(image.size):
        canvas.paste(to_rgb(image.crop(box)), box)
    return canvas


def pixel_sha256(rgb: Image.Image) -> str:
    """sha256 of "WxH:" and the RGB bytes, row by row: the same digest as hashing rgb.tobytes()
    without making that full-size copy."""
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    for box in _strips(rgb.size):
        digest.update(rgb.crop(box).tobytes())
    return digest.hexdigest()


def check_image(data: bytes, *, path: str, max_pixels: int) -> CheckedImage:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise IngestError(f"image is {width}x{height} pixels, more than the limit of "
                                  f"{max_pixels} (decompression bomb?)", path=path)
            image.load()
    except IngestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise IngestError(f"image is too large to decode safely ({exc})", path=path) from exc
    except UnidentifiedImageError as exc:
        raise IngestError("not an image file (Pillow cannot identify it)", path=path) from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise IngestError(f"corrupt or truncated image ({exc})", path=path) from exc
    keep = image.format in KEEP_AS_IS and image.mode == "RGB"
    suffix = KEEP_AS_IS[image.format] if keep else ".png"
    rgb = to_rgb_in_strips(image)
    return CheckedImage(sha256=pixel_sha256(rgb), width=width, height=height, rgb=rgb,
                        keep_original=keep, suffix=suffix)


def content_path(sha256: str, suffix: str) -> str:
    """Content-addressed location, fanned out so no folder holds millions of files."""
    return f"{sha256[:2]}/{sha256}{suffix}"


def thumbnail_size(size: tuple[int, int], max_px: int) -> tuple[int, int]:
    """The size Image.thumbnail((max_px, max_px)) gives: the aspect ratio kept, rounded as it is."""
    width, height = size
    if width <= max_px and height <= max_px:
        return size
    aspect = width / height
    if aspect <= 1:
        x = max(min(math.floor(max_px * aspect), math.ceil(max_px * aspect),
                    key=lambda n: abs(aspect - n / max_px)), 1)
        return x, max_px
    y = max(min(math.floor(max_px / aspect), math.ceil(max_px / aspect),
                key=lambda n: 0 if n == 0 else abs(aspect - max_px / n)), 1)
    return max_px, y


def write_thumbnail(image: Image.Image, target: Path, max_px: int) -> None:
    # What image.copy().thumbnail(...) gives, without the full-size copy: resize() with a
    # reducing gap first reduces the image by a whole factor into a small one.
    size = thumbnail_size(image.size, max_px)
    thumb = image if size == image.size else image.resize(size, Image.Resampling.LANCZOS,
                                                           reducing_gap=2.0)
    target.parent.mkdir(parents=True, exist_ok=True)
    if max(image.size) <= SMALL_THUMB_PX:
        thumb.save(target.with_suffix(".png"), format="PNG")
    else:
        thumb.save(target.with_suffix(".jpg"), format="JPEG", quality=88)


def thumb_suffix(image_size: tuple[int, int]) -> str:
    return ".png" if max(image_size) <= SMALL_THUMB_PX else ".jpg"
