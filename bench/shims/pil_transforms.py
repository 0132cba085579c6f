"""The few torchvision.transforms pieces diffusers' textual_inversion scripts use, on PIL images.

No CPU build of torchvision works with the torch used here. bench.py runs the reference from a
temporary copy whose `from torchvision import transforms` line imports this module instead;
the file the user gave is not modified. (A package named torchvision on the path would not
do: transformers would take it for the real one.)
"""

from __future__ import annotations

import random
from types import SimpleNamespace

from PIL import Image


def _crop(image: Image.Image, top: int, left: int, height: int, width: int) -> Image.Image:
    return image.crop((left, top, left + width, top + height))


functional = SimpleNamespace(crop=_crop)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if random.random() < self.p else image


class CenterCrop:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        top = round((image.height - self.size) / 2)
        left = round((image.width - self.size) / 2)
        return _crop(image, top, left, self.size, self.size)


class RandomCrop:
    def __init__(self, size: int):
        self.size = size

    @staticmethod
    def get_params(image: Image.Image, output_size: tuple[int, int]) -> tuple[int, int, int, int]:
        height, width = output_size
        return random.randint(0, image.height - height), random.randint(0, image.width - width), height, width

    def __call__(self, image: Image.Image) -> Image.Image:
        return _crop(image, *self.get_params(image, (self.size, self.size)))
