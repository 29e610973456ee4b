"""Images as the VAE sees them: the diffusers/authors' training transforms (``Resize(R, bilinear)``,
``CenterCrop(R)``, ``ToTensor``, ``Normalize([0.5], [0.5])``), written with PIL + numpy because
torchvision is not a dependency.

Exactness rule (tests/test_encode_latents.py checks it): the shorter side is resized to R with PIL's
bilinear filter (long side ``int(R * long / short)``), the crop offsets are
``int(round((size - R) / 2))`` (Python's round, as torchvision), and pixels map to ``x / 127.5 - 1``
in CHW float32. The horizontally flipped variant is the flip of the cropped image (flip after crop,
as ``RandomHorizontalFlip`` after ``CenterCrop``); encode-latents flips the tensor.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

def resized_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """Size after resizing the shorter side to ``resolution`` (torchvision's ``Resize(int)`` rule)."""
    if width <= height:
        return resolution, int(resolution * height / width)
    return int(resolution * width / height), resolution


def center_crop_box(width: int, height: int, resolution: int) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of torchvision's ``CenterCrop`` (its rounding)."""
    left = int(round((width - resolution) / 2.0))
    top = int(round((height - resolution) / 2.0))
    return left, top, left + resolution, top + resolution


def preprocess_pil(img: Image.Image, resolution: int) -> Image.Image:
    """Resize the shorter side to ``resolution`` (bilinear) and center-crop a square of that size."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    size = resized_size(*img.size, resolution)
    if size != img.size:
        img = img.resize(size, Image.BILINEAR)
    box = center_crop_box(*img.size, resolution)
    return img.crop(box)


def to_tensor(img: Image.Image):
    """8-bit RGB PIL image -> float32 CHW tensor in [-1, 1] (``ToTensor`` + ``Normalize(0.5, 0.5)``)."""
    import torch  # heavy: keeps --help torch-free

    a = np.asarray(img, dtype=np.uint8)
    x = torch.from_numpy(a.copy()).permute(2, 0, 1).float().div_(255.0)
    return x.sub_(0.5).div_(0.5)


def preprocess(img: Image.Image, resolution: int):
    """PIL image -> the VAE's input, float32 [3, R, R] in [-1, 1]."""
    return to_tensor(preprocess_pil(img, resolution))
