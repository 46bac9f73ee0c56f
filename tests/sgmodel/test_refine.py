"""Image-guided refinement (sgmodel/refine.py): a per-pixel oracle, and the sharper mask it exists for."""

import numpy as np
import torch
import torch.nn.functional as F

from sgmodel.inference import threshold_maps
from sgmodel.refine import refine_maps


def refine_oracle(grid_map: np.ndarray, image: np.ndarray, iterations: int, dilations, scale: float = 0.1) -> np.ndarray:
    """Plain loops over pixels and neighbours: the rule as docs/method.md states it."""
    h, w = image.shape[1:]
    up = F.interpolate(torch.from_numpy(grid_map)[None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0].double().numpy()
    m = (up - up.min()) / (up.max() - up.min())
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    weights = np.zeros((len(offsets), h, w))
    for i in range(h):
        for j in range(w):
            neighbours = np.array([image[:, min(max(i + dy, 0), h - 1), min(max(j + dx, 0), w - 1)] for dy, dx in offsets])  # (P, 3)
            spread = neighbours.std(axis=0, ddof=1) + 1e-3  # (3,)
            logits = -(np.abs(neighbours - image[:, i, j]) / (scale * spread)).mean(axis=1)  # (P,)
            e = np.exp(logits - logits.max())
            weights[:, i, j] = e / e.sum()
    for _ in range(iterations):
        new = np.zeros_like(m)
        for i in range(h):
            for j in range(w):
                new[i, j] = sum(weights[p, i, j] * m[min(max(i + dy, 0), h - 1), min(max(j + dx, 0), w - 1)]
                                for p, (dy, dx) in enumerate(offsets))
        m = new
    return m


def test_refinement_matches_the_per_pixel_oracle():
    rng = np.random.default_rng(0)
    image = rng.uniform(size=(3, 13, 17))
    grid_map = rng.uniform(size=(3, 4))
    got = refine_maps(torch.from_numpy(grid_map)[None].float(), torch.from_numpy(image)[None].float(), torch.tensor([0]),
                      iterations=3, dilations=(1, 3))[0].double().numpy()
    want = refine_oracle(grid_map, image, 3, (1, 3))
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_each_phrase_is_refined_with_its_own_image():
    rng = np.random.default_rng(1)
    images = torch.from_numpy(rng.uniform(size=(2, 3, 9, 11))).float()
    maps = torch.from_numpy(rng.uniform(size=(3, 3, 3))).float()
    both = refine_maps(maps, images, torch.tensor([1, 0, 1]), iterations=2, dilations=(1, 2))
    for t, image in enumerate([1, 0, 1]):
        alone = refine_maps(maps[t:t + 1], images[image:image + 1], torch.tensor([0]), iterations=2, dilations=(1, 2))
        torch.testing.assert_close(both[t], alone[0])


def test_refined_mask_follows_the_edges_of_the_object():
    """A coarse blob over a sharp square: the refined mask fits the square better than the upsampled blob."""
    size, cell = 64, 16
    image = torch.full((3, size, size), 0.45)
    image[:, 20:44, 12:30] = torch.tensor([0.85, 0.15, 0.1])[:, None, None]  # a red rectangle
    image += torch.from_numpy(np.random.default_rng(2).normal(0, 0.02, size=image.shape)).float()
    truth = torch.zeros(size, size, dtype=torch.bool)
    truth[20:44, 12:30] = True
    # the token-grid response: each cell's share of the rectangle, plus noise (what slot maps look like)
    grid = F.avg_pool2d(truth[None, None].float(), cell)[0, 0] + 0.15 * torch.rand(size // cell, size // cell, generator=torch.Generator().manual_seed(3))

    def iou(mask):
        return (mask & truth).sum().item() / (mask | truth).sum().item()

    plain = threshold_maps(F.interpolate(grid[None, None], size=(size, size), mode="bilinear", align_corners=False)[0])[0]
    refined = threshold_maps(refine_maps(grid[None], image[None], torch.tensor([0])))[0]
    assert iou(refined) > iou(plain) + 0.1, (iou(plain), iou(refined))
    assert iou(refined) > 0.8
