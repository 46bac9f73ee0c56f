"""What every encoder shares: freezing, pixel normalisation, and reproducible random initialisation.

A frozen encoder keeps eval mode even under `model.train()` (BatchNorm statistics must not drift)
and runs without autograd, so its outputs can also be cached once per sample (see `identity()`).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

IMAGE_MEAN = 0.5  # the paper normalises with mean = std = 0.5 on every channel
IMAGE_STD = 0.5


class FreezableEncoder(nn.Module):
    """Freezing: no gradients, eval mode forever, forward under no_grad."""

    def __init__(self, frozen: bool):
        super().__init__()
        self.frozen = frozen

    def freeze_if_configured(self) -> None:
        if self.frozen:
            for p in self.parameters():
                p.requires_grad_(False)
            super().train(False)

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)

    def _run(self, fn, *args):
        if self.frozen:
            with torch.no_grad():
                return fn(*args)
        return fn(*args)


def normalize_pixels(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels (B, 3, H, W) in 0..255 -> float, mean = std = 0.5; float input is taken as done already.

    Loaders hand over uint8 (a quarter of the bytes between processes and to the GPU) and the
    conversion runs here, on the encoder's device.
    """
    if images.dtype != torch.uint8:
        return images
    return images.to(dtype).div_(255.0 * IMAGE_STD).sub_(IMAGE_MEAN / IMAGE_STD)  # (B, 3, H, W)


class ImageEncoder(FreezableEncoder):
    """images (B, 3, H, W): uint8 pixels, or floats normalised with mean = std = 0.5 -> tokens (B, N, C), N = h * w."""

    out_dim: int

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(self.encode, normalize_pixels(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def grid_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        raise NotImplementedError

    def identity(self) -> str:
        raise NotImplementedError


@contextlib.contextmanager
def seeded(seed: int):
    """Random encoder weights depend only on the run's seed, so identity() can name them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def kaiming_init(net: nn.Module) -> None:
    """He init (fan-in, so depthwise convs count only their own k×k taps) for random convolution stacks.

    PyTorch's default uniform init shrinks activations about 1000× through a deep random stack, and
    a random encoder initialised that way gave the slots nothing to learn from in small runs.
    """
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
