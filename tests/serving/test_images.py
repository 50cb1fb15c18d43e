"""Images made MNIST-like, and the pixel checks."""

import io

import numpy as np
import pytest
from PIL import Image

from serving.errors import InvalidInput
from serving.images import check_pixels, decode_image, mnistify


def png(arr, mode="L"):
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8), mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_dark_on_light_is_inverted_cropped_scaled_and_centred():
    img = np.full((100, 60), 255, np.uint8)
    img[10:50, 5:15] = 0  # a black bar, off centre, on white
    out = decode_image(png(img), "images[0]")
    assert out.shape == (28, 28) and out.dtype == np.float32
    ys, xs = np.nonzero(out > 50)
    assert ys.max() - ys.min() + 1 <= 20 and ys.max() - ys.min() + 1 >= 18  # longer side scaled to 20 px
    cy = (out.sum(1) * np.arange(28)).sum() / out.sum()
    cx = (out.sum(0) * np.arange(28)).sum() / out.sum()
    assert abs(cy - 13.5) < 1 and abs(cx - 13.5) < 1  # centre of mass in the middle
    assert out[0].max() == 0 and out[:, 0].max() == 0  # black background


def test_blank_image_stays_blank_and_rgba_is_composited_on_white():
    assert mnistify(np.zeros((40, 40), np.float32)).max() == 0
    rgba = np.zeros((30, 30, 4), np.uint8)  # fully transparent: white after compositing -> blank
    assert decode_image(png(rgba, "RGBA"), "x").max() == 0


def test_pixel_checks_name_the_problem():
    assert check_pixels([[0] * 28] * 28, "images[0]").shape == (28, 28)
    with pytest.raises(InvalidInput, match=r"images\[2\] has shape 28x27"):
        check_pixels([[0] * 27] * 28, "images[2]")
    with pytest.raises(InvalidInput, match="outside 0..255"):
        check_pixels([[float("nan")] * 28] * 28, "images[0]")
    with pytest.raises(InvalidInput, match="could not be decoded as PNG or JPEG .*only PNG and JPEG"):
        buf = io.BytesIO()
        Image.new("L", (5, 5)).save(buf, format="GIF")
        decode_image(buf.getvalue(), "images[0]")
