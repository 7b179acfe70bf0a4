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
          their queries attend to [image keys; concept keys]; no image or prompt token attends to a
          concept key, so the generated image is bitwise unchanged;
  readers for each block of each forward, in the order they ran (see Batching), every reader's
          `read_concepts(ctx, block)` gets a `ConceptBlock`: the block's image queries and attention
          outputs beside the concept tokens' keys and outputs.
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

Batching: a call's forwards are independent of one another in the stream (each starts from the
encoded entries, and reads only its own forward's image), so when `STREAM_BUDGET_BYTES` holds two or
more of them, the stream copies each block's image side (cond rows: keys and values, and the queries and
outputs its readers read) into an arena while it is hot, and carries a block for every forward of the
arena at once, one batch of [forwards x rows] (`ConceptStream.flush`), when the arena is full and after
the call's last step, the steps spread evenly over as few batches as fit. The arena is made once and
kept while the stream lives, reused by every call of its traces, so a call allocates and keeps no image
tensors of its own (an arena made for each trace had its pages faulted in anew every time, most of what
the copies cost on the small models). The last block's image keys and values are not kept when no
reader reads outputs (they would only carry the tokens on). Real-size models, of which fewer than two
forwards fit, are carried block by block as they run. Readers get the records in the order the blocks
ran, step by step.

Cost per block: the text stream's work for the carried tokens of the conditional rows (projections
and MLP of T tokens, attention of T queries over L_img + T keys), i.e. about T / (rows x (L_img +
L_txt)) of the block's projections and MLP, in one batch for the arena's forwards. T is every entry's
tokens, or with a selection T_sel: for HRV votes the tokens of one chosen word per concept (the most any
row of the forward chose), not every word of the set (shapes: 23 tokens; hrv34: 340).
"""
from __future__ import annotations

import inspect
from dataclasses import replace
from functools import partial

import torch

from headscope.backbones import backbone_for
from headscope.backbones.streams import MODULATED, ImageSide, step_for
from headscope.errors import HeadscopeError
from headscope.heads import HeadIndex
from headscope.joint import JointTensors
from headscope.processor import Hook, HookContext, RunState, row_index
from headscope.stream_arena import Arena, ConceptBlock, Forward, Kept, TokenSelection, joined, side_by_side

_CHUNK = 64  # entries per encode_prompt call
STREAM_BUDGET_BYTES = 128 * 2**20
"""Most bytes of the arena of a call's forwards carried side by side, for streams whose `budget` is None (read
when a call starts). When fewer than two forwards fit (real-size models), each block is carried as it runs."""


class ConceptStream(Hook):
    """Carries `entries` (concept words) through every joint block of `pipe`'s transformer during a trace.

    Give it to `headscope.trace(pipe, concepts=stream)` (or pass a word list there, which builds one with a
    concept-map reader). Attributes: `entries`, `spans` (per entry, (start, stop) among the stream's
    tokens), `n_tokens`, `readers` (objects with `read_concepts(ctx, ConceptBlock)`, optionally
    `start_call(state)`, `records_done()` (called after each batch of records), `needs_outputs = False`
    when they read no outputs, `needs_queries = False` when they read no image queries, and
    `select_tokens(ctx) -> (index, valid)` to choose each forward's tokens, at most `max_tokens` per row
    (default `n_tokens`): see the module docstring; every reader then gets the selected tokens), `budget`
    (the arena's most bytes; None, the default: `STREAM_BUDGET_BYTES`; 0: block by block) and `slots`
    (forwards the current call carries side by side; 0: block by block).
    HeadscopeError on a UNet (no text stream), an unknown word, an empty entry, and, when the trace starts,
    a second reader with `select_tokens`.
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
        self._selector = None  # the reader with select_tokens, found at attach
        self._steps: dict[int, object] = {}  # per block: its family's step function (`headscope.backbones.streams`)
        self._blocks: dict[int, torch.nn.Module] = {}
        self._state = RunState()  # the trace's, from begin_forward
        self._current: Forward | None = None  # the forward running now, when it has conditional rows
        self._forwards: list[Forward] = []  # forwards with kept blocks not carried yet (and the current one)
        self._arena: Arena | None = None  # kept while the stream lives, reused by every call of its traces
        self._planned_call: int | None = None  # the call whose forwards `slots` was chosen for
        self.slots, self.budget = 0, None  # see the class docstring
        self._captured: dict[int, tuple[HookContext, JointTensors]] = {}
        self._modulation: dict[int, torch.Tensor] = {}  # per block: its text norm's linear(silu(temb)), all rows

    # -- what the trace calls ------------------------------------------------------------------

    def attach(self) -> None:
        """Hook every joint block's forward (after it ran) and the denoiser's, in the trace's `__enter__`."""
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
            self._steps[layer.index] = step_for(self.backbone.family, layer.kind)
            self._blocks[layer.index] = block
            norm = getattr(block, MODULATED[(self.backbone.family, layer.kind)], None)
            if isinstance(getattr(norm, "linear", None), torch.nn.Module):
                self._handles.append(norm.linear.register_forward_hook(partial(self._keep_modulation, layer.index)))
            self._handles.append(block.register_forward_hook(partial(self._after_block, layer.index),
                                                             with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._after_forward))

    def detach(self) -> None:
        """Carry what is still kept (a call stopped early), then remove the hooks, in the trace's `__exit__`."""
        try:
            self.flush()
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles, self._forwards, self._current, self._planned_call = [], [], None, None

    def prepare(self, arguments: dict) -> None:
        """Encode the entries as a pipeline call with these `encode_prompt` arguments would (once per length)."""
        length = arguments.get("max_sequence_length")
        if self._initial is None or self._initial_for != length:
            self.flush()  # kept forwards start from the encodings of their own call
            self._initial = self._encode(length)
            self._initial_for = length

    def begin_forward(self, state: RunState | None) -> None:
        """A denoiser forward starts (None: a pass not recorded); it carries the stream from the encoded entries."""
        self._captured, self._modulation = {}, {}
        rows = state.layout.rows(self.rows) if state is not None and state.layout is not None else ()
        self._current = Forward(rows=tuple(rows)) if rows else None
        if state is not None:
            self._state = state
        if self._current is not None:
            self._forwards.append(self._current)

    def start_call(self, state: RunState) -> None:
        self.flush()  # whatever an earlier call left, before the readers start this one
        for reader in self.readers:
            if hasattr(reader, "start_call"):
                reader.start_call(state)

    def wants_joint(self, ctx: HookContext) -> bool:
        return self._current is not None

    @torch.no_grad()
    def read_joint(self, ctx: HookContext, tensors: JointTensors) -> None:
        """A block's image side, as its attention ran: copied into the arena now, while hot, so that no view of
        the attention's tensors outlives the call (the model frees them when it would without the stream);
        kept as views to the block's end when it is carried at once (no arena)."""
        forward = self._current
        if ctx.rows != forward.rows:  # guidance: the conditional rows only
            ctx = replace(ctx, rows=forward.rows)
            rows = row_index(forward.rows)
            tensors = JointTensors(query=tensors.query[rows], key=tensors.key[rows], value=tensors.value[rows],
                                   output=tensors.output[rows])
        if forward.next_layer is None:  # the forward's first block: its tokens, its place
            forward.next_layer = ctx.layer.index
            self._select(ctx, forward)
            self._place(ctx, forward, tensors)
        if forward.slot is not None:
            self._arena.put(ctx.layer.index, forward.slot, tensors)
            tensors = None
        self._captured[ctx.layer.index] = (ctx, tensors)

    # -- the stream ----------------------------------------------------------------------------

    def _keep_modulation(self, layer: int, module, args, output) -> None:
        """Forward hook of a block's text-norm linear: its output, which the concept tokens reuse."""
        if self._current is not None:
            self._modulation[layer] = output

    def _after_block(self, layer: int, block, args, kwargs, output) -> None:
        """Forward hook of a joint block: keep its conditioning (and, without an arena, its image side) for
        `flush`, and carry it at once when no arena is used."""
        entry = self._captured.pop(layer, None)
        forward = self._current
        if entry is None or forward is None:
            return None
        ctx, image = entry
        temb = kwargs["temb"] if "temb" in kwargs else args[2]
        modulation = self._modulation.pop(layer, None)
        if temb.shape[0] != len(forward.rows):  # guidance: the conditional rows only
            rows = row_index(forward.rows)
            temb, modulation = temb[rows], None if modulation is None else modulation[rows]
        forward.kept.append(Kept(layer, ctx, image, temb, modulation))
        if forward.slot is None:
            self.flush()
        return None

    def _after_forward(self, module, args, output) -> None:
        """Forward hook of the denoiser: carry the kept forwards after the call's last step, or when the arena
        is full."""
        state, forward = self._state, self._current
        if forward is None or forward.slot is None:
            return
        if state.n_steps is None or state.step >= state.n_steps - 1 or forward.slot == self.slots - 1:
            self.flush()

    def _select(self, ctx: HookContext, forward: "Forward") -> None:
        """Ask the selecting reader, if any, which tokens this forward carries (at its first block)."""
        if self._selector is None:
            forward.width = self.n_tokens
            return
        index, valid = self._selector.select_tokens(ctx)
        device = self._initial.device if self._initial is not None else index.device
        index, valid = index.to(device), valid.to(device)
        if index.shape[1] > self._room:
            raise HeadscopeError(f"{type(self._selector).__name__} selected {index.shape[1]} tokens per row, more "
                                 f"than its max_tokens ({self._room})")
        forward.selection = TokenSelection(index=index, valid=valid)
        forward.key_mask = None if bool(valid.all()) else valid
        forward.width = index.shape[1]

    @property
    def _outputs_wanted(self) -> bool:
        """Whether a reader reads outputs: else the last block gives the concept keys only (nothing after it)."""
        return any(getattr(reader, "needs_outputs", True) for reader in self.readers)

    @property
    def _room(self) -> int:
        """The most tokens a forward carries: every token, or what the selecting reader says it may choose."""
        return int(getattr(self._selector, "max_tokens", self.n_tokens)) if self._selector else self.n_tokens

    def _place(self, ctx: HookContext, forward: "Forward", image: JointTensors) -> None:
        """A forward's slot in the arena, the arena made (or kept) at a call's first forward for as many of
        the call's forwards as the budget holds; none (block by block) when fewer than two fit."""
        if ctx.call != self._planned_call:
            self.flush()
            self._planned_call = ctx.call
            shapes = {layer.index: (layer.heads, layer.head_dim) for layer in self.index.layers}
            queries = any(getattr(reader, "needs_queries", True) for reader in self.readers)
            budget = STREAM_BUDGET_BYTES if self.budget is None else self.budget
            self.slots, spec = Arena.plan(shapes, ctx.n_steps or 0, len(forward.rows), image.key, self._room,
                                          queries=queries, outputs=self._outputs_wanted, budget=budget)
            if spec is None or self._arena is None or self._arena.spec != spec:
                self._arena = None  # the old room goes before the new is made
                self._arena = None if spec is None else Arena(spec)
        if self.slots:
            forward.slot = sum(1 for other in self._forwards if other.slot is not None and other is not forward)

    @torch.no_grad()
    def flush(self) -> None:
        """Carry every kept block through the concept tokens and hand each reader its records, forward by
        forward and block by block, in the order they ran; then tell readers with `records_done` that the
        records' tensors (views into the arena) are about to be reused.

        A call's forwards are independent of each other in the stream (each starts from the encoded
        entries), so a block is carried for all forwards in the arena at once: one batch of [forwards x
        rows] through the block's text weights, each row attending to its own forward's image. Called after
        a call's last step or when the arena is full, after each block when no arena is used, at a call's
        start and when the trace closes; costs nothing when nothing is kept.
        """
        forwards = [forward for forward in self._forwards if forward.kept]
        if not forwards:
            return
        records = {id(forward): [] for forward in forwards}
        last = self.index.layers[-1].index
        outputs_wanted = self._outputs_wanted
        carried: dict[tuple, tuple] = {}  # forwards carried together -> (states, key mask) out of their last block
        for layer in self.index.layers:
            ready = [forward for forward in forwards if forward.kept and forward.kept[0].layer == layer.index]
            in_arena = [forward for forward in ready if forward.slot is not None]
            groups = [[forward] for forward in ready if forward.slot is None]
            if in_arena:  # slots 0.. in order: the forwards of the arena that reached this block
                groups.insert(0, in_arena)
            for group in groups:
                self._carry(layer, group, records, carried, layer.index != last or outputs_wanted)
        # Only the running forward can have blocks to come.
        self._forwards = [forward for forward in self._forwards if forward is self._current and
                          (forward.next_layer is None or forward.next_layer <= last)]
        for forward in forwards:
            for ctx, record in records[id(forward)]:
                for reader in self.readers:
                    reader.read_concepts(ctx, record)
        for reader in self.readers:
            if hasattr(reader, "records_done"):
                reader.records_done()

    def _carry(self, layer, group: list["Forward"], records: dict, carried: dict, outputs: bool) -> None:
        """One block for these forwards side by side: their next kept block, in one batch of their rows."""
        kept = [forward.kept.pop(0) for forward in group]
        ids = tuple(id(forward) for forward in group)
        states, key_mask = carried[ids] if ids in carried else side_by_side(group, self._start)
        temb = joined([entry.temb for entry in kept])
        modulation = None if any(entry.modulation is None for entry in kept) else \
            joined([entry.modulation for entry in kept])
        arena = self._arena if group[0].slot is not None else None
        if arena is not None:
            image = arena.side(layer.index, len(group))
        else:
            image = ImageSide(joined([entry.image.key for entry in kept]),
                              joined([entry.image.value for entry in kept]))
        result = self._steps[layer.index](self._blocks[layer.index], states, temb, image, outputs, key_mask, modulation)
        start = 0
        keys, output = result.concept_key, result.concept_output  # [rows, heads, the widest forward's width, d]
        for forward, entry in zip(group, kept):
            stop = start + len(forward.rows)
            if arena is None:
                image_query, image_output = entry.image.query, entry.image.output
            else:
                image_query = None if arena.query is None else arena.query[layer.index][forward.slot]
                image_output = None if arena.output is None else arena.output[layer.index][forward.slot]
            records[id(forward)].append((entry.ctx, ConceptBlock(
                image_query=image_query, image_output=image_output, concept_key=forward.part(keys, start, stop),
                concept_output=forward.part(output, start, stop), selection=forward.selection)))
            forward.carried = (result.states, start, stop)
            forward.next_layer = layer.index + 1
            start = stop
        carried[ids] = (result.states, key_mask)

    def _start(self, forward: "Forward") -> torch.Tensor:
        """A forward's carried tokens' encodings: [rows, tokens, dim], every entry's, or [rows, T_sel, dim] of
        the tokens the selecting reader chose."""
        if self._initial is None:
            self.prepare({})
        if forward.selection is None:
            return self._initial.expand(len(forward.rows), -1, -1)
        return self._initial[forward.selection.index.to(self._initial.device)]

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
