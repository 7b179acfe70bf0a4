"""Steering by heads: per-head, per-token factors on text-key attention maps, and the HRV recipes on them.

`HeadScale` multiplies the post-softmax map of chosen key tokens in each head by a factor, over a
step window, on the conditional rows only by default (the unconditional branch of classifier-free
guidance is untouched). Its factors do not depend on the pixel, so they run as value scaling inside
fused attention (`Hook.value_factors`): sum_k p[q,k] * (w[k] v[k]) == sum_k (w[k] p[q,k]) v[k], no
probabilities are materialised and nothing is renormalised, exactly as the HRV paper scales maps.

Recipes (HRV: Park et al., ICLR 2025; a vector has one value per head, mean 1 over heads):

    strengthening   token map in head h  x  1 + s * (HRV_c[h] - 1)
                    s = 1 is the paper's  x HRV_c[h];  s = 0 is the identity;  s > 1 goes further.
    adjusting       token map in head h  x  a * HRV_desired[h] - b * HRV_undesired[h]
                    (paper: a = 2, b = 1; polysemy correction, e.g. "rose" +color -shape). With
                    `clamp=c` both vectors are clipped at c first (the paper clips SDXL's HRVs at 9).
                    Factors may be negative: the paper does not clip them, neither do we.

Joint attention (SD3, Flux): the factors scale the image queries' maps of the text keys (text queries
and the text stream untouched, in double- and single-stream blocks; see `headscope.joint`). A word's
key positions come from every text encoder whose tokens are keys (SD3: its CLIP positions and, after
them, its T5 positions; Flux: T5), unless `encoders=` names some.

Use the hooks inside any trace (`trace(pipe, hooks=[hook])`), or the one-call helpers `strengthen` /
`adjust`, which run `pipe` inside `steering(pipe, hooks)` — a trace without the built-in map reader
(`maps=False`), so that no map is materialised at all.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from headscope.errors import HeadscopeError
from headscope.heads import HeadIndex
from headscope.processor import ROW_KINDS, Hook, HookContext
from headscope.steps import StepWindow
from headscope.tokens import Tokenization

DEFAULT_A, DEFAULT_B = 2.0, 1.0


@dataclass(frozen=True)
class TokenFactors:
    """Factors for one token span: key `positions` (0 = start token), one factor per flat head id.

    factors: [n_heads] in HeadIndex order. prompt: index of the prompt in the batch it applies to,
    None for every prompt.
    """

    positions: tuple[int, ...]
    factors: torch.Tensor
    prompt: int | None = None


class HeadScale(Hook):
    """Writer: post-softmax map of token t in head h  x  factors[h], inside a step window.

    Args:
        entries: `TokenFactors` (several entries on one token multiply).
        steps: step window (see `headscope.steps`): None = every step, (start, end) fractions...
        rows: rows to steer: "cond" (default: the prompt rows), "uncond" or "all".

    Runs as value scaling (`value_factors`): the processor never materialises probabilities for it.
    """

    def __init__(self, entries: Iterable[TokenFactors], *, steps=None, rows: str = "cond"):
        if rows not in ROW_KINDS:
            raise HeadscopeError(f"rows={rows!r}; use one of {', '.join(ROW_KINDS)}")
        self.entries = [TokenFactors(tuple(int(p) for p in entry.positions),
                                     torch.as_tensor(entry.factors, dtype=torch.float32).flatten(), entry.prompt)
                        for entry in entries]
        lengths = {len(entry.factors) for entry in self.entries}
        if len(lengths) > 1:
            raise HeadscopeError(f"factor vectors of different lengths {sorted(lengths)}; give one per head")
        self.n_heads = lengths.pop() if lengths else None
        self.window = StepWindow.parse(steps)
        self.rows = rows
        self._window_steps: dict[int, frozenset[int]] = {}
        self._tables: dict[tuple, torch.Tensor] = {}

    @classmethod
    def for_words(cls, pipe, prompt, factors: Mapping[str, torch.Tensor], *, steps=None, rows: str = "cond",
                  encoders=None) -> "HeadScale":
        """HeadScale from words: {word: factors [n_heads]} for every occurrence in each prompt.

        `encoders`: whose tokens of the word are scaled ("clip", "t5"); default every encoder whose
        tokens are keys of `pipe` (`key_encoders`). Raises HeadscopeError for a word missing from a
        prompt or vectors of the wrong length.
        """
        index = HeadIndex.from_model(pipe)
        vectors = {}
        for word, vector in factors.items():
            vectors[word] = torch.as_tensor(vector, dtype=torch.float32).flatten()
            if len(vectors[word]) != index.n_heads:
                raise HeadscopeError(f"factors for {word!r} have {len(vectors[word])} values; this model has "
                                     f"{index.n_heads} {index.noun} heads")
        entries = []
        for encoder in key_encoders(pipe) if encoders is None else encoders:
            for prompt_index, tokenization in enumerate(tokenize_prompts(pipe, prompt, encoder)):
                for word, vector in vectors.items():
                    for positions in word_occurrences(tokenization, word):
                        entries.append(TokenFactors(tuple(positions), vector, prompt_index))
        return cls(entries, steps=steps, rows=rows)

    def value_factors(self, ctx: HookContext) -> torch.Tensor | None:
        """[batch, heads, keys] factors for this layer, ones on rows that are not steered; None outside the window."""
        if not self.entries or not self._in_window(ctx):
            return None
        cache_key = (ctx.layer.index, ctx.layer.offset, ctx.layer.heads, ctx.layout, ctx.n_keys, len(ctx.rows))
        if cache_key not in self._tables:
            self._tables[cache_key] = self._table(ctx)
        return self._tables[cache_key]

    def _in_window(self, ctx: HookContext) -> bool:
        if self.window.spec is None:
            return True
        if ctx.n_steps is None:
            raise HeadscopeError("a steering step window needs the number of denoising steps, and the "
                                 "pipeline does not report it; steer without a window")
        if ctx.n_steps not in self._window_steps:
            self._window_steps[ctx.n_steps] = frozenset(self.window.resolve(ctx.n_steps))
        return ctx.step in self._window_steps[ctx.n_steps]

    def _table(self, ctx: HookContext) -> torch.Tensor:
        layer, n_keys = ctx.layer, ctx.n_keys
        if self.n_heads is not None and layer.offset + layer.heads > self.n_heads:
            raise HeadscopeError(f"steering factors cover {self.n_heads} heads but layer {layer.name} has heads "
                                 f"{layer.offset}..{layer.offset + layer.heads - 1}; use vectors of this model")
        table = torch.ones(len(ctx.rows), layer.heads, n_keys)  # [rows, heads, keys]
        steered = set(ctx.layout.rows(self.rows))
        for row in ctx.rows:
            if row not in steered:
                continue
            prompt = ctx.layout.prompt_index(ctx.layout.image(row))
            for entry in self.entries:
                if entry.prompt is not None and entry.prompt != prompt:
                    continue
                if max(entry.positions) >= n_keys:
                    raise HeadscopeError(f"token position {max(entry.positions)} is beyond the {n_keys} text "
                                         f"tokens of layer {layer.name}")
                head_factors = entry.factors[layer.offset:layer.offset + layer.heads]  # [heads]
                table[row][:, list(entry.positions)] *= head_factors[:, None]
        return table


# -- factor formulas ------------------------------------------------------------------------------

def strengthen_factors(hrv_vector: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """1 + scale * (HRV_c - 1): [n_heads]. scale = 1 gives the paper's factors HRV_c exactly."""
    vector = torch.as_tensor(hrv_vector, dtype=torch.float32)
    if scale == 1.0:
        return vector.clone()
    return 1.0 + float(scale) * (vector - 1.0)


def adjust_factors(desired: torch.Tensor, undesired: torch.Tensor, a: float = DEFAULT_A, b: float = DEFAULT_B,
                   clamp: float | None = None) -> torch.Tensor:
    """a * HRV_desired - b * HRV_undesired: [n_heads]; with `clamp`, both vectors clipped at it first."""
    desired = torch.as_tensor(desired, dtype=torch.float32)
    undesired = torch.as_tensor(undesired, dtype=torch.float32)
    if clamp is not None:
        desired, undesired = desired.clamp(max=clamp), undesired.clamp(max=clamp)
    return float(a) * desired - float(b) * undesired


# -- hook builders --------------------------------------------------------------------------------

def strengthen_hook(pipe, prompt, targets: Mapping, *, hrv=None, steps=None, rows: str = "cond") -> HeadScale:
    """HeadScale strengthening each target word by its concept's HRV.

    Args:
        targets: {word: concept} or {word: (concept, scale)}; scale 1 (default) = the paper.
        hrv: an HRV, a path to an HRV file, or None for `HRV.for_pipeline(pipe)`.
        steps, rows: as for HeadScale.
    """
    hrv = resolve_hrv(pipe, hrv)
    factors = {}
    for word, target in targets.items():
        concept, scale = (target, 1.0) if isinstance(target, str) else target
        factors[word] = strengthen_factors(hrv.vector(concept), scale)
    return HeadScale.for_words(pipe, prompt, factors, steps=steps, rows=rows)


def adjust_hook(pipe, prompt, targets: Mapping, *, hrv=None, a: float = DEFAULT_A, b: float = DEFAULT_B,
                clamp: float | None = None, steps=None, rows: str = "cond") -> HeadScale:
    """HeadScale adjusting each target word towards one concept and away from another.

    Args:
        targets: {word: (desired, undesired)} or {word: (desired, undesired, a, b)} (per-word a, b).
        a, b, clamp: defaults of the formula (see the module docstring).
    """
    hrv = resolve_hrv(pipe, hrv)
    factors = {}
    for word, target in targets.items():
        if len(target) not in (2, 4):
            raise HeadscopeError(f"adjust target for {word!r} must be (desired, undesired) or "
                                 f"(desired, undesired, a, b), got {target!r}")
        desired, undesired = target[:2]
        word_a, word_b = target[2:] if len(target) == 4 else (a, b)
        factors[word] = adjust_factors(hrv.vector(desired), hrv.vector(undesired), word_a, word_b, clamp)
    return HeadScale.for_words(pipe, prompt, factors, steps=steps, rows=rows)


# -- one-call helpers -----------------------------------------------------------------------------

@contextmanager
def steering(pipe, hooks):
    """A trace that only steers: no built-in map reader, so no map is materialised unless a hook asks.

    Yields the Trace (it has no word maps). Use `trace(pipe, hooks=...)` to record and steer.
    """
    from headscope.trace import trace

    with trace(pipe, hooks=list(hooks), maps=False) as tc:
        yield tc


def strengthen(pipe, prompt, targets: Mapping, *, hrv=None, steps=None, **pipe_kwargs):
    """Run `pipe(prompt, **pipe_kwargs)` with the target words strengthened; returns the pipeline output.

    Example: `strengthen(pipe, "a red circle", {"red": ("color", 1.0)}, generator=g).images[0]`.
    """
    hook = strengthen_hook(pipe, prompt, targets, hrv=hrv, steps=steps)
    with steering(pipe, [hook]):
        return pipe(prompt, **pipe_kwargs)


def adjust(pipe, prompt, targets: Mapping, *, hrv=None, a: float = DEFAULT_A, b: float = DEFAULT_B,
           clamp: float | None = None, steps=None, **pipe_kwargs):
    """Run `pipe(prompt, ...)` with concept adjusting, e.g. {"rose": ("color", "shape")}; returns the output."""
    hook = adjust_hook(pipe, prompt, targets, hrv=hrv, a=a, b=b, clamp=clamp, steps=steps)
    with steering(pipe, [hook]):
        return pipe(prompt, **pipe_kwargs)


# -- helpers shared with editing and neglect ------------------------------------------------------

def resolve_hrv(pipe, hrv):
    """An HRV object checked against `pipe`'s head index: given, loaded from a path, or the pipeline's default."""
    if hrv is None or isinstance(hrv, str) or hasattr(hrv, "__fspath__"):
        from headscope.hrv import HRV

        hrv = HRV.for_pipeline(pipe) if hrv is None else HRV.load(hrv)
    hrv.check_compatible(HeadIndex.from_model(pipe))
    return hrv


def max_length(pipe) -> int:
    """Token limit of the pipeline's text encoder (start/end tokens included)."""
    limit = pipe.tokenizer.model_max_length
    positions = getattr(getattr(getattr(pipe, "text_encoder", None), "config", None), "max_position_embeddings", None)
    return min(limit, positions) if positions else limit


def tokenize_prompts(pipe, prompt, encoder: str | None = None) -> list[Tokenization]:
    """One tokenization per prompt (a str or a list of str) through `encoder`'s tokenizer (default: the
    family's), its word positions counted among the text keys (`headscope.prompts.prompt_tokens`)."""
    from headscope.prompts import prompt_tokens

    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise HeadscopeError("no prompt given")
    return [prompt_tokens(pipe, text, encoder) for text in prompts]


def key_encoders(pipe) -> list[str]:
    """The text encoders whose tokens are keys of `pipe`'s attention and which the pipeline has:
    ["clip"] (UNet), ["clip", "t5"] (SD3; ["clip"] without T5), ["t5"] (Flux)."""
    from headscope.backbones import backbone_for

    backbone = backbone_for(pipe)
    present = {slot.encoder for slot in backbone.text_slots(pipe, {})
               if slot.keys and getattr(pipe, slot.text_encoder, None) is not None}
    return [encoder for encoder in backbone.encoders if encoder in present]


def word_occurrences(tokenization: Tokenization, word: str) -> list[list[int]]:
    """Token positions of every occurrence of `word`; HeadscopeError when it is not in the prompt."""
    found = [tokenization.positions(word, 0)]
    while True:
        try:
            found.append(tokenization.positions(word, len(found)))
        except HeadscopeError:
            return found
