"""Concept maps in output space (ConceptAttention, Helbling et al., ICML 2025) on SD3 and Flux.

    with headscope.trace(pipe, concepts=["circle", "square", "background"]) as tc:
        pipe("a red circle and a blue square")
    maps = tc.concept_maps()                 # [concepts, H, W]

The concepts are carried through every joint block during generation (`headscope.stream`). In each
block the saliency of concept c at image token x is

    softmax over the concepts c' of  < o_x , o_c' >

where o_x is the image token's attention output and o_c the concept's, both *before* the output
projection: there the two live in one space, per head a mixture of the same image value vectors (the
image query mixes image and prompt values, the concept query image and concept values), and the dot
product of the concatenated heads is the sum of the heads' dot products. After it they do not: SD3 and
Flux project image outputs with `to_out` and text (concept) outputs with `to_add_out`, two different
maps, so a dot product there would compare coordinates of two bases. (Flux's single-stream blocks
share one projection, but fold the MLP in with it.) An entry of several tokens is represented by the
mean of its tokens' outputs. The map of a concept is the mean of its saliency over the chosen blocks
and the recorded steps: the softmax is taken per block and step, so each contributes a distribution
over the concepts whatever the scale of its outputs. By default the blocks are the later half of the
joint blocks (SD3's blocks; Flux's double-stream ones), where the paper finds the sharpest maps; any
layer of the index, Flux's single-stream blocks too, can be chosen.

Before upsampling the maps of all traced concepts sum to 1 at every token; at image resolution
(bicubic by default, negatives of the overshoot clamped to 0, or box) nearly so.
"""
from __future__ import annotations

import torch

from headscope.errors import HeadscopeError
from headscope.maps.daam import _check_mode, _upsample
from headscope.processor import HookContext, RunState
from headscope.steps import StepWindow
from headscope.tokens import WORD_PATTERN


def check_concepts(concepts) -> list[str]:
    """The concept list of a trace, validated: at least two distinct single words."""
    example = "e.g. concepts=['circle', 'square', 'background']"
    if isinstance(concepts, str) or not all(isinstance(entry, str) for entry in concepts):
        raise HeadscopeError(f"concepts={concepts!r}: give a list of concept words, {example}")
    entries = [entry.strip() for entry in concepts]
    for entry in entries:
        words = WORD_PATTERN.findall(entry)
        if len(words) != 1 or not any(char.isalnum() for char in entry):
            raise HeadscopeError(f"concept {entry!r}: give one word per concept ({example})")
    folded = [entry.lower() for entry in entries]
    repeated = sorted({entry for entry in folded if folded.count(entry) > 1})
    if repeated:
        raise HeadscopeError(f"concept {repeated[0]!r} is given twice; each concept once")
    if len(entries) < 2:
        raise HeadscopeError(f"concept maps take a softmax over the concepts, which over one concept ({entries}) is 1 "
                             f"everywhere; give at least two, e.g. the object and 'background'")
    return entries


class ConceptMapReducer:
    """Running sums of concept saliency per layer, at the token grid, per image.

    State (reset at each pipeline call):
        sums[layer]: [images, concepts, h, w] float32, summed over recorded steps
        per_step[layer][step]: [images, concepts, h, w], only with keep_steps
        steps: recorded steps
    """

    needs_queries = False  # of the concept stream: outputs are enough

    def __init__(self, spans: list[tuple[int, int]], window: StepWindow = StepWindow(), keep_steps: bool = False):
        self.window = window
        self.keep_steps = keep_steps
        n_tokens = spans[-1][1]
        self._mean = torch.zeros(len(spans), n_tokens)  # [concepts, tokens]: 1/len on an entry's tokens
        for concept, (start, stop) in enumerate(spans):
            self._mean[concept, start:stop] = 1.0 / (stop - start)
        self._window_steps: set[int] | None = None
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[int, torch.Tensor] = {}
        self.per_step: dict[int, dict[int, torch.Tensor]] = {}
        self.steps: list[int] = []

    def start_call(self, state: RunState) -> None:
        self._reset()
        if self.window.spec is not None:
            if state.n_steps is None:
                raise HeadscopeError("this step window needs the number of denoising steps, and the pipeline does "
                                     "not report it; trace without a window")
            self._window_steps = set(self.window.resolve(state.n_steps))

    def read_concepts(self, ctx: HookContext, block) -> None:
        """block: `headscope.stream.ConceptBlock` -> saliency [rows, concepts, h, w] added to sums[layer]."""
        if self._window_steps is not None and ctx.step not in self._window_steps:
            return
        if self._mean.device != block.concept_output.device:
            self._mean = self._mean.to(block.concept_output.device)
        concept_outputs = torch.matmul(self._mean, block.concept_output.float())  # [rows, heads, concepts, d]
        # < o_x, o_c > over the concatenated heads = the sum over heads of each head's dot product
        scores = torch.einsum("rhxd,rhcd->rcx", block.image_output.float(), concept_outputs)
        saliency = scores.softmax(dim=1).unflatten(-1, ctx.query_hw)  # [rows, concepts, h, w]
        if ctx.step not in self.steps:
            self.steps.append(ctx.step)
        images = torch.tensor([ctx.layout.image(row) for row in ctx.rows], device=saliency.device)
        shape = (ctx.layout.n_images, *saliency.shape[1:])
        layer = ctx.layer.index
        self.sums.setdefault(layer, saliency.new_zeros(shape)).index_add_(0, images, saliency)
        if self.keep_steps:
            per_step = self.per_step.setdefault(layer, {})
            per_step.setdefault(ctx.step, saliency.new_zeros(shape)).index_add_(0, images, saliency)


def default_layers(index) -> list[int]:
    """The later half of the joint blocks (SD3 blocks, Flux double-stream blocks): execution indices."""
    joint = [layer for layer in index.layers if layer.kind == "joint"]
    first = (max(layer.block_index for layer in joint) + 1) // 2
    return [layer.index for layer in joint if layer.block_index >= first]


def concept_maps(trace, concepts=None, *, layers=None, steps=None, image: int = 0, upsample: str = "bicubic",
                 size: tuple[int, int] | None = None) -> torch.Tensor:
    """Saliency of each concept: [concepts, H, W] float32 in [0, 1], at image resolution (or `size`).

    Args:
        concepts: which of the traced concepts, in this order (default: all, as traced). The softmax
            always runs over every traced concept.
        layers: blocks to average (execution indices or module names, e.g. "transformer_blocks.3.attn");
            default the later half of the joint blocks.
        steps: step window to average (see `headscope.steps`); needs `trace(..., keep_steps=True)`;
            default every recorded step.
        image: which generated image.
        upsample: "bicubic" or "box"; size: (h, w) to upsample to, default the image size.
    """
    _check_mode(upsample)
    stream = getattr(trace, "concept_stream", None)
    reducer = next((reader for reader in getattr(stream, "readers", ()) if isinstance(reader, ConceptMapReducer)),
                   None)
    if reducer is None:
        raise HeadscopeError("concept maps need the concepts during generation: open the trace with "
                             "headscope.trace(pipe, concepts=['circle', 'square', 'background']) and call the "
                             "pipeline inside it")
    stream.flush()  # a no-op after a call's last step, which hands out every kept block
    layout = trace._require_run()
    if not 0 <= image < layout.n_images:
        raise HeadscopeError(f"image {image} out of range; the run made {layout.n_images} image(s)")
    wanted = _concept_rows(stream.entries, concepts)
    layer_ids = default_layers(trace.index) if layers is None else [trace.index.layer(layer).index
                                                                     for layer in layers]
    if not layer_ids:
        raise HeadscopeError("no layers chosen; give at least one block")
    missing = [trace.index.layers[layer].name for layer in layer_ids if layer not in reducer.sums]
    if missing:
        raise HeadscopeError(f"no concept maps were recorded at {', '.join(missing)} (recorded steps: "
                             f"{reducer.steps or 'none'})")
    chosen = _chosen_steps(trace, reducer, steps)
    total = None
    for layer in layer_ids:
        if chosen is None:
            mean = reducer.sums[layer][image] / len(reducer.steps)
        else:
            mean = torch.stack([reducer.per_step[layer][step][image] for step in chosen]).mean(dim=0)
        total = mean if total is None else total + mean
    maps = (total / len(layer_ids))[wanted]  # [concepts, h, w]
    return _upsample(maps, tuple(size or trace.image_size), upsample)


def _concept_rows(entries: list[str], concepts) -> list[int]:
    if concepts is None:
        return list(range(len(entries)))
    if isinstance(concepts, str):
        concepts = [concepts]
    folded = [entry.lower() for entry in entries]
    rows = []
    for concept in concepts:
        if str(concept).strip().lower() not in folded:
            raise HeadscopeError(f"concept {concept!r} was not carried during generation; this trace carried "
                                 f"{', '.join(entries)} (name every concept in trace(pipe, concepts=[...]))")
        rows.append(folded.index(str(concept).strip().lower()))
    return rows


def _chosen_steps(trace, reducer: ConceptMapReducer, steps) -> list[int] | None:
    """None for every recorded step (the running sums), else the recorded steps to average."""
    if not reducer.steps:
        raise HeadscopeError("no step was recorded; check the trace's step window")
    if steps is None:
        return None
    if not reducer.keep_steps:
        raise HeadscopeError("per-step concept maps were not kept; trace with keep_steps=True to pick steps")
    chosen = StepWindow.parse(steps).resolve(trace.n_steps)
    missing = sorted(set(chosen) - set(reducer.steps))
    if not chosen or missing:
        raise HeadscopeError(f"steps {missing or chosen} were not recorded; recorded: {sorted(reducer.steps)}")
    return chosen
