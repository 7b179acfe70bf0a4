"""trace(pipe, ...): record (and steer) cross-attention heads during ordinary pipeline calls.

    with headscope.trace(pipe) as tc:
        image = pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0)).images[0]
    word_map = tc.word_map("circle")            # [H, W] at image resolution

How the trace knows where it is:
  - Processors: every cross-attention module gets a `HeadProcessor` through `unet.set_attn_processor`
    (self-attention keeps its processor); the original processors come back on exit, also on error.
  - Steps: a forward pre-hook on the UNet (`register_forward_pre_hook`) counts UNet forwards. The
    first forward after the pipeline encoded its prompt starts a new call at step 0; the number of
    steps comes from `pipe._num_timesteps` (set by diffusers before its loop), else from
    `len(pipe.scheduler.timesteps)`. No per-layer call counters.
  - Batch layout: the pipeline's `encode_prompt` is wrapped *on the instance* for the duration of the
    trace (Python looks `pipe(...)` up on the class, so `__call__` cannot be wrapped per instance; the
    class itself is never touched). The wrapper records the prompts, negative prompts and
    `num_images_per_prompt`, tokenizes them (refusing prompts longer than the encoder takes), then calls
    the original. At every UNet forward the pre-hook reads the row count from the UNet input and
    classifier-free guidance from `pipe.do_classifier_free_guidance` (so a callback that turns guidance
    off mid-run is followed), and checks the rows against prompts x images per prompt.
"""
from __future__ import annotations

import functools
import inspect

import torch

from headscope.maps import daam
from headscope.errors import HeadscopeError
from headscope.backbones.unet import PLAIN_PROCESSORS
from headscope.heads import HeadIndex
from headscope.processor import ROW_KINDS, BatchLayout, HeadProcessor, Hook, Hooks
from headscope.steps import StepWindow
from headscope.tokens import Tokenization, tokenize


def trace(pipe, *, keep_steps: bool = False, steps=None, rows: str = "cond", hooks=(), maps: bool = True,
          allow_unknown: bool | None = None) -> "Trace":
    """A context manager that records the cross-attention heads of `pipe` during `pipe(...)` calls.

    Args:
        pipe: a diffusers text-to-image pipeline with a `unet` (SD 1.x / 2.x / XL).
        keep_steps: also keep one map per recorded step (memory grows with the step count).
        steps: step window to record (see `headscope.steps`): None, (start, end) fractions such as
            (0.0, 0.5), a slice/range of step indices or a list of them.
        rows: rows the built-in heat-map reader records: "cond" (prompt rows, default), "uncond"
            (negative / empty-prompt rows) or "all".
        hooks: extra readers and writers (`headscope.processor.Hook`), run after the built-in reader.
        maps: run the built-in heat-map reader (DAAM maps). False leaves it out, so only `hooks` run and
            no attention probabilities are computed unless a hook asks; word maps are then unavailable.
        allow_unknown: accept prompt words the tokenizer can only represent by its unknown token (see
            `headscope.tokens.tokenize`); by default they raise HeadscopeError.

    Results describe the latest pipeline call made inside the `with` block and stay readable after it.
    """
    return Trace(pipe, keep_steps=keep_steps, steps=steps, rows=rows, hooks=hooks, maps=maps,
                 allow_unknown=allow_unknown)


class Trace:
    """The object `trace()` returns: install on enter, restore on exit, read maps afterwards."""

    def __init__(self, pipe, *, keep_steps=False, steps=None, rows="cond", hooks=(), maps=True, allow_unknown=None):
        if rows not in ROW_KINDS:
            raise HeadscopeError(f"rows={rows!r}; use one of {', '.join(ROW_KINDS)}")
        for hook in hooks:
            if not isinstance(hook, Hook) or getattr(hook, "rows", "cond") not in ROW_KINDS:
                raise HeadscopeError(f"{hook!r} is not a headscope Hook with rows in {ROW_KINDS}")
        if getattr(pipe, "unet", None) is None:
            raise HeadscopeError("trace needs a pipeline with a `unet` (UNet2DConditionModel)")
        self.pipe = pipe
        self.index = HeadIndex.from_unet(pipe.unet)
        self.reducer = daam.HeatMapReducer(rows=rows, window=StepWindow.parse(steps), keep_steps=keep_steps)
        self.maps = maps
        self.allow_unknown = allow_unknown
        self.hooks = Hooks([self.reducer, *hooks] if maps else list(hooks))
        self.prompts: list[str] | None = None
        self.negative_prompts: list[str] | None = None
        self.images_per_prompt = 1
        self.calls = 0
        self._tokenizations: dict[str, list[Tokenization]] = {}
        self._pending_call = False
        self._saved: dict = {}

    # -- context management -------------------------------------------------------------------

    def __enter__(self) -> "Trace":
        unet = self.pipe.unet
        # Only the cross-attention modules are touched (module.set_processor), not the whole UNet's
        # processor dict: entering and leaving a trace then costs microseconds, not milliseconds.
        modules = {layer.name: unet.get_submodule(layer.name) for layer in self.index.layers}
        if any(isinstance(module.processor, HeadProcessor) for module in modules.values()):
            raise HeadscopeError("this pipeline is already being traced; close the other trace first")
        for name, module in modules.items():
            _check_replaceable(name, module.processor)
        self._saved["processors"] = {name: module.processor for name, module in modules.items()}
        try:
            for layer in self.index.layers:
                modules[layer.name].set_processor(HeadProcessor(layer, self.hooks))
            self._saved["handle"] = unet.register_forward_pre_hook(self._before_unet, with_kwargs=True)
            self._wrap_encode_prompt()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        """Put back whatever was changed: processors, the UNet pre-hook, encode_prompt."""
        try:
            for name, processor in self._saved.pop("processors", {}).items():
                self.pipe.unet.get_submodule(name).set_processor(processor)
        finally:
            if "handle" in self._saved:
                self._saved.pop("handle").remove()
            self._unwrap_encode_prompt()

    def _wrap_encode_prompt(self) -> None:
        original = getattr(self.pipe, "encode_prompt", None)
        if original is None:
            return
        signature = inspect.signature(original)
        self._saved["own_encode_prompt"] = self.pipe.__dict__.get("encode_prompt")

        @functools.wraps(original)
        def encode_prompt(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            self._record_prompts(bound.arguments)
            return original(*args, **kwargs)

        self.pipe.encode_prompt = encode_prompt

    def _unwrap_encode_prompt(self) -> None:
        if "own_encode_prompt" not in self._saved:
            return
        own = self._saved.pop("own_encode_prompt")
        if own is None:
            del self.pipe.__dict__["encode_prompt"]
        else:
            self.pipe.encode_prompt = own

    # -- what the pipeline tells us -----------------------------------------------------------

    def _record_prompts(self, arguments: dict) -> None:
        """Called with encode_prompt's arguments at the start of every pipeline call."""
        prompts = _as_list(arguments.get("prompt"))
        embeds = arguments.get("prompt_embeds")
        n_prompts = len(prompts) if prompts is not None else (embeds.shape[0] if embeds is not None else None)
        self.prompts = prompts
        self.images_per_prompt = int(arguments.get("num_images_per_prompt") or 1)
        negatives = _as_list(arguments.get("negative_prompt"))
        if arguments.get("do_classifier_free_guidance") is False:
            negatives = None  # no unconditional rows in this call
        elif negatives is None and arguments.get("negative_prompt_embeds") is None and n_prompts:
            negatives = [""] * n_prompts
        elif negatives is not None and len(negatives) == 1 and n_prompts:
            negatives = negatives * n_prompts
        self.negative_prompts = negatives
        self._tokenizations = {}
        max_length, allow = self._max_length(), self.allow_unknown
        if prompts is not None:
            self._tokenizations["cond"] = [tokenize(self.pipe.tokenizer, text, max_length, allow_unknown=allow)
                                          for text in prompts]
            self._check_second_prompts(arguments)
        if negatives is not None and self.reducer.rows != "cond":
            self._tokenizations["uncond"] = [tokenize(self.pipe.tokenizer, text, max_length, allow_unknown=allow)
                                            for text in negatives]
        # Keep only the keys up to the longest recorded prompt's end token; all keys when text is unknown.
        groups = [self._tokenizations.get(kind) for kind in self._recorded_kinds()]
        self.reducer.key_limit = (None if any(group is None for group in groups)
                                  else max(len(tokens) for group in groups for tokens in group))
        self._pending_call = True

    def _recorded_kinds(self) -> set[str]:
        return {"cond", "uncond"} if self.reducer.rows == "all" else {self.reducer.rows}

    def _check_second_prompts(self, arguments: dict) -> None:
        """SDXL's prompt_2 goes through tokenizer_2: refuse it too when it is too long."""
        second = _as_list(arguments.get("prompt_2"))
        tokenizer = getattr(self.pipe, "tokenizer_2", None)
        if second is not None and tokenizer is not None:
            for text in second:
                tokenize(tokenizer, text, self._max_length(tokenizer, "text_encoder_2"),
                         allow_unknown=self.allow_unknown)

    def _max_length(self, tokenizer=None, encoder_name="text_encoder") -> int:
        tokenizer = tokenizer or self.pipe.tokenizer
        limit = tokenizer.model_max_length
        encoder = getattr(self.pipe, encoder_name, None)
        positions = getattr(getattr(encoder, "config", None), "max_position_embeddings", None)
        return min(limit, positions) if positions else limit

    def _before_unet(self, unet, args, kwargs) -> None:
        """UNet forward pre-hook: advance the step and work out the batch layout."""
        sample = args[0] if args else kwargs["sample"]
        state = self.hooks.state
        starting = self._pending_call or state.call < 0
        state.step = 0 if starting else state.step + 1
        state.latent_hw = tuple(sample.shape[-2:])
        state.layout = self._layout(sample.shape[0])
        if starting:
            self._pending_call = False
            state.call += 1
            self.calls += 1
            state.n_steps = self._n_steps()
            self.index = self.index.at_latent(state.latent_hw)
            for hook in self.hooks.items:
                hook.start_call(state)

    def _n_steps(self) -> int | None:
        n_steps = getattr(self.pipe, "_num_timesteps", None)
        if n_steps is None and getattr(getattr(self.pipe, "scheduler", None), "timesteps", None) is not None:
            n_steps = len(self.pipe.scheduler.timesteps)
        return int(n_steps) if n_steps is not None else None

    def _layout(self, n_rows: int) -> BatchLayout:
        cfg = self._guidance_on()
        if cfg and n_rows % 2:
            raise HeadscopeError(f"classifier-free guidance is on but the UNet got {n_rows} rows (odd); "
                                 "headscope cannot tell conditional from unconditional rows")
        n_images = n_rows // 2 if cfg else n_rows
        n_prompts = len(self.prompts) if self.prompts is not None else None
        if n_prompts is not None and n_prompts * self.images_per_prompt != n_images:
            raise HeadscopeError(f"cannot work out the batch layout: {n_prompts} prompt(s) x "
                                 f"{self.images_per_prompt} image(s) per prompt, but the UNet got {n_rows} rows "
                                 f"(guidance {'on' if cfg else 'off'})")
        return BatchLayout(n_images=n_images, cfg=cfg, images_per_prompt=self.images_per_prompt)

    def _guidance_on(self) -> bool:
        try:
            return bool(self.pipe.do_classifier_free_guidance)
        except AttributeError:
            return False

    # -- results ------------------------------------------------------------------------------

    @property
    def layout(self) -> BatchLayout | None:
        """Batch layout of the latest UNet forward."""
        return self.hooks.state.layout

    @property
    def n_images(self) -> int:
        return self._require_run().n_images

    @property
    def n_steps(self) -> int | None:
        """Denoising steps of the latest call."""
        return self.hooks.state.n_steps

    @property
    def steps(self) -> list[int]:
        """Steps that were recorded (inside the step window)."""
        return list(self.reducer.steps)

    @property
    def vae_scale_factor(self) -> int:
        return int(getattr(self.pipe, "vae_scale_factor", 8))

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the generated images: latent size x VAE scale factor."""
        height, width = self.index.latent_hw
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    def tokenization(self, image: int = 0, rows: str = "cond") -> Tokenization:
        """How the prompt of `image` was tokenized (rows="uncond": its negative prompt)."""
        layout = self._require_run()
        if not 0 <= image < layout.n_images:
            raise HeadscopeError(f"image {image} out of range; the run made {layout.n_images} image(s)")
        if rows == "uncond" and not layout.cfg:
            raise HeadscopeError("this run had no unconditional rows (classifier-free guidance was off)")
        group = self._tokenizations.get(rows)
        if group is None:
            known = "prompt embeddings were passed instead of text" if rows == "cond" else \
                "record them with trace(..., rows='uncond' or 'all') and pass negative_prompt text"
            raise HeadscopeError(f"no {rows} prompt text for this run: {known}")
        return group[layout.prompt_index(image)]

    def words(self, image: int = 0, rows: str = "cond") -> list[str]:
        """Words of the prompt of `image`, punctuation left out."""
        return self.tokenization(image, rows).word_texts()

    def word_map(self, word: str, **options) -> torch.Tensor:
        """DAAM heat map [H, W] of `word`; see `headscope.daam.word_map` for the options."""
        self._require_maps()
        return daam.word_map(self, word, **options)

    def head_maps(self, word: str, **options) -> torch.Tensor:
        """Per-head maps [n_heads, h, w] of `word`; see `headscope.daam.head_maps`."""
        self._require_maps()
        return daam.head_maps(self, word, **options)

    def token_maps(self, **options) -> torch.Tensor:
        """Heat maps [n_tokens, H, W] of every prompt token; see `headscope.daam.token_maps`."""
        self._require_maps()
        return daam.token_maps(self, **options)

    def _require_maps(self) -> None:
        if not self.maps:
            raise HeadscopeError("this trace was opened with maps=False and recorded no heat maps")

    def _require_run(self) -> BatchLayout:
        layout = self.hooks.state.layout
        if layout is None:
            raise HeadscopeError("nothing recorded yet: call the pipeline inside `with trace(pipe) as tc:`")
        return layout


def _check_replaceable(name: str, processor) -> None:
    if type(processor).__name__ not in PLAIN_PROCESSORS:
        raise HeadscopeError(f"{name} uses {type(processor).__name__}, which does more than plain attention; "
                             "headscope can only trace layers with diffusers' standard processors "
                             "(call pipe.unet.set_default_attn_processor() first if that is what you want)")


def _as_list(prompt) -> list[str] | None:
    if prompt is None:
        return None
    return [prompt] if isinstance(prompt, str) else list(prompt)
