"""Turn one image file into the RGB JPEG a shard stores, or say precisely why it cannot.

Rules (docs/data-format.md): EXIF orientation applied, every mode made RGB (alpha composited on
white), longer side limited to `max_size`, the original bytes kept when nothing had to change.
The pixel limit is checked on the header, before any pixel is decoded, so a decompression bomb
costs a few bytes of reading, not gigabytes of memory.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from sgdata.format.errors import SampleError
from sgdata.sources.base import StoredImage

JPEG_QUALITY = 95

# EXIF Orientation tag value -> the transpose that displays the pixels upright (as ImageOps.exif_transpose).
_ORIENTATION_TO_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270, Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE}
_EXIF_ORIENTATION_TAG = 0x0112


def oriented_size(width: int, height: int, transpose: int | None) -> tuple[int, int]:
    """(width, height) after a transpose op: the 90-degree ones swap the axes."""
    if transpose is not None and Image.Transpose(transpose) in _SWAPS_AXES:
        return height, width
    return width, height


def fit_size(width: int, height: int, max_size: int | None) -> tuple[int, int]:
    """The size with the longer side at most `max_size`, aspect kept (each side at least 1 pixel)."""
    longer = max(width, height)
    if max_size is None or longer <= max_size:
        return width, height
    scale = max_size / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def _orientation(image: Image.Image) -> Image.Transpose | None:
    try:
        value = image.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a corrupt EXIF block must not cost the image: treat it as upright
        return None
    return _ORIENTATION_TO_TRANSPOSE.get(value) if isinstance(value, int) else None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Transparent pixels become white, 16/32-bit grey is scaled, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        top = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)  # (H, W)
        return Image.fromarray(grey, mode="L").convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _open_checked(data: bytes, path: str, max_pixels: int) -> Image.Image:
    """Open from the header only and refuse images above the pixel limit before decoding."""
    if not data:
        raise SampleError("unreadable_image", f"{path} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise SampleError("image_too_large", f"{path}: {exc}") from exc
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        # PIL's message names the in-memory buffer object (an address that changes per run): keep only its kind
        raise SampleError("unreadable_image", f"{path} is not a readable image ({type(exc).__name__})") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise SampleError(
            "image_too_large", f"{path} is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}"
        )
    if width < 1 or height < 1:
        raise SampleError("unreadable_image", f"{path} has an empty size {width}x{height}")
    return image


def _decode(image: Image.Image, path: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Image.DecompressionBombError as exc:
        raise SampleError("image_too_large", f"{path}: {exc}") from exc
    except Exception as exc:  # truncated data, corrupt streams: every decoder error means the same here
        raise SampleError("unreadable_image", f"{path} could not be decoded ({exc})") from exc


def load_image(path: str, *, max_size: int | None = None, max_pixels: int = 80_000_000) -> StoredImage:
    """Read, check, orient, convert and resize one image file; raise SampleError when it cannot be used."""
    path = str(path)
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError as exc:
        raise SampleError("missing_image_file", f"{path} does not exist") from exc
    except OSError as exc:  # permission denied, a directory, a symlink loop
        raise SampleError("unreadable_image", f"{path} cannot be read ({exc.strerror or exc})") from exc
    image = _open_checked(data, path, max_pixels)
    source_width, source_height = image.size
    transpose = _orientation(image)
    upright_size = oriented_size(source_width, source_height, transpose)
    target_size = fit_size(*upright_size, max_size)
    is_jpeg = image.format == "JPEG"
    if is_jpeg and target_size != upright_size:
        # Let libjpeg decode at a reduced DCT scale when the target is far smaller: same result class, far less work.
        image.draft("RGB", oriented_size(*target_size, transpose))
    if is_jpeg and image.mode == "RGB" and transpose is None and target_size == upright_size:
        # Passthrough keeps the file's bytes, so decoding only has to prove the stream is whole:
        # at 1/8 scale libjpeg still entropy-decodes every block (a truncated file still fails) but
        # skips the inverse DCT, upsampling and colour conversion.
        image.draft("RGB", (max(1, source_width // 8), max(1, source_height // 8)))
        _decode(image, path)
        return StoredImage(data, source_width, source_height, source_width, source_height, None, True)
    _decode(image, path)
    image = _to_rgb(image)
    if transpose is not None:
        image = image.transpose(transpose)
    if image.size != target_size:
        image = image.resize(target_size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return StoredImage(
        data=buffer.getvalue(),
        width=target_size[0],
        height=target_size[1],
        source_width=source_width,
        source_height=source_height,
        transpose=None if transpose is None else int(transpose),
        passthrough=False,
    )


def decode_rgb(data: bytes) -> Image.Image:
    """Shard `jpg` bytes -> a decoded RGB image (for readers, inspect and the model's loaders)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")
