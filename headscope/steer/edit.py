"""Prompt-to-prompt editing (Hertz et al. 2022) with head-level hooks, and P2P-HRV (Park et al. 2025).

    result = headscope.edit(pipe, "a red circle", "a blue circle", seed=0)
    result.source, result.edited          # images from the same starting noise
    result.source_trace.word_map("red")   # both runs were traced

How an edit runs:
  1. The source prompt is generated inside a trace with two recorders: `CrossRecorder` keeps the
     conditional rows' cross-attention maps of every layer at the steps of the cross window;
     `SelfRecorder` keeps the conditional rows' self-attention queries and keys of the coarse layers
     at the steps of the self window.
  2. The target prompt is generated from the same seed with two injectors. `CrossInjector` replaces
     the target's maps by the source's for key tokens aligned between the prompts (start token, equal
     words, end token and padding; word alignment by difflib over the prompts' words), through a
     [source keys, target keys] mapper as in P2P's `get_replacement_mapper`. The swapped word's
     tokens either take the source word's map (`swapped="source"`, P2P "replace"; a word of another
     token count gets the mean of the source word's tokens) or keep their own (`swapped="own"`, P2P
     "refine" / P2P-HRV). `SelfInjector` makes coarse self-attention layers attend with the source's
     queries and keys: softmax(q_src k_src^T) is exactly the source's self-attention map, applied to
     the target's values in fused SDPA.
  3. P2P-HRV: inside the cross window the swapped tokens' maps are also multiplied by their concept's
     HRV, 1 + strength * (HRV_c[h] - 1) (strength 1: x HRV_c[h], the paper).

Defaults follow the papers: cross maps injected over the first 80% of the steps, self-attention over
the first 40% (P2P; P2P-HRV uses 90%), at self-attention layers of at most latent/4 resolution
(16x16 on SD's 64x64 latents: P2P's `<= 16 ** 2`), conditional rows only.

Memory: injection needs per-step tensors. Only what is injected is kept — conditional rows, steps in
the windows, and for self-attention only the coarse layers' queries and keys (`[heads, n, head_dim]`,
not the `[heads, n, n]` maps). Cross maps are `[cond rows, heads, h*w, keys]` float32 per layer and
step: SD 1.5 at 512 px holds about 66 MB per step and image (the five 64x64 layers are three
quarters of it), so the default 80% of 50 steps keeps about 2.7 GB; its coarse self-attention
queries and keys add about 14 MB per step (0.3 GB over 40% of 50 steps). The embedded shapes model
needs a few MB. `EditResult.stored_bytes` reports what a run kept.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field

import torch

from headscope.backbones import require_unet
from headscope.backbones.unet import self_attention_layers, self_attention_processors
from headscope.errors import HeadscopeError
from headscope.processor import Hook, HookContext
from headscope.steer.scale import resolve_hrv, strengthen_factors, tokenize_prompts
from headscope.steps import StepWindow
from headscope.tokens import Tokenization
from headscope.trace import Trace, trace

SWAPPED_MODES = ("source", "own")
DEFAULT_CROSS, DEFAULT_SELF = 0.8, 0.4
COARSE_LEVEL = 2  # self-attention injected at layers of latent/4 resolution and coarser


@dataclass
class EditResult:
    """Source and edited images (as the pipeline returns them) and the two traces."""

    source: list
    edited: list
    source_trace: Trace
    edited_trace: Trace
    stored_bytes: int = 0
    alignment: "Alignment | None" = None


# -- token alignment ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Alignment:
    """Which target key positions take which source key positions' maps.

    pairs: (source positions, target positions) of aligned spans (start token, equal words, swapped
        words when they take the source's map); end token and padding are aligned from the end token on.
    edited: target positions of words that are not in the source (swapped, inserted).
    """

    source_end: int
    target_end: int
    pairs: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    edited: tuple[int, ...]
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    def mapper(self, n_source: int, n_target: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mapper [n_source, n_target] float32, own [n_target] bool: target keys keeping their own map)."""
        if (n_source, n_target) not in self._cache:
            mapper = torch.zeros(n_source, n_target)
            own = torch.ones(n_target, dtype=torch.bool)
            for source, target in self.pairs:
                for column, target_position in enumerate(target):
                    if len(source) == len(target):
                        mapper[source[column], target_position] = 1.0
                    else:
                        mapper[list(source), target_position] = 1.0 / len(source)
                    own[target_position] = False
            for target_position in range(self.target_end, n_target):
                source_position = self.source_end + target_position - self.target_end
                if source_position < n_source:
                    mapper[source_position, target_position] = 1.0
                    own[target_position] = False
            self._cache[(n_source, n_target)] = (mapper, own)
        return self._cache[(n_source, n_target)]


def align(source: Tokenization, target: Tokenization, swapped: str = "source") -> Alignment:
    """Align two prompts word by word (difflib); see `Alignment`."""
    if swapped not in SWAPPED_MODES:
        raise HeadscopeError(f"swapped={swapped!r}; use one of {', '.join(SWAPPED_MODES)}")
    source_words = [word.text.lower() for word in source.words]
    target_words = [word.text.lower() for word in target.words]
    pairs = [((0,), (0,))]
    edited: list[int] = []
    matcher = difflib.SequenceMatcher(a=source_words, b=target_words, autojunk=False)
    for tag, s_start, s_end, t_start, t_end in matcher.get_opcodes():
        for offset in range(t_end - t_start):
            target_word = target.words[t_start + offset]
            if tag == "equal" or (tag == "replace" and swapped == "source" and s_end - s_start == t_end - t_start):
                pairs.append((source.words[s_start + offset].positions, target_word.positions))
            if tag != "equal":
                edited.extend(target_word.positions)
    return Alignment(source_end=len(source) - 1, target_end=len(target) - 1,
                     pairs=tuple((tuple(s), tuple(t)) for s, t in pairs if s and t), edited=tuple(edited))


# -- hooks ----------------------------------------------------------------------------------------

class _Windowed(Hook):
    """A hook active at the steps of one window (resolved per run length)."""

    def __init__(self, window: StepWindow | None):
        self.window = window
        self._resolved: dict[int, frozenset[int]] = {}

    def active(self, ctx: HookContext) -> bool:
        if self.window is None:
            return False
        if ctx.n_steps not in self._resolved:
            if ctx.n_steps is None:
                raise HeadscopeError("editing needs the number of denoising steps, and the pipeline does not "
                                     "report it")
            self._resolved[ctx.n_steps] = frozenset(self.window.resolve(ctx.n_steps))
        return ctx.step in self._resolved[ctx.n_steps]


class CrossRecorder(_Windowed):
    """Keeps conditional cross-attention maps [cond rows, heads, query, keys] per (step, layer) in the window."""

    def __init__(self, window: StepWindow | None):
        super().__init__(window)
        self.maps: dict[tuple[int, int], torch.Tensor] = {}

    def wants_probs(self, ctx: HookContext) -> bool:
        return self.active(ctx)

    def read(self, ctx: HookContext, probs: torch.Tensor) -> None:
        self.maps[(ctx.step, ctx.layer.index)] = probs.detach().clone()


class SelfRecorder(_Windowed):
    """Keeps conditional self-attention queries and keys per (step, layer) at layers of level >= min_level."""

    def __init__(self, window: StepWindow | None, min_level: int):
        super().__init__(window)
        self.min_level = min_level
        self.qk: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def self_attention(self, ctx, query, key):
        if ctx.layer.level >= self.min_level and self.active(ctx):
            rows = list(ctx.layout.rows("cond"))
            self.qk[(ctx.step, ctx.layer.index)] = (query[rows].detach().clone(), key[rows].detach().clone())
        return None


class CrossInjector(_Windowed):
    """Replaces aligned target maps by the source's (conditional rows, cross window); P2P-HRV factors."""

    def __init__(self, recorder: CrossRecorder, alignment: Alignment, hrv_factors: torch.Tensor | None = None):
        super().__init__(recorder.window)
        self.recorder, self.alignment, self.hrv_factors = recorder, alignment, hrv_factors

    def edits_probs(self, ctx: HookContext) -> bool:
        return self.active(ctx)

    def edit_probs(self, ctx: HookContext, probs: torch.Tensor) -> torch.Tensor:
        source = self.recorder.maps.get((ctx.step, ctx.layer.index))  # [cond, heads, query, source keys]
        rows = list(ctx.layout.rows("cond"))
        if source is None or source.shape[0] != len(rows) or source.shape[2] != probs.shape[2]:
            raise HeadscopeError(f"no matching source map at step {ctx.step}, layer {ctx.layer.name}: the source "
                                 "and target runs must use the same steps, size and images per prompt")
        mapper, own = self.alignment.mapper(source.shape[-1], probs.shape[-1])
        mapped = torch.einsum("bhqs,st->bhqt", source, mapper.to(source.device))
        target = probs[rows]
        injected = torch.where(own.to(probs.device), target, mapped)
        if self.hrv_factors is not None and self.alignment.edited:
            edited = list(self.alignment.edited)
            layer_factors = self.hrv_factors[ctx.layer.offset:ctx.layer.offset + ctx.layer.heads].to(probs.device)
            injected[..., edited] = injected[..., edited] * layer_factors[None, :, None, None]
        probs = probs.clone()
        probs[rows] = injected
        return probs


class SelfInjector(_Windowed):
    """Conditional rows of coarse self-attention layers attend with the source's queries and keys."""

    def __init__(self, recorder: SelfRecorder):
        super().__init__(recorder.window)
        self.recorder = recorder

    def self_attention(self, ctx, query, key):
        if ctx.layer.level < self.recorder.min_level or not self.active(ctx):
            return None
        stored = self.recorder.qk.get((ctx.step, ctx.layer.index))
        rows = list(ctx.layout.rows("cond"))
        if stored is None or stored[0].shape != query[rows].shape:
            raise HeadscopeError(f"no matching source self-attention at step {ctx.step}, layer {ctx.layer.name}: "
                                 "the source and target runs must use the same settings")
        query, key = query.clone(), key.clone()
        query[rows], key[rows] = stored
        return query, key


# -- the editor -----------------------------------------------------------------------------------

class Editor:
    """Prompt-to-prompt word swaps on one pipeline (see the module docstring).

    Args:
        pipe: a diffusers SD 1.x / 2.x / XL pipeline.
        cross_steps: cross-attention injection window: a fraction f of the run (steps from 0 to f),
            (start, end) fractions, or 0 for none.
        self_steps: self-attention injection window, same forms.
        self_min_level: inject self-attention at layers of this downsampling level and coarser; default
            2 (latent/4), or the coarsest self-attention level when the UNet is shallower.
        swapped: "source" (swapped word takes the source word's map, P2P replace) or "own"; default
            "own" with an HRV concept (as the P2P-HRV code), else "source".
        concept: P2P-HRV: the concept of the swapped word (e.g. "color"); None for plain P2P.
        hrv: HRV, HRV file path or None for `HRV.for_pipeline(pipe)` (used only with `concept`).
        strength: P2P-HRV factor 1 + strength * (HRV_c - 1); 1 is the paper.
    """

    def __init__(self, pipe, *, cross_steps=DEFAULT_CROSS, self_steps=DEFAULT_SELF, self_min_level: int | None = None,
                 swapped: str | None = None, concept: str | None = None, hrv=None, strength: float = 1.0):
        require_unet(pipe, "prompt-to-prompt edits")
        self.pipe = pipe
        self.cross_window = _window(cross_steps, "cross_steps")
        self.self_window = _window(self_steps, "self_steps")
        self.swapped = swapped or ("own" if concept else "source")
        if self.swapped not in SWAPPED_MODES:
            raise HeadscopeError(f"swapped={self.swapped!r}; use one of {', '.join(SWAPPED_MODES)}")
        levels = [layer.level for layer in self_attention_layers(pipe.unet)]
        coarse = min(COARSE_LEVEL, max(levels, default=0))
        self.self_min_level = coarse if self_min_level is None else self_min_level
        self.hrv_factors = None
        if concept is not None:
            self.hrv_factors = strengthen_factors(resolve_hrv(pipe, hrv).vector(concept), strength)

    def __call__(self, source_prompt: str, target_prompt: str, *, seed: int = 0, hooks=(), **pipe_kwargs) -> EditResult:
        """Generate `source_prompt`, then `target_prompt` with the source's attention injected.

        `hooks` are added to both traces (readers, steering); `pipe_kwargs` go to both pipeline calls
        (`num_inference_steps`, `guidance_scale`, `num_images_per_prompt`, `latents`...).
        """
        if not isinstance(source_prompt, str) or not isinstance(target_prompt, str):
            raise HeadscopeError("edit takes one source prompt and one target prompt (str)")
        source_tokens, target_tokens = tokenize_prompts(self.pipe, [source_prompt, target_prompt])
        alignment = align(source_tokens, target_tokens, self.swapped)
        cross = CrossRecorder(self.cross_window)
        selfs = SelfRecorder(self.self_window, self.self_min_level)
        source, source_trace = self._run(source_prompt, [cross, selfs, *hooks], seed, pipe_kwargs)
        injectors = [CrossInjector(cross, alignment, self.hrv_factors), SelfInjector(selfs)]
        edited, edited_trace = self._run(target_prompt, [*injectors, *hooks], seed, pipe_kwargs)
        stored = sum(t.numel() * t.element_size() for t in cross.maps.values()) + sum(
            t.numel() * t.element_size() for pair in selfs.qk.values() for t in pair)
        return EditResult(source=source, edited=edited, source_trace=source_trace, edited_trace=edited_trace,
                          stored_bytes=stored, alignment=alignment)

    def _run(self, prompt: str, hooks, seed: int, pipe_kwargs: dict):
        call = dict(pipe_kwargs)
        if "latents" not in call:
            call["generator"] = torch.Generator("cpu").manual_seed(seed)
        with trace(self.pipe, hooks=hooks) as tc, self_attention_processors(self.pipe.unet, tc.hooks):
            images = self.pipe(prompt, **call).images
        return images, tc


def edit(pipe, source_prompt: str, target_prompt: str, *, seed: int = 0, cross_steps=DEFAULT_CROSS,
         self_steps=DEFAULT_SELF, self_min_level: int | None = None, swapped: str | None = None,
         concept: str | None = None, hrv=None, strength: float = 1.0, hooks=(), **pipe_kwargs) -> EditResult:
    """One prompt-to-prompt edit; P2P-HRV when `concept` is given. See `Editor` for the options."""
    editor = Editor(pipe, cross_steps=cross_steps, self_steps=self_steps, self_min_level=self_min_level,
                    swapped=swapped, concept=concept, hrv=hrv, strength=strength)
    return editor(source_prompt, target_prompt, seed=seed, hooks=hooks, **pipe_kwargs)


def _window(spec, name: str) -> StepWindow | None:
    """A fraction f -> (0, f); 0 -> None (no injection); anything else as `StepWindow.parse`."""
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        if not 0.0 <= spec <= 1.0:
            raise HeadscopeError(f"{name}={spec} must be a fraction of the run in [0, 1]")
        return None if spec == 0 else StepWindow.parse((0.0, float(spec)))
    return StepWindow.parse(spec)
