"""trace(pipe, ...): record (and steer) the text-conditioned attention heads during ordinary pipeline calls.

    with headscope.trace(pipe) as tc:
        image = pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0)).images[0]
    word_map = tc.word_map("circle")            # [H, W] at image resolution

Works on SD 1.x / 2.x / XL (UNet cross-attention), SD3 / SD3.5 and Flux.1 (joint attention); the
backbone adapter (`headscope.backbones`) says where everything is, the trace never tests a model class.

How the trace knows where it is:
  - Processors: every text-conditioned attention module the adapter names gets a headscope processor
    through `module.set_processor` (everything else keeps its processor); the original processors come
    back on exit, also on error.
  - Steps: a forward pre-hook on the denoiser (`register_forward_pre_hook`) reads each forward's
    arguments through the adapter (rows, latent size, text length). The first forward after the
    pipeline encoded its prompt starts a new call at step 0; the number of steps comes from
    `pipe._num_timesteps` (set by diffusers before its loop), else `len(pipe.scheduler.timesteps)`.
    Flux's `true_cfg_scale` runs the transformer twice per step (prompt, then negative prompt): the
    negative pass is recognised by its `encoder_hidden_states`, the very tensor the second
    `encode_prompt` returned, and shares the step of the pass before it. SD3's skip-layer-guidance pass
    is no step and is not recorded. No per-layer call counters.
  - Batch layout: the pipeline's `encode_prompt` is wrapped *on the instance* for the duration of the
    trace (Python looks `pipe(...)` up on the class, so `__call__` cannot be wrapped per instance; the
    class itself is never touched). The wrapper hands its arguments to a `PromptLog` (prompts, negative
    prompts, `num_images_per_prompt`, the tokens of each text encoder whose tokens are keys, prompts
    longer than an encoder takes refused), then calls the original. At every denoiser forward the
    pre-hook reads the row count and classifier-free guidance from `pipe.do_classifier_free_guidance`
    (so a callback that turns guidance off mid-run is followed), and checks the rows against prompts x
    images per prompt.
"""
from __future__ import annotations

import functools
import inspect

from headscope.backbones import backbone_for
from headscope.errors import HeadscopeError
from headscope.heads import HeadIndex
from headscope.maps import daam
from headscope.processor import ROW_KINDS, BatchLayout, HeadProcessor, Hook, Hooks
from headscope.prompts import EncoderTokens, PromptLog
from headscope.steps import StepWindow

NORMALIZATIONS = ("model", "text")


def trace(pipe, *, keep_steps: bool = False, steps=None, rows: str = "cond", hooks=(), maps: bool = True,
          allow_unknown: bool | None = None, encoder: str | None = None, normalize: str = "model",
          concepts=None) -> "Trace":
    """A context manager that records the text-conditioned attention heads of `pipe` during `pipe(...)` calls.

    Args:
        pipe: a diffusers text-to-image pipeline whose denoiser headscope knows: a UNet (SD 1.x / 2.x /
            XL), an SD3Transformer2DModel (SD3 / 3.5) or a FluxTransformer2DModel (Flux.1).
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
        encoder: whose tokens word maps use by default and how far the text keys are kept: "clip" (UNet,
            SD3 default) or "t5" (Flux default; on SD3 it keeps the CLIP keys too). None: the family's default.
        normalize: joint attention: "model" (default) keeps each map normalised as the model normalises it
            (softmax over all keys, image and text); "text" renormalises each image query's text
            attention to sum to 1. Cross-attention maps are the same either way.
        concepts: SD3 / Flux: concept words (at least two, one word each) carried through every joint block
            during the calls, for `tc.concept_maps()` (ConceptAttention, `headscope.maps.concepts`); the image
            is unchanged. Their tokens come from `encoder`'s segment. A `headscope.stream.ConceptStream` with
            its own readers is taken as it is.

    Results describe the latest pipeline call made inside the `with` block and stay readable after it.
    """
    return Trace(pipe, keep_steps=keep_steps, steps=steps, rows=rows, hooks=hooks, maps=maps,
                 allow_unknown=allow_unknown, encoder=encoder, normalize=normalize, concepts=concepts)


class Trace:
    """The object `trace()` returns: install on enter, restore on exit, read maps afterwards."""

    def __init__(self, pipe, *, keep_steps=False, steps=None, rows="cond", hooks=(), maps=True, allow_unknown=None,
                 encoder=None, normalize="model", concepts=None):
        if rows not in ROW_KINDS:
            raise HeadscopeError(f"rows={rows!r}; use one of {', '.join(ROW_KINDS)}")
        if normalize not in NORMALIZATIONS:
            raise HeadscopeError(f"normalize={normalize!r}; use one of {', '.join(NORMALIZATIONS)}")
        for hook in hooks:
            if not isinstance(hook, Hook) or getattr(hook, "rows", "cond") not in ROW_KINDS:
                raise HeadscopeError(f"{hook!r} is not a headscope Hook with rows in {ROW_KINDS}")
        self.pipe = pipe
        self.backbone = backbone_for(pipe)
        self.encoder = self.backbone.check_encoder_name(encoder)
        self.index = HeadIndex.from_model(self.backbone.model)
        self.reducer = daam.HeatMapReducer(rows=rows, window=StepWindow.parse(steps), keep_steps=keep_steps,
                                           normalize=normalize)
        self.maps = maps
        self.concept_stream = _concept_stream(pipe, concepts, self.encoder, self.reducer, allow_unknown)
        stream = [self.concept_stream] if self.concept_stream is not None else []
        self.hooks = Hooks([self.reducer, *hooks, *stream] if maps else [*hooks, *stream])
        self.prompt_log = PromptLog(pipe, self.backbone, negatives_wanted=rows != "cond", allow_unknown=allow_unknown)
        self.calls = 0
        self._pending_call = False
        self._uncond_embeds = None  # the negative prompt's embeddings of a separate guidance pass
        self._saved: dict = {}

    # -- context management -------------------------------------------------------------------

    def __enter__(self) -> "Trace":
        denoiser = self.backbone.model
        # Only the text-conditioned modules are touched (module.set_processor), not the model's whole
        # processor dict: entering and leaving a trace then costs microseconds, not milliseconds.
        modules = {layer.name: denoiser.get_submodule(layer.name) for layer in self.index.layers}
        if any(isinstance(module.processor, HeadProcessor) for module in modules.values()):
            raise HeadscopeError("this pipeline is already being traced; close the other trace first")
        # Every layer is checked before any is touched: a refusal leaves the model as it was.
        processors = {layer.name: self.backbone.processor_for(layer, modules[layer.name].processor, self.hooks)
                      for layer in self.index.layers}
        self._saved["processors"] = {name: module.processor for name, module in modules.items()}
        try:
            for name, processor in processors.items():
                modules[name].set_processor(processor)
            self._saved["handle"] = denoiser.register_forward_pre_hook(self._before_denoiser, with_kwargs=True)
            if self.concept_stream is not None:
                self._saved["stream"] = self.concept_stream
                self.concept_stream.attach()
            self._wrap_encode_prompt()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        """Put back whatever was changed: processors, the denoiser pre-hook, encode_prompt."""
        try:
            for name, processor in self._saved.pop("processors", {}).items():
                self.backbone.model.get_submodule(name).set_processor(processor)
        finally:
            if "handle" in self._saved:
                self._saved.pop("handle").remove()
            if "stream" in self._saved:
                self._saved.pop("stream").detach()
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
            negative_pass = self._record_prompts(bound.arguments)
            result = original(*args, **kwargs)
            if negative_pass:
                self._uncond_embeds = result[0]
            return result

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

    def _record_prompts(self, arguments: dict) -> bool:
        """Called with encode_prompt's arguments; True when this call encodes a separate negative pass."""
        if self.backbone.separate_cfg_passes and self._pending_call:
            # A second encode_prompt before the denoiser ran: Flux encodes the negative prompt of true CFG.
            self.prompt_log.negative_call(arguments)
            negative_pass = True
        else:
            self.prompt_log.check_encoder(self.encoder, arguments)
            self.prompt_log.start_call(arguments)
            if self.concept_stream is not None:
                self.concept_stream.prepare(arguments)  # the concepts encoded as this call encodes its prompt
            self._uncond_embeds = None
            negative_pass = False
        # Keep only the keys up to the longest recorded prompt's end token; all keys when text is unknown.
        self.reducer.key_limit = self.prompt_log.key_limit(self._recorded_kinds(), self.encoder)
        self._pending_call = True
        return negative_pass

    def _recorded_kinds(self) -> set[str]:
        return {"cond", "uncond"} if self.reducer.rows == "all" else {self.reducer.rows}

    def _before_denoiser(self, module, args, kwargs) -> None:
        """Denoiser forward pre-hook: advance the step and work out the batch layout."""
        call = self.backbone.denoiser_call(args, kwargs)
        state = self.hooks.state
        state.recording = not call.extra
        if call.extra:
            if self.concept_stream is not None:
                self.concept_stream.begin_forward(None)
            return
        starting = self._pending_call or state.call < 0
        layout = self._layout(call, starting)
        # A separate negative-prompt pass belongs to the step of the conditional pass before it.
        state.step = 0 if starting else state.step + (0 if layout.part == "uncond" else 1)
        state.latent_hw = call.latent_hw
        state.n_text = call.n_text
        state.layout = layout
        if starting:
            self._pending_call = False
            state.call += 1
            self.calls += 1
            state.n_steps = self._n_steps()
            self.index = self.index.at_latent(state.latent_hw)
            for hook in self.hooks.items:
                hook.start_call(state)
        if self.concept_stream is not None:
            self.concept_stream.begin_forward(state)

    def _n_steps(self) -> int | None:
        n_steps = getattr(self.pipe, "_num_timesteps", None)
        if n_steps is None and getattr(getattr(self.pipe, "scheduler", None), "timesteps", None) is not None:
            n_steps = len(self.pipe.scheduler.timesteps)
        return int(n_steps) if n_steps is not None else None

    def _layout(self, call, starting: bool) -> BatchLayout:
        n_rows, log = call.n_rows, self.prompt_log
        if log.separate_uncond:
            # The negative pass gets the very tensor the second encode_prompt returned, and follows a
            # conditional pass (so one tensor passed as both prompt and negative embeddings stays readable).
            after_cond = not starting and self.hooks.state.layout.part == "cond"
            part = "uncond" if after_cond and call.text_embeds is self._uncond_embeds else "cond"
            cfg, n_images = True, n_rows
        else:
            part, cfg = None, self._guidance_on()
            if cfg and n_rows % 2:
                raise HeadscopeError(f"classifier-free guidance is on but the denoiser got {n_rows} rows (odd); "
                                     "headscope cannot tell conditional from unconditional rows")
            n_images = n_rows // 2 if cfg else n_rows
        n_prompts = len(log.prompts) if log.prompts is not None else None
        if n_prompts is not None and n_prompts * log.images_per_prompt != n_images:
            raise HeadscopeError(f"cannot work out the batch layout: {n_prompts} prompt(s) x "
                                 f"{log.images_per_prompt} image(s) per prompt, but the denoiser got {n_rows} rows "
                                 f"(guidance {'on' if cfg else 'off'})")
        return BatchLayout(n_images=n_images, cfg=cfg, images_per_prompt=log.images_per_prompt, part=part)

    def _guidance_on(self) -> bool:
        try:
            return bool(self.pipe.do_classifier_free_guidance)
        except AttributeError:
            return False

    # -- results ------------------------------------------------------------------------------

    @property
    def prompts(self) -> list[str] | None:
        """Prompts of the latest call (None when embeddings were passed instead of text)."""
        return self.prompt_log.prompts

    @property
    def negative_prompts(self) -> list[str] | None:
        return self.prompt_log.negatives

    @property
    def images_per_prompt(self) -> int:
        return self.prompt_log.images_per_prompt

    @images_per_prompt.setter
    def images_per_prompt(self, value: int) -> None:  # maps.images pools its samples into one image
        self.prompt_log.images_per_prompt = int(value)

    @property
    def layout(self) -> BatchLayout | None:
        """Batch layout of the latest denoiser forward."""
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

    def tokenization(self, image: int = 0, rows: str = "cond", encoder: str | None = None) -> EncoderTokens:
        """How the prompt of `image` was tokenized by `encoder` (default the trace's; rows="uncond": its
        negative prompt). Word positions count among the layers' text keys."""
        layout = self._require_run()
        encoder = self.backbone.check_encoder_name(encoder or self.encoder)
        if not 0 <= image < layout.n_images:
            raise HeadscopeError(f"image {image} out of range; the run made {layout.n_images} image(s)")
        if rows == "uncond" and not layout.cfg:
            raise HeadscopeError("this run had no unconditional rows (classifier-free guidance was off)")
        group = self.prompt_log.tokens.get(rows, {}).get(encoder)
        if group is None:
            known = "prompt embeddings were passed instead of text" if rows == "cond" else \
                "record them with trace(..., rows='uncond' or 'all') and pass negative_prompt text"
            raise HeadscopeError(f"no {rows} prompt text for this run: {known}")
        tokens = group[layout.prompt_index(image)]
        limit = self.reducer.key_limit
        if limit is not None and tokens.key_end > limit:
            raise HeadscopeError(f"the trace kept the {self.encoder} text keys only; trace with "
                                 f"encoder={encoder!r} to map {encoder} tokens")
        return tokens

    def words(self, image: int = 0, rows: str = "cond", encoder: str | None = None) -> list[str]:
        """Words of the prompt of `image`, punctuation left out."""
        return self.tokenization(image, rows, encoder).word_texts()

    def word_map(self, word: str, **options):
        """DAAM heat map [H, W] of `word`; see `headscope.daam.word_map` for the options (`encoder=` too)."""
        self._require_maps()
        return daam.word_map(self, word, **options)

    def head_maps(self, word: str, **options):
        """Per-head maps [n_heads, h, w] of `word`; see `headscope.daam.head_maps`."""
        self._require_maps()
        return daam.head_maps(self, word, **options)

    def token_maps(self, **options):
        """Heat maps [n_tokens, H, W] of every prompt token; see `headscope.daam.token_maps`."""
        self._require_maps()
        return daam.token_maps(self, **options)

    def concept_maps(self, concepts=None, **options):
        """Concept saliency [concepts, H, W] of the concepts traced with `trace(pipe, concepts=[...])`; see
        `headscope.maps.concepts.concept_maps` for the options (layers=, steps=, image=, upsample=, size=)."""
        from headscope.maps.concepts import concept_maps

        return concept_maps(self, concepts, **options)

    def _require_maps(self) -> None:
        if not self.maps:
            raise HeadscopeError("this trace was opened with maps=False and recorded no heat maps")

    def _require_run(self) -> BatchLayout:
        layout = self.hooks.state.layout
        if layout is None:
            raise HeadscopeError("nothing recorded yet: call the pipeline inside `with trace(pipe) as tc:`")
        return layout


def _concept_stream(pipe, concepts, encoder: str, reducer, allow_unknown):
    """The trace's concept stream: None, the ConceptStream given, or one carrying a word list for concept maps."""
    if concepts is None:
        return None
    from headscope.maps.concepts import ConceptMapReducer, check_concepts
    from headscope.stream import ConceptStream

    if isinstance(concepts, ConceptStream):
        return concepts
    entries = check_concepts(concepts)
    stream = ConceptStream(pipe, entries, encoder=encoder, allow_unknown=allow_unknown, feature="concept maps")
    stream.readers.append(ConceptMapReducer(stream.spans, window=reducer.window, keep_steps=reducer.keep_steps))
    return stream
