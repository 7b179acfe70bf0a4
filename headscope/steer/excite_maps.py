"""What Attend-and-Excite reads during its extra passes: subject maps with their graph, other hooks as
writers only, and the map helpers (resizing, Gaussian smoothing)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from headscope.errors import HeadscopeError
from headscope.processor import Hook, HookContext


class _MapCollector(Hook):
    """Sums text-key attention maps with their graph: head mean at one level, or HRV-weighted over all heads."""

    def __init__(self, layers: set[int] | None, size: tuple[int, int], weights: torch.Tensor | None):
        self.layers, self.size, self.weights = layers, size, weights
        self.total, self.norm = None, 0.0

    def wants_probs(self, ctx: HookContext) -> bool:
        return self.layers is None or ctx.layer.index in self.layers

    def read(self, ctx: HookContext, probs: torch.Tensor) -> None:
        """probs: [images, heads, query, keys], grad-enabled."""
        n_images, heads, _, n_keys = probs.shape
        height, width = ctx.query_hw
        maps = probs.view(n_images, heads, height, width, n_keys)
        if self.weights is None:
            self._add(maps.sum(dim=1)[:, None], heads)  # [images, 1, h, w, keys]
            return
        layer_weights = self.weights[:, ctx.layer.offset:ctx.layer.offset + heads].to(probs)  # [subjects, heads]
        resized = _resize(maps.permute(0, 1, 4, 2, 3).flatten(0, 1), self.size)  # [images * heads, keys, H, W]
        resized = resized.view(n_images, heads, n_keys, *self.size)
        self._add(torch.einsum("sh,nhkyx->nsyxk", layer_weights, resized), layer_weights.sum(dim=1))

    def _add(self, weighted_sum: torch.Tensor, norm) -> None:
        self.total = weighted_sum if self.total is None else self.total + weighted_sum
        self.norm = self.norm + norm

    def result(self) -> torch.Tensor:
        """[images, subjects (1 when unweighted), h, w, keys]: the weighted mean maps."""
        if self.total is None:
            raise HeadscopeError("no attention map was collected at the chosen level")
        norm = self.norm if isinstance(self.norm, float) else self.norm[None, :, None, None, None]
        return self.total / norm


class _WriteOnly(Hook):
    """A hook seen through its writer methods only (during Attend-and-Excite's extra passes)."""

    def __init__(self, hook: Hook):
        self.hook, self.rows = hook, hook.rows

    def value_factors(self, ctx):
        return self.hook.value_factors(ctx)

    def edits_probs(self, ctx):
        return self.hook.edits_probs(ctx)

    def edit_probs(self, ctx, probs):
        return self.hook.edit_probs(ctx, probs)

    def self_attention(self, ctx, query, key):
        return self.hook.self_attention(ctx, query, key)


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[n, c, h, w] -> [n, c, H, W]: area average when shrinking, bicubic when growing."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    if maps.shape[-2] >= size[0] and maps.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(maps, size)
    return F.interpolate(maps, size=size, mode="bicubic", align_corners=False)


def _gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """Normalised 2-D Gaussian [1, 1, size, size]."""
    if size < 1 or size % 2 == 0 or sigma <= 0:
        raise HeadscopeError(f"Gaussian smoothing needs an odd kernel size and sigma > 0, got {size}, {sigma}")
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    line = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = line[:, None] * line[None, :]
    return (kernel / kernel.sum())[None, None]
