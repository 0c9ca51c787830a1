"""Decode and check one image, hash its pixels, write the stored copy and a thumbnail."""
from __future__ import annotations

import hashlib
import io
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


@dataclass
class CheckedImage:
    sha256: str
    width: int
    height: int
    rgb: Image.Image
    #: bytes to store and their suffix; None when the original can be kept as it is
    stored_bytes: bytes | None
    suffix: str


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, with transparency composited over white (emoji and icons have clear backgrounds)."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, (255, 255, 255))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


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
    rgb = to_rgb(image)
    digest = hashlib.sha256(f"{width}x{height}:".encode() + rgb.tobytes()).hexdigest()
    keep = image.format in KEEP_AS_IS and image.mode == "RGB"
    return CheckedImage(sha256=digest, width=width, height=height, rgb=rgb,
                        stored_bytes=None if keep else _png_bytes(rgb),
                        suffix=KEEP_AS_IS[image.format] if keep else ".png")


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def content_path(sha256: str, suffix: str) -> str:
    """Content-addressed location, fanned out so no folder holds millions of files."""
    return f"{sha256[:2]}/{sha256}{suffix}"


def write_thumbnail(image: Image.Image, target: Path, max_px: int) -> None:
    thumb = image.copy()
    thumb.thumbnail((max_px, max_px), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    if max(image.size) <= SMALL_THUMB_PX:
        thumb.save(target.with_suffix(".png"), format="PNG")
    else:
        thumb.save(target.with_suffix(".jpg"), format="JPEG", quality=88)


def thumb_suffix(image_size: tuple[int, int]) -> str:
    return ".png" if max(image_size) <= SMALL_THUMB_PX else ".jpg"
