"""Word heat maps (DAAM, Tang et al. 2022): aggregate, upsample, normalise, threshold.

The built-in reader `HeatMapReducer` sums attention probabilities online, per layer, head and key
token, at each layer's native resolution and separately for every image. A word's map is then

    word_map = sum over layers, heads of  upsample( mean over the word's tokens, mean over steps
                                                   of the head's attention map )

with each head's map upsampled to the image size on its own (bicubic, negatives from the bicubic
overshoot clamped to 0, as in DAAM; or "box": every latent cell's value fills its block unchanged).
DAAM sums over time; we divide by the number of steps so values do not grow with the step count —
after `normalize` the two are the same map.

Joint attention (SD3, Flux) works the same: the reader gets each head's image-query x text-key block
(normalised over all keys, as the model normalises it; `normalize="text"` renormalises it over the text
keys), at the layer's token grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from headscope.errors import HeadscopeError
from headscope.joint import renormalised_over_text
from headscope.maps import select
from headscope.processor import Hook, HookContext, RunState
from headscope.steps import StepWindow

UPSAMPLE_MODES = ("bicubic", "box")


class HeatMapReducer(Hook):
    """Running sums of attention maps per image, layer, head and key token, at native resolution.

    State (reset at each pipeline call):
        sums[kind][layer] : [images, heads, keys, h, w] float32, summed over recorded steps
        per_step[kind][layer][step] : [images, heads, keys, h, w], only with keep_steps
        kind_steps[kind] : the steps recorded for each kind (`steps`: all of them)
    `kind` is "cond" or "uncond"; `keys` stops at `key_limit` (the longest prompt's end token) when
    the trace knows the prompt text. Memory is independent of the step count unless keep_steps.
    `normalize="text"` divides each query's text-key weights by their sum first (joint attention: the
    text share of a softmax over image and text keys; a no-op for cross-attention).
    """

    def __init__(self, rows: str = "cond", window: StepWindow = StepWindow(), keep_steps: bool = False,
                 normalize: str = "model"):
        self.rows = rows
        self.window = window
        self.keep_steps = keep_steps
        self.normalize = normalize
        self.key_limit: int | None = None
        self._window_steps: set[int] | None = None
        self._reset()

    def start_call(self, state: RunState) -> None:
        self._reset()
        if self.window.spec is not None:
            if state.n_steps is None:
                raise HeadscopeError("this step window needs the number of denoising steps, and the "
                                     "pipeline does not report it; trace without a window")
            self._window_steps = set(self.window.resolve(state.n_steps))

    def _reset(self) -> None:
        self.sums: dict[str, dict[int, torch.Tensor]] = {"cond": {}, "uncond": {}}
        self.per_step: dict[str, dict[int, dict[int, torch.Tensor]]] = {"cond": {}, "uncond": {}}
        self.kind_steps: dict[str, list[int]] = {"cond": [], "uncond": []}

    @property
    def steps(self) -> list[int]:
        """Recorded step indices, ascending."""
        return sorted(set(self.kind_steps["cond"]) | set(self.kind_steps["uncond"]))

    def wants_probs(self, ctx: HookContext) -> bool:
        return self._window_steps is None or ctx.step in self._window_steps

    def read(self, ctx: HookContext, probs: torch.Tensor) -> None:
        """probs: [rows, heads, query, key] -> added to sums[kind][layer][images]."""
        probs = probs.detach()
        if self.normalize == "text":
            probs = renormalised_over_text(probs.float())
        probs = probs[..., :self.key_limit]
        n_rows, heads, _, n_keys = probs.shape
        height, width = ctx.query_hw
        maps = probs.transpose(-1, -2).reshape(n_rows, heads, n_keys, height, width)  # [rows, heads, keys, h, w]
        for kind in ("uncond", "cond"):
            picked = [position for position, row in enumerate(ctx.rows) if ctx.layout.kind(row) == kind]
            if not picked:
                continue
            if ctx.step not in self.kind_steps[kind]:
                self.kind_steps[kind].append(ctx.step)
            images = torch.tensor([ctx.layout.image(ctx.rows[position]) for position in picked], device=maps.device)
            self._add(kind, ctx, images, (maps if len(picked) == n_rows else maps[picked]).float())

    def _add(self, kind: str, ctx: HookContext, images: torch.Tensor, maps: torch.Tensor) -> None:
        """maps: [len(images), heads, keys, h, w] for the given image indices."""
        shape = (ctx.layout.n_images, *maps.shape[1:])
        layer = ctx.layer.index
        if layer not in self.sums[kind]:
            self.sums[kind][layer] = maps.new_zeros(shape)
        self.sums[kind][layer].index_add_(0, images, maps)
        if self.keep_steps:
            step_maps = self.per_step[kind].setdefault(layer, {})
            step_maps.setdefault(ctx.step, maps.new_zeros(shape)).index_add_(0, images, maps)

    def layer_maps(self, kind: str, layer: int, image: int, positions: list[int],
                   steps: list[int] | None = None) -> torch.Tensor:
        """Mean over token `positions` and over steps of one layer's maps: [heads, h, w]."""
        if layer not in self.sums[kind]:
            raise HeadscopeError(f"no {kind} maps were recorded (rows={self.rows!r}, recorded steps "
                                 f"{self.steps or 'none'})")
        if steps is None:
            total = self.sums[kind][layer][image, :, positions]  # [heads, tokens, h, w]
            return total.mean(dim=1) / len(self.kind_steps[kind])
        per_step = self.per_step[kind][layer]
        chosen = torch.stack([per_step[step][image, :, positions] for step in steps])  # [steps, heads, tokens, h, w]
        return chosen.mean(dim=(0, 2))


# -- reading maps from a trace ----------------------------------------------------------------

def word_map(trace, word: str, *, occurrence: int = 0, layers=None, heads=None, steps=None,
             image: int = 0, rows: str = "cond", upsample: str = "bicubic", method: str = "daam",
             weights=None, hrv=None, concept: str | None = None, k: int | None = None,
             min_relevance: float | None = None, encoder: str | None = None) -> torch.Tensor:
    """Heat map of `word` for one image: [H, W] at image resolution, float32, >= 0.

    Args:
        word: a word of the prompt (case-insensitive; several words match consecutive prompt words).
        occurrence: which occurrence when the word repeats, from 0.
        layers: layers to sum (execution indices or module names); default all.
        heads: flat head ids to sum; default all heads of the chosen layers.
        method: "daam" (sum of all heads), "selective" (the HRV's most relevant heads for the word's
            concept: top `k`, or relevance >= `min_relevance`, default 1.0) or "weighted" (every head
            times its relevance); see `headscope.maps.select`.
        weights: [n_heads] non-negative weights of the heads (method "daam" only).
        hrv, concept: the HRV (default: the model's own) and the concept (default: looked up from the
            word in the HRV's concept words) of "selective" and "weighted".
        steps: step window (see `headscope.steps`); needs `trace(..., keep_steps=True)`.
        image: which generated image (prompt-major: prompt i // images_per_prompt).
        rows: "cond" (the prompt) or "uncond" (the negative prompt, when it was recorded).
        upsample: "bicubic" (DAAM) or "box".
        encoder: whose tokens of the word to use: "clip" or "t5" (SD3 has both: CLIP by default, T5 when
            traced with encoder="t5"; Flux has T5 only); default the trace's encoder.
    """
    positions = trace.tokenization(image, rows, encoder).positions(word, occurrence)
    head_weights = select.head_weights(trace, word, method=method, hrv=hrv, concept=concept, k=k,
                                       min_relevance=min_relevance, weights=weights, heads=heads)
    return _aggregate(trace, positions, layers=layers, heads=heads if head_weights is None else None, steps=steps,
                      image=image, rows=rows, upsample=upsample, weights=head_weights)


def token_maps(trace, *, layers=None, heads=None, steps=None, image: int = 0, rows: str = "cond",
               upsample: str = "bicubic", encoder: str | None = None) -> torch.Tensor:
    """Heat map of every token of the prompt (start and end tokens included): [tokens, H, W]."""
    positions = trace.tokenization(image, rows, encoder).key_positions()
    return torch.stack([_aggregate(trace, [position], layers=layers, heads=heads, steps=steps, image=image,
                                   rows=rows, upsample=upsample) for position in positions])


def head_maps(trace, word: str, *, occurrence: int = 0, steps=None, image: int = 0, rows: str = "cond",
              size: tuple[int, int] | None = None, upsample: str = "bicubic", method: str = "daam",
              heads=None, weights=None, hrv=None, concept: str | None = None, k: int | None = None,
              min_relevance: float | None = None, encoder: str | None = None) -> torch.Tensor:
    """Per-head maps of `word`: [n_heads, h, w] in flat-id order.

    Each head's map is the mean over the word's tokens and over steps of its attention probabilities
    (values in [0, 1]) at its layer's native resolution, upsampled to a common size: `size`, by
    default the latent size (the finest layer resolution), so no layer is downsampled. With a
    method other than "daam" or with `weights`, each head's map is multiplied by its weight (0 for
    the heads a selective map leaves out), as `word_map` sums them; with `heads`, the other heads' maps are 0.
    """
    _check_mode(upsample)
    positions = trace.tokenization(image, rows, encoder).positions(word, occurrence)
    chosen_steps = _chosen_steps(trace, steps, rows)
    size = tuple(size or trace.index.latent_hw)
    per_layer = [_upsample(trace.reducer.layer_maps(rows, layer.index, image, positions, chosen_steps), size, upsample)
                 for layer in trace.index.layers]
    maps = torch.cat(per_layer)
    head_weights = select.head_weights(trace, word, method=method, hrv=hrv, concept=concept, k=k,
                                       min_relevance=min_relevance, weights=weights, heads=heads)
    if head_weights is None and heads is not None:  # the caller's heads: the other heads' maps are 0
        ids = [int(head) for head in heads]
        for head_id in ids:
            trace.index.unflat(head_id)  # HeadscopeError when out of range
        head_weights = torch.zeros(maps.shape[0])
        head_weights[ids] = 1.0
    return maps if head_weights is None else maps * head_weights.to(maps)[:, None, None]


def normalize(heat_map: torch.Tensor) -> torch.Tensor:
    """Min-max normalise a map to [0, 1] (a constant map becomes zeros). Same shape."""
    low, high = heat_map.min(), heat_map.max()
    if high <= low:
        return torch.zeros_like(heat_map)
    return (heat_map - low) / (high - low)


def threshold(heat_map: torch.Tensor, tau: float = 0.4) -> torch.Tensor:
    """Binary mask (bool, same shape) of pixels whose normalised value is >= tau (DAAM uses 0.4)."""
    if not 0.0 <= tau <= 1.0:
        raise HeadscopeError(f"threshold tau={tau} must lie in [0, 1]")
    return normalize(heat_map) >= tau


# -- internals ------------------------------------------------------------------------------

def _aggregate(trace, positions, *, layers, heads, steps, image, rows, upsample, weights=None) -> torch.Tensor:
    """Sum over the chosen layers and heads of upsampled per-head maps of token `positions`: [H, W].

    weights: [n_heads] or None; with weights, only heads of non-zero weight are read, each map times its weight.
    """
    _check_mode(upsample)
    chosen_steps = _chosen_steps(trace, steps, rows)
    size = trace.image_size
    if weights is not None:
        heads = torch.nonzero(weights).flatten().tolist()
    total = None
    for layer, layer_heads in _chosen_heads(trace.index, layers, heads).items():
        maps = trace.reducer.layer_maps(rows, layer, image, positions, chosen_steps)[layer_heads]  # [heads, h, w]
        if weights is not None:
            head_ids = [trace.index.layers[layer].offset + head for head in layer_heads]
            maps = maps * weights[head_ids].to(maps)[:, None, None]
        layer_sum = _upsample(maps, size, upsample).sum(dim=0)
        total = layer_sum if total is None else total + layer_sum
    return total


def _upsample(maps: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """[n, h, w] -> [n, H, W], one map at a time (bicubic clamped at 0, or box)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    batched = maps[:, None]  # [n, 1, h, w]
    if mode == "bicubic":
        return F.interpolate(batched, size=size, mode="bicubic", align_corners=False).clamp_min(0)[:, 0]
    exact = size[0] % maps.shape[-2] == 0 and size[1] % maps.shape[-1] == 0
    return F.interpolate(batched, size=size, mode="nearest" if exact else "nearest-exact")[:, 0]


def _check_mode(upsample: str) -> None:
    if upsample not in UPSAMPLE_MODES:
        raise HeadscopeError(f"upsample={upsample!r}; use one of {', '.join(UPSAMPLE_MODES)}")


def _chosen_steps(trace, steps, rows: str) -> list[int] | None:
    """None for 'all recorded steps' (running sums), else the per-step maps to average."""
    recorded = trace.reducer.kind_steps[rows]
    if steps is None:
        if not recorded:
            raise HeadscopeError(f"no step was recorded for the {rows} rows; check the trace's rows and "
                                 "step window")
        return None
    if not trace.reducer.keep_steps:
        raise HeadscopeError("per-step maps were not kept; trace with keep_steps=True to pick steps")
    chosen = StepWindow.parse(steps).resolve(trace.n_steps)
    missing = sorted(set(chosen) - set(recorded))
    if not chosen or missing:
        raise HeadscopeError(f"steps {missing or chosen} were not recorded; recorded: {recorded}")
    return chosen


def _chosen_heads(index, layers, heads) -> dict[int, list[int]]:
    """{layer execution index: [head within layer]} for the requested layers and flat head ids."""
    layer_ids = ([index.layer(layer).index for layer in layers] if layers is not None
                 else [layer.index for layer in index.layers])
    chosen = {layer: list(range(index.layers[layer].heads)) for layer in layer_ids}
    if heads is not None:
        wanted: dict[int, list[int]] = {}
        for head_id in heads:
            layer, head = index.unflat(int(head_id))
            if layer in chosen:
                wanted.setdefault(layer, []).append(head)
        chosen = {layer: sorted(set(head_list)) for layer, head_list in sorted(wanted.items())}
    if not chosen:
        raise HeadscopeError("the chosen layers and heads do not overlap; nothing to sum")
    return chosen
