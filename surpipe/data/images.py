"""Image checks and conversion to 8-bit RGB, with a pixel limit checked from the header.

Every decode goes through :func:`open_checked`, which reads only the header, refuses images
with more than ``max_pixels`` pixels *before* any pixel data is decoded (decompression bombs),
and only then decodes (``full=True``).

Conversion rules of :func:`to_rgb` (documented in the project README):

* RGB: unchanged. L, 1, CMYK, YCbCr, ...: PIL's standard conversion to RGB.
* Anything with alpha (RGBA, LA, PA, RGBa, La, P/L/RGB with a ``transparency`` entry):
  composited on white, ``out = round((c * a + 255 * (255 - a)) / 255)``.
* 16-bit integer modes (I;16, I;16L, I;16B, I;16N) and I (what 16-bit PNG/TIFF greyscale loads as):
  treated as 0..65535 and scaled, ``out = round(v * 255 / 65535)`` (values outside are clipped),
  so a 16-bit image keeps its full tonal range instead of being clipped at 255.
* F (32-bit float): treated as 0..1 when every finite value is within [0, 1], else as 0..255;
  clipped; NaN becomes 0.
* EXIF orientation is applied (so photos come out upright).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 8192 * 8192

# File extensions treated as images in imagefolders and webdataset shards.
IMAGE_EXTENSIONS = frozenset(
    {"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "pnm", "jp2", "tga", "ico"}
)
# PIL format name -> extension used when a file's own extension is missing or unknown.
FORMAT_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tiff",
                     "PPM": "ppm", "JPEG2000": "jp2", "TGA": "tga", "ICO": "ico"}

_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageProblem(Exception):
    """An image that cannot be used. ``reason`` is a short category for reports."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


class _Window(io.RawIOBase):
    """A read-only, seekable view of bytes ``[start, start + size)`` of an open binary file
    (an image member inside a .tar shard), so PIL reads only what it asks for."""

    def __init__(self, f: BinaryIO, start: int, size: int):
        super().__init__()
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise OSError(f"negative seek position {base + pos}")
        self._pos = base + pos
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n]) or 0
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            self._f.close()
        super().close()


def open_file_window(path: str, offset: int = -1, size: int = -1) -> BinaryIO:
    """A seekable binary file of a whole file (``offset < 0``) or of ``size`` bytes at ``offset``.

    Raises OSError when the file cannot be opened, or EOFError when it is shorter than
    ``offset + size`` (a shard truncated since it was scanned).
    """
    f = open(path, "rb")
    if offset < 0:
        return f
    try:
        have = os.fstat(f.fileno()).st_size
        if have < offset + size:
            raise EOFError(f"{path} has {have} bytes, the image needs bytes {offset}..{offset + size}")
    except BaseException:
        f.close()
        raise
    return io.BufferedReader(_Window(f, offset, size))


@dataclass(frozen=True)
class ImageInfo:
    format: str | None
    mode: str
    width: int
    height: int


def _allow_pixels(max_pixels: int) -> None:
    # PIL refuses (at 2x) or warns (at 1x) past Image.MAX_IMAGE_PIXELS during open. Our own limit
    # is checked right after the header is read; raise PIL's only if ours is larger, never lower it.
    cur = Image.MAX_IMAGE_PIXELS
    if cur is not None and max_pixels > cur:
        Image.MAX_IMAGE_PIXELS = max_pixels


ImageSource = Union[bytes, bytearray, memoryview, BinaryIO]


def open_checked(data: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, full: bool = True) -> Image.Image:
    """Open an encoded image (bytes, or a seekable binary file); check the pixel count from the
    header; decode if ``full``.

    Given a file, only the bytes the format's header needs are read (a multi-GiB file named
    ``.png`` costs no memory); the caller keeps the file open until it is done with the image.
    Raises :class:`ImageProblem` with reason "not an image", "too many pixels" or
    "truncated or corrupt image".
    """
    _allow_pixels(max_pixels)
    src = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        im = Image.open(src)  # lazy: reads the header only
    except Image.DecompressionBombError as e:
        raise ImageProblem("too many pixels", str(e)) from None
    except UnidentifiedImageError:
        raise ImageProblem("not an image", "no image format recognised") from None
    except Exception as e:  # header parsers raise assorted errors on garbage
        raise ImageProblem("not an image", f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ImageProblem("not an image", f"size {w}x{h}")
    if w * h > max_pixels:
        raise ImageProblem("too many pixels", f"{w}x{h} = {w * h} pixels > limit {max_pixels} (decompression bomb?)")
    if full:
        try:
            im.load()
        except Image.DecompressionBombError as e:
            raise ImageProblem("too many pixels", str(e)) from None
        except Exception as e:
            raise ImageProblem("truncated or corrupt image", f"{type(e).__name__}: {e}") from None
    return im


def probe(data: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS, full: bool = True) -> ImageInfo:
    """Check an image (header only, or a full decode) and return its format, mode and size."""
    im = open_checked(data, max_pixels=max_pixels, full=full)
    try:
        return ImageInfo(im.format, im.mode, im.size[0], im.size[1])
    finally:
        im.close()


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    rgb = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    out = (rgb * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded PIL image of any mode to 8-bit RGB (rules in the module docstring)."""
    try:
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block must not make the image unusable
        pass
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _SIXTEEN_BIT or mode == "I":
        a = np.asarray(im).astype(np.int64)
        a = np.clip(a, 0, 65535)
        g = ((a * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(g, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im).astype(np.float64)
        finite = a[np.isfinite(a)]
        scale = 255.0 if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0 else 1.0
        a = np.nan_to_num(a * scale, nan=0.0, posinf=255.0, neginf=0.0)
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(g, "L").convert("RGB")
    has_alpha = "A" in im.getbands() or "a" in im.getbands() or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")  # also un-premultiplies RGBa / La
        return Image.fromarray(_composite_on_white(np.asarray(rgba)), "RGB")
    try:
        return im.convert("RGB")
    except Exception as e:
        raise ImageProblem("unsupported image mode", f"{mode}: {e}") from None


def decode_rgb(data: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Encoded bytes (or a seekable binary file) -> decoded 8-bit RGB image (pixel limit checked
    before decoding)."""
    im = open_checked(data, max_pixels=max_pixels, full=True)
    try:
        return to_rgb(im)
    except ImageProblem:
        raise
    except Exception as e:
        raise ImageProblem("truncated or corrupt image", f"{type(e).__name__}: {e}") from None
