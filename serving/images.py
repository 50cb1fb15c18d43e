"""Images -> the 28x28 float32 pixels the digits model takes (0-255, 0 = background).

Two inputs:

- ``pixels``: 28x28 numbers 0-255, already MNIST-like (white digit on black);
  used as they are.
- encoded PNG/JPEG bytes of any size, made MNIST-like the way the MNIST set
  itself was made (LeCun et al.): decoded with Pillow and converted to 8-bit
  grayscale (alpha composited on white); inverted when the background is light
  (the border pixels' mean > 127), since MNIST digits are light on dark;
  cropped to the digit's bounding box (pixels above 10 % of the maximum); the
  longer side scaled to 20 px keeping the aspect ratio (Lanczos); pasted into
  a black 28x28 canvas so that the centre of mass sits at the centre (14, 14).
  A blank image stays blank.
"""

from __future__ import annotations

import base64
import binascii
import io

import numpy as np

from serving.errors import InvalidInput, PayloadTooLarge

SIZE = 28
BOX = 20


def decode_b64(items: list, where: str, max_bytes: int) -> list[bytes]:
    """Base64 strings -> bytes; each at most ``max_bytes`` decoded (checked before decoding)."""
    out = []
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise InvalidInput(f"{where}[{i}] must be a base64 string, got {type(s).__name__}")
        if len(s) > max_bytes * 4 // 3 + 4:
            raise PayloadTooLarge(f"{where}[{i}] is over max_image_bytes={max_bytes}")
        try:
            out.append(base64.b64decode(s, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInput(f"{where}[{i}] is not valid base64") from None
    return out


def check_pixels(img, where: str) -> np.ndarray:
    """A 28x28 array of numbers in 0..255, or InvalidInput naming what is wrong."""
    try:
        a = np.asarray(img, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(f"{where} must be {SIZE}x{SIZE} numbers 0..255 (rows of equal length)") from None
    if a.shape != (SIZE, SIZE):
        raise InvalidInput(f"{where} has shape {'x'.join(map(str, a.shape)) or 'scalar'}; images must be {SIZE}x{SIZE}")
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 255:
        raise InvalidInput(f"{where} has pixels outside 0..255")
    return a


def from_raw_bytes(data: bytes, where: str) -> np.ndarray:
    if len(data) != SIZE * SIZE:
        raise InvalidInput(f"{where} raw image has {len(data)} bytes; must be {SIZE * SIZE} (28x28 uint8)")
    return np.frombuffer(data, dtype=np.uint8).reshape(SIZE, SIZE).astype(np.float32)


def _open(data: bytes, where: str, max_pixels: int):
    """The image's header (nothing decoded yet), checked against the pixel budget."""
    from PIL import Image

    try:
        im = Image.open(io.BytesIO(data), formats=("PNG", "JPEG"))
    except Image.DecompressionBombError:  # Pillow's own guard, at twice its MAX_IMAGE_PIXELS
        raise PayloadTooLarge(
            f"{where} declares over {2 * Image.MAX_IMAGE_PIXELS} pixels > max_image_pixels={max_pixels}"
        ) from None
    if im.width * im.height > max_pixels:
        im.close()
        raise PayloadTooLarge(
            f"{where} is {im.width}x{im.height} = {im.width * im.height} pixels > max_image_pixels={max_pixels}"
        )
    return im


def image_pixels(data: bytes, where: str, max_pixels: int) -> int:
    """width x height from the header alone (cheap), or an error naming the broken limit."""
    from PIL import UnidentifiedImageError

    try:
        with _open(data, where, max_pixels) as im:
            return im.width * im.height
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise _undecodable(where, e) from None


def decode_image(data: bytes, where: str, max_pixels: int = 4_000_000) -> np.ndarray:
    """Encoded PNG/JPEG bytes -> MNIST-like 28x28 float32 (see module docstring).

    Images over ``max_pixels`` (width x height, read from the header) are refused
    before decoding. Pillow releases the GIL while it decodes, so this belongs in
    a worker thread.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with _open(data, where, max_pixels) as im:
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im2 = Image.alpha_composite(bg, rgba).convert("L")
            else:
                im2 = im.convert("L")
            gray = np.asarray(im2, dtype=np.float32)
    except (InvalidInput, PayloadTooLarge):
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _undecodable(where, e) from None
    return mnistify(gray)


def _undecodable(where: str, e: Exception) -> InvalidInput:
    from PIL import UnidentifiedImageError

    hint = "; only PNG and JPEG images are accepted" if isinstance(e, UnidentifiedImageError) else ""
    return InvalidInput(f"{where} could not be decoded as PNG or JPEG ({type(e).__name__}){hint}")


def mnistify(gray: np.ndarray) -> np.ndarray:
    from PIL import Image

    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    if border.mean() > 127:
        gray = 255.0 - gray
    if gray.max() <= 0:
        return np.zeros((SIZE, SIZE), np.float32)
    ys, xs = np.nonzero(gray > gray.max() * 0.1)
    crop = gray[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    scale = BOX / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    small = np.asarray(Image.fromarray(crop.astype(np.uint8)).resize((nw, nh), Image.LANCZOS), dtype=np.float32)
    total = small.sum()
    if total > 0:
        cy = (small.sum(axis=1) * np.arange(nh)).sum() / total
        cx = (small.sum(axis=0) * np.arange(nw)).sum() / total
    else:
        cy, cx = (nh - 1) / 2, (nw - 1) / 2
    top = int(np.clip(round(SIZE / 2 - 0.5 - cy), 0, SIZE - nh))
    left = int(np.clip(round(SIZE / 2 - 0.5 - cx), 0, SIZE - nw))
    out = np.zeros((SIZE, SIZE), np.float32)
    out[top : top + nh, left : left + nw] = small
    return out
