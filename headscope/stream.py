"""The concept stream: concept tokens carried through a joint transformer's text stream, one way.

ConceptAttention (Helbling et al., ICML 2025) reads concepts off a joint-attention model (SD3, Flux)
by adding concept tokens beside the prompt in every joint block. Here:

  start   each concept entry is encoded alone by the pipeline's own text encoders (`encode_prompt`,
          with the call's `max_sequence_length`: T5 reads the padding, so its outputs depend on the
          length), only the entry's own tokens kept (no start, end or padding tokens) from the segment
          of the stream's encoder (SD3: the CLIP tokens by default, the T5 tokens with encoder="t5";
          Flux: T5), then passed through the model's `context_embedder`, as the prompt is;
  blocks  in every block (SD3 joint blocks; Flux double- then single-stream blocks) the concept tokens
          go through the block's text-stream weights with the block's temb: the same norms and
          modulation (the prompt's own, kept by a hook on the norm's linear, not computed again),
          projections, output projection, MLP and gates (`headscope.backbones.streams`);
          their queries attend to [concept keys; image keys]; no image or prompt token attends to a
          concept key, so the generated image is bitwise unchanged;
  readers after each block, every reader's `read_concepts(ctx, block)` gets a `ConceptBlock`: the
          block's image queries and attention outputs beside the concept tokens' keys and outputs.
          Concept maps (`headscope.maps.concepts`) compare the outputs; joint-attention HRV votes
          (`headscope.hrv.votes`) score the image queries against the concept keys.

Only conditional rows are carried (negative-prompt rows are not). Several tokens of one entry stay
separate tokens in the stream; `spans` says where each entry's tokens lie.

Selection: a reader with `select_tokens(ctx)` (at most one per stream; HRV votes,
`headscope.hrv.votes`) chooses, at the first block of each recorded forward, which of the stream's
tokens each row carries through that forward: (index [rows, T_sel] into the tokens, valid [rows, T_sel],
False on padding, since rows may choose entries of different lengths). The states start from those
tokens' encodings, and no concept query attends to a padded key, so a row's real tokens go through the
blocks exactly as a stream holding only its chosen entries would carry them. The choice holds for the
whole forward: a token's keys exist in a block only if it was carried from the first one.

Cost per block: the text stream's work for the carried tokens of the conditional rows (projections
and MLP of T tokens, attention of T queries over T + L_img keys), i.e. about T / (rows x (L_img +
L_txt)) of the block's projections and MLP. T is every entry's tokens, or with a selection T_sel:
for HRV votes the concepts x the longest chosen word's tokens (per forward, over the batch's rows),
not every word of the set (shapes: 23 tokens; hrv34: 340). Nothing is kept between blocks but the states.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from functools import partial

import torch

from headscope.backbones import backbone_for
from headscope.backbones.streams import MODULATED, step_for
from headscope.errors import HeadscopeError
from headscope.heads import HeadIndex
from headscope.joint import JointTensors
from headscope.processor import Hook, HookContext, RunState, row_index

_CHUNK = 64  # entries per encode_prompt call


@dataclass(frozen=True)
class TokenSelection:
    """The stream's tokens each row carries through one denoiser forward (a selecting reader's choice).

    index: [rows, T_sel] long, positions among the stream's tokens (see `ConceptStream.spans`).
    valid: [rows, T_sel] bool, False on padding slots (hidden from every concept query).
    """

    index: torch.Tensor
    valid: torch.Tensor


@dataclass(frozen=True)
class ConceptBlock:
    """What one joint block says about the carried concept tokens (conditional rows, heads first).

    image_query: [rows, heads, L_img, head_dim], the block's image queries (after q-norm; RoPE on Flux).
    image_output: [rows, heads, L_img, head_dim], their attention output before the output projection.
    concept_key: [rows, heads, tokens, head_dim], the carried tokens' keys (text-stream projection, k-norm);
        tokens = every token of the stream, or T_sel, in `selection` order, when a reader selects.
    concept_output: [rows, heads, tokens, head_dim], their attention output before the output projection
        (None in the last block when no reader has `needs_outputs`: nothing comes after it).
    selection: which tokens each row carries in this forward; None when the stream carries all of them.
    """

    image_query: torch.Tensor
    image_output: torch.Tensor
    concept_key: torch.Tensor
    concept_output: torch.Tensor
    selection: TokenSelection | None = None


class ConceptStream(Hook):
    """Carries `entries` (concept words) through every joint block of `pipe`'s transformer during a trace.

    Give it to `headscope.trace(pipe, concepts=stream)` (or pass a word list there, which builds one with a
    concept-map reader). Attributes: `entries`, `spans` (per entry, (start, stop) among the stream's
    tokens), `n_tokens`, `readers` (objects with `read_concepts(ctx, ConceptBlock)`, optionally
    `start_call(state)`, `needs_outputs = False` when they read only keys and queries, and
    `select_tokens(ctx) -> (index, valid)` to choose each forward's tokens: see the module docstring; every
    reader then gets the selected tokens). HeadscopeError on a UNet (no text stream), an unknown word, an
    empty entry, and, when the trace starts, a second reader with `select_tokens`.
    """

    rows = "cond"

    def __init__(self, pipe, entries, *, encoder: str | None = None, readers=(), allow_unknown: bool | None = None,
                 feature: str = "concept tokens"):
        self.pipe = pipe
        self.backbone = backbone_for(pipe)
        if self.backbone.family == "unet":
            raise HeadscopeError(f"{feature} need a joint-attention model (SD3 / SD3.5, Flux), whose blocks carry a "
                                 f"text stream; this model is a {self.backbone.description}, whose text keys are the "
                                 "same in every layer")
        self.encoder = self.backbone.check_encoder_name(encoder)
        self.entries = [str(entry) for entry in entries]
        self.readers = list(readers)
        self.index = HeadIndex.from_model(self.backbone.model)
        self._encode_prompt = pipe.encode_prompt  # taken before a trace wraps it
        self._positions = [_entry_positions(pipe, self.backbone, entry, self.encoder, allow_unknown)
                           for entry in self.entries]
        starts = [0]
        for positions in self._positions:
            starts.append(starts[-1] + len(positions))
        self.spans = list(zip(starts[:-1], starts[1:]))
        self.n_tokens = starts[-1]
        self._initial: torch.Tensor | None = None  # [tokens, dim] after the context embedder
        self._initial_for: object = object()
        self._handles: list = []
        self._rows: tuple[int, ...] = ()
        self._states: torch.Tensor | None = None
        self._selector = None  # the reader with select_tokens, found at attach
        self._selection: TokenSelection | None = None  # this forward's, when a reader selects
        self._key_mask: torch.Tensor | None = None  # [rows, T_sel] bool; None when nothing is padded
        self._captured: dict[int, tuple[HookContext, JointTensors]] = {}
        self._modulation: dict[int, torch.Tensor] = {}  # per block: its text norm's linear(silu(temb)), all rows

    # -- what the trace calls ------------------------------------------------------------------

    def attach(self) -> None:
        """Hook every joint block's forward (after it ran), in the trace's `__enter__`."""
        selectors = [reader for reader in self.readers if hasattr(reader, "select_tokens")]
        if len(selectors) > 1:
            raise HeadscopeError(f"a concept stream carries one selection of its tokens per forward, and "
                                 f"{len(selectors)} of its readers select tokens "
                                 f"({', '.join(type(reader).__name__ for reader in selectors)}); give each its own "
                                 "stream, in separate traces")
        self._selector = selectors[0] if selectors else None
        model = self.backbone.model
        for layer in self.index.layers:
            block = model.get_submodule(layer.name.rsplit(".", 1)[0])
            step = step_for(self.backbone.family, layer.kind)
            norm = getattr(block, MODULATED[(self.backbone.family, layer.kind)], None)
            if isinstance(getattr(norm, "linear", None), torch.nn.Module):
                self._handles.append(norm.linear.register_forward_hook(partial(self._keep_modulation, layer.index)))
            self._handles.append(block.register_forward_hook(partial(self._after_block, layer.index, step),
                                                             with_kwargs=True))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def prepare(self, arguments: dict) -> None:
        """Encode the entries as a pipeline call with these `encode_prompt` arguments would (once per length)."""
        length = arguments.get("max_sequence_length")
        if self._initial is None or self._initial_for != length:
            self._initial = self._encode(length)
            self._initial_for = length

    def begin_forward(self, state: RunState | None) -> None:
        """A denoiser forward starts: the stream restarts from the encoded entries (None: a pass not recorded)."""
        self._states, self._captured, self._modulation = None, {}, {}
        self._selection, self._key_mask = None, None
        self._rows = state.layout.rows(self.rows) if state is not None and state.layout is not None else ()

    def start_call(self, state: RunState) -> None:
        for reader in self.readers:
            if hasattr(reader, "start_call"):
                reader.start_call(state)

    def wants_joint(self, ctx: HookContext) -> bool:
        return bool(self._rows)

    def read_joint(self, ctx: HookContext, tensors: JointTensors) -> None:
        self._captured[ctx.layer.index] = (ctx, tensors)

    # -- the stream ----------------------------------------------------------------------------

    def _keep_modulation(self, layer: int, module, args, output) -> None:
        """Forward hook of a block's text-norm linear: its output, which the concept tokens reuse."""
        if self._rows:
            self._modulation[layer] = output

    @torch.no_grad()
    def _after_block(self, layer: int, step, block, args, kwargs, output) -> None:
        """Forward hook of a joint block: carry the concept tokens through it, hand the readers its record."""
        entry = self._captured.pop(layer, None)
        if entry is None:
            return None
        ctx, tensors = entry
        ctx = replace(ctx, rows=self._rows)
        rows = row_index(self._rows)
        states = self._states if self._states is not None else self._start(ctx)
        temb = kwargs["temb"] if "temb" in kwargs else args[2]
        image = JointTensors(query=tensors.query[rows], key=tensors.key[rows], value=tensors.value[rows],
                             output=tensors.output[rows])
        # After the last block nothing needs the states; its outputs only a reader that asks for them.
        carry = layer != self.index.layers[-1].index or any(getattr(reader, "needs_outputs", True)
                                                            for reader in self.readers)
        modulation = self._modulation.pop(layer, None)
        modulation = None if modulation is None else modulation[rows]
        result = step(block, states, temb[rows], image, carry, self._key_mask, modulation)
        self._states = result.states
        record = ConceptBlock(image_query=image.query, image_output=image.output, concept_key=result.concept_key,
                              concept_output=result.concept_output, selection=self._selection)
        for reader in self.readers:
            reader.read_concepts(ctx, record)
        return None

    def _start(self, ctx: HookContext) -> torch.Tensor:
        """The carried tokens' encodings for the forward's rows: [rows, tokens, dim], every entry's, or
        [rows, T_sel, dim] of the tokens the selecting reader chose (asked here, at the first block)."""
        if self._initial is None:
            self.prepare({})
        if self._selector is None:
            return self._initial.expand(len(ctx.rows), -1, -1)
        index, valid = self._selector.select_tokens(ctx)
        padded = not bool(valid.all())
        index, valid = index.to(self._initial.device), valid.to(self._initial.device)
        self._selection = TokenSelection(index=index, valid=valid)
        self._key_mask = valid if padded else None
        return self._initial[index]

    @torch.no_grad()
    def _encode(self, max_sequence_length) -> torch.Tensor:
        """Every entry's own tokens, encoded alone, through the context embedder: [tokens, dim]."""
        parameters = inspect.signature(self._encode_prompt).parameters
        model = self.backbone.model
        options = {"device": getattr(self.pipe, "_execution_device", None) or self.pipe.device,
                   "num_images_per_prompt": 1}
        options.update({name: None for name in ("prompt_2", "prompt_3") if name in parameters})
        if "do_classifier_free_guidance" in parameters:
            options["do_classifier_free_guidance"] = False
        if max_sequence_length is not None and "max_sequence_length" in parameters:
            options["max_sequence_length"] = max_sequence_length
        pieces = []
        for start in range(0, len(self.entries), _CHUNK):
            embeds = self._encode_prompt(prompt=self.entries[start:start + _CHUNK], **options)[0]  # [n, L_txt, D]
            for row, positions in enumerate(self._positions[start:start + _CHUNK]):
                pieces.append(embeds[row, positions])
        weight = model.context_embedder.weight
        return model.context_embedder(torch.cat(pieces).to(device=weight.device, dtype=weight.dtype))


def _entry_positions(pipe, backbone, entry: str, encoder: str, allow_unknown) -> list[int]:
    """Key positions of an entry's own tokens (all its words; no start / end token) as `encoder` gives them."""
    from headscope.prompts import PromptLog

    if not entry.strip():
        raise HeadscopeError("an empty concept entry; give words, e.g. 'circle'")
    log = PromptLog(pipe, backbone, negatives_wanted=False, allow_unknown=allow_unknown)
    arguments = {"prompt": entry}
    log.check_encoder(encoder, arguments)
    try:
        log.start_call(arguments)
    except HeadscopeError as error:
        raise HeadscopeError(f"concept {entry!r}: {error}") from None
    tokens = log.tokens["cond"][encoder][0]
    positions = sorted({position for word in tokens.words for position in word.positions})
    if not positions:
        raise HeadscopeError(f"concept {entry!r} becomes no token with this model's {encoder} tokenizer")
    return positions
