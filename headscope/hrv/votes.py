"""The vote reader: which concept each head's queries attend to most (keys: `headscope.hrv.keys`).

Cost: the reader runs beside every text-conditioned layer call, and a small torch op interleaved with a
model's own work costs several times what it costs back to back (cold caches: 30 against 4 ms per 100
calls of the embedded model's reader), so a layer call only keeps its queries (a reference, no op).
When the votes are read (`step_votes`, `begin`), when the next call starts, or once the kept queries'
storage passes `VOTE_BUDGET_BYTES`, every kept layer call of every step so far with one query shape is
scored together, in one batch: the sampled words' keys, one product with the queries, softmax, mean
over pixels, per-word mean, argmax. What depends on the step alone (the sampled words, their key
positions, the padding mask and the per-word averaging matrix, `headscope.hrv.sampling`) is made once
per step for every layer, keys are scaled once, and the winners stay on the model's device until they
are counted (one transfer per call).

Sampling: on a UNet one word per concept is drawn at every layer call (per (layer, row, concept)), as
the HRV paper does. On joint-attention models (SD3, Flux) one word per concept is drawn per (step,
row), the same for every block of that denoiser forward: a block's concept keys come from the text
stream as it stands there, so a token must be carried from the first block for its keys to exist in
a later one, and a choice per block would force carrying every word of the set. The concept stream
(`headscope.stream`) asks the reader for that choice (`select_tokens`) and carries only it: per row,
the chosen words' tokens one after another, padded at the end to the row with the most (padding hidden
from attention), instead of every word of the set (the shapes set: 23 tokens; hrv34: 340). Draws come
from each prompt's own generator either way, so a prompt's votes do not depend on the batch it is built in.
"""
from __future__ import annotations

import torch

from headscope.concepts import ConceptSet
from headscope.heads import HeadIndex
from headscope.hrv.keys import ConceptTokens, encode_concepts, project_keys, word_spans
from headscope.hrv.meta import prompt_seed
from headscope.hrv.sampling import StepTables, packed_positions, word_table
from headscope.processor import Hook, HookContext
from headscope.stream_arena import stacked

VOTE_BUDGET_BYTES = 64 * 2**20  # kept queries' storage beyond this is scored at once (read at call time)
SCORE_CHUNK_BYTES = 8 * 2**20  # most bytes of logits scored at once (read at call time)


def mean_softmax(keys, queries, bias=None) -> torch.Tensor:
    """The mean over queries of the softmax over keys of their products (+ bias): keys [..., sampled, d],
    queries [..., n_query, d] -> [..., sampled]. In chunks of queries of at most `SCORE_CHUNK_BYTES` of logits:
    at real width (SD3-medium at 1024 px: 14 MB a block) a chunk stays in cache and the allocator reuses its
    memory, where one pass faults in fresh pages; one pass, as before, when they fit."""
    n_query = queries.shape[-2]
    per_query = keys.numel() // keys.shape[-1] * keys.element_size()  # bytes of logits per query
    chunk = max(1, SCORE_CHUNK_BYTES // max(1, per_query))
    total = None
    for start in range(0, n_query, chunk):
        # Keys-major logits: a softmax over a short, strided dimension is several times faster on CPU than
        # over the last one when that is as short as the sampled tokens (6 for the shapes concepts).
        logits = torch.matmul(keys, queries[..., start:start + chunk, :].transpose(-1, -2))  # [..., sampled, n]
        if bias is not None:
            logits = logits + bias
        if chunk >= n_query:
            return logits.softmax(dim=-2).mean(dim=-1)
        part = logits.softmax(dim=-2).sum(dim=-1)
        total = part if total is None else total.add_(part)
    return total / n_query


def concept_reader(pipe, index: HeadIndex, concept_set: ConceptSet, n_steps: int, *, soft: bool = False,
                   seed: int = 0):
    """(reader, concept stream or None) voting over `concept_set` on `pipe`, whatever its family.

    UNet: every word encoded alone and projected by each layer's to_k (`encode_concepts`, `project_keys`).
    SD3 / Flux: a layer's text keys depend on the block, so the words are carried through the text stream
    (`headscope.stream.ConceptStream`, the words of the trace's default encoder), each forward only the
    word the reader sampled per concept and row (`ConceptVotes.select_tokens`), and each block's concept
    keys are scored against its image queries. Trace with `concepts=stream` then.
    """
    from headscope.backbones import backbone_for

    backbone = backbone_for(pipe)
    if backbone.family == "unet":
        tokens = encode_concepts(pipe, concept_set)
        keys = project_keys(pipe, index, tokens.embeddings)
        return ConceptVotes(tokens, keys, index.n_heads, n_steps, soft=soft, seed=seed), None
    from headscope.stream import ConceptStream

    slot = next(slot for slot in backbone.text_slots(pipe, {})
                if slot.keys and slot.encoder == backbone.default_encoder)
    concept_set.token_ids(getattr(pipe, slot.tokenizer))  # validates: no empty or unknown word, naming its concept
    words = [word for concept in concept_set.names for word in concept_set.concepts[concept]]
    stream = ConceptStream(pipe, words, feature="joint-attention HRVs")
    lengths = [stop - start for start, stop in stream.spans]
    tokens = ConceptTokens(embeddings=None, spans=word_spans(concept_set, lengths))
    reader = ConceptVotes(tokens, None, index.n_heads, n_steps, soft=soft, seed=seed, n_layers=index.n_layers)
    stream.readers.append(reader)
    return reader, stream


# -- the reader ------------------------------------------------------------------------------------

class ConceptVotes(Hook):
    """Reader of the conditional queries: one vote per head and layer call for its most-attended concept.

    State: `step_votes` [steps, concepts, heads] (int64 counts; soft: float64 summed probabilities),
    added to across pipeline calls. Before each call, `begin(prompt_indices)` names the global prompt
    index of every image of the batch; word sampling then uses one generator per prompt, seeded by
    (seed, prompt index) only.

    Keys: on a UNet every layer's concept keys are fixed (`project_keys`) and the reader scores the
    layer's queries (`read_query`), with words drawn per layer call. On joint-attention models (SD3,
    Flux) they depend on the block and on the image: build the reader with `keys=None, n_layers=...`
    and give it to a `headscope.stream.ConceptStream` carrying the concept words. The stream asks
    `select_tokens` at each forward's first block for the words to carry (drawn per step and row: a
    token the first block did not carry has no keys later, so the choice holds for every block), and
    hands each block's image queries and the selected tokens' keys to `read_concepts` (scale
    1/sqrt(head_dim), as the model's attention).
    """

    rows = "cond"
    needs_outputs = False  # of the concept stream: keys and queries are enough

    def __init__(self, tokens: ConceptTokens, keys: dict | None, n_heads: int, n_steps: int, *, soft: bool = False,
                 seed: int = 0, n_layers: int | None = None):
        self.tokens, self.keys, self.soft, self.seed = tokens, keys, soft, seed
        self.n_layers = len(keys) if keys is not None else int(n_layers)
        self.n_concepts = len(tokens.spans)
        self.n_heads = n_heads
        self.n_words = torch.tensor(tokens.n_words, dtype=torch.float64)
        # Scaling the keys once costs nothing per call; the product is then the logits.
        self._scaled = None if keys is None else {layer: projected * scale
                                                  for layer, (projected, scale) in keys.items()}
        self._votes = torch.zeros(n_steps, self.n_concepts, n_heads, dtype=torch.float64 if soft else torch.int64)
        self._generators: list[torch.Generator] = []
        self._positions, self._valid = word_table(tokens.spans)
        self._most_tokens = int(self._valid.sum(dim=-1).amax(dim=-1).sum())
        self._concepts = torch.arange(self.n_concepts)
        self._drawn: dict[tuple[int, int], tuple] = {}  # joint: (call, step) -> the selection drawn, not yet scored
        self._call: int | None = None  # the call whose steps are pending
        self._tables: dict[int, StepTables] = {}  # per pending step
        # Pending steps' winners [steps, rows, heads] (-1: not voted), soft: summed scores [steps, heads, concepts].
        self._buffer: torch.Tensor | None = None
        self._kept: list = []  # (layer, step, queries, concept keys or None), not yet scored
        self._kept_bytes = 0
        self._head_ids: dict[tuple[int, ...], torch.Tensor] = {}
        self._stacks: dict[tuple[int, ...], tuple[torch.Tensor, dict]] = {}

    @property
    def step_votes(self) -> torch.Tensor:
        """[steps, concepts, heads] votes so far (the step being voted is counted first)."""
        self._flush()
        return self._votes

    def begin(self, prompt_indices) -> None:
        self._flush()
        self._generators = [torch.Generator().manual_seed(prompt_seed(self.seed, index, "words"))
                            for index in prompt_indices]
        self._drawn = {}

    def grow(self, n_steps: int) -> None:
        """Make room for `n_steps` UNet forwards per call (some schedulers run more than one per step)."""
        missing = n_steps - self._votes.shape[0]
        if missing > 0:
            self._votes = torch.cat([self._votes, self._votes.new_zeros(missing, *self._votes.shape[1:])])

    def wants_query(self, ctx: HookContext) -> bool:
        return self.keys is not None

    def read_query(self, ctx: HookContext, query: torch.Tensor) -> None:
        """query: [cond rows, heads, n_query, head_dim] of one cross-attention layer call."""
        self._step_tables(ctx, query.device)
        self._keep(ctx, query, None)

    def select_tokens(self, ctx: HookContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Joint models: the stream's tokens to carry through this forward, one sampled word per concept and
        row: (index [rows, the most tokens a row chose] long into the stream's tokens, valid, the same shape,
        False on padding). A row's words lie one after another in concept order (`packed_positions` says
        where), so a two-token word adds one token, not one per concept; only rows that chose fewer
        tokens than another are padded, at their end. Asked by the concept stream at the forward's first
        block, which may hand out the forward's blocks later (`headscope.stream.ConceptStream.flush`): the
        draw is kept for them."""
        key = (ctx.call, ctx.step)
        if key not in self._drawn:
            self._drawn.update(self._draw_ahead(ctx))
        positions, valid = self._drawn[key]  # [1, rows, concepts, longest]
        positions, valid = positions[0].flatten(1), valid[0].flatten(1)
        # A stable sort puts each row's real slots first, in slot order: where `packed_positions` puts them.
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
        width = int(valid.sum(dim=1).max())
        return positions.gather(1, order)[:, :width], valid.gather(1, order)[:, :width]

    @property
    def max_tokens(self) -> int:
        """The most tokens `select_tokens` chooses per row: one word per concept, packed, so each concept's longest
        word summed over concepts (hrv34: 34 plus one per concept with a two-token word)."""
        return self._most_tokens

    def records_done(self) -> None:
        """The concept stream reuses its records' tensors after this: score what was kept of them."""
        self._score_kept()

    def read_concepts(self, ctx: HookContext, block) -> None:
        """A joint block's image queries [rows, heads, L_img, head_dim] x the selected tokens' keys [rows,
        heads, T_sel, head_dim] (`headscope.stream.ConceptBlock`)."""
        self._step_tables(ctx, block.image_query.device)
        self._keep(ctx, block.image_query, block.concept_key)

    def _keep(self, ctx: HookContext, query, keys) -> None:
        """Keep a layer call's queries (and a joint block's concept keys) until they are scored."""
        self._kept.append((ctx.layer, ctx.step, query, keys))
        self._kept_bytes += query.numel() * query.element_size()
        if self._kept_bytes > VOTE_BUDGET_BYTES:
            self._score_kept()

    @torch.no_grad()
    def _score_kept(self) -> None:
        """Softmax over the sampled tokens, mean over pixels, mean over a word's tokens, and the winner (soft:
        the scores) of every kept layer call, of every kept step, one batch per query shape, into the buffer."""
        groups: dict[tuple, list] = {}
        for entry in self._kept:
            _, step, query, keys = entry
            # Joint: steps of one packed width may differ in their longest word, so in their tables' width.
            shape = (tuple(query.shape), query.dtype,
                     None if keys is None else (tuple(keys.shape), self._tables[step].flat.shape[-1]))
            groups.setdefault(shape, []).append(entry)
        self._kept, self._kept_bytes = [], 0
        for entries in groups.values():
            if entries[0][3] is not None:
                # A joint block's records in memory order: those of a batch of the concept stream are then
                # evenly spaced views of its arena, which `stacked` joins without copying them. (A UNet's
                # keep their run order, in which the layers' head ids are cached.)
                entries.sort(key=lambda entry: entry[2].data_ptr())
            layers = [layer for layer, _, _, _ in entries]
            steps = [step for _, step, _, _ in entries]
            queries = stacked([query for _, _, query, _ in entries]).float()  # [calls, rows, heads, n_query, d]
            tables, at = self._tables_of(layers, steps)  # at: [calls], each call's row of the joined tables
            if entries[0][3] is None:  # fixed keys, scaled already, stacked once per set of layers
                layer_keys, layer_ids = self._stacked_keys([layer.index for layer in layers])
                # [calls, rows, heads, sampled, d]
                chosen = layer_keys[layer_ids, :, tables.flat[at]].permute(0, 1, 3, 2, 4)
            else:  # a joint block's own keys (the selected tokens, packed), at the model's scale
                chosen = torch.stack([keys for _, _, _, keys in entries]).float() * queries.shape[-1] ** -0.5
                if tables.mean is not None:  # words of several tokens: each table slot's key (else one per slot)
                    flat = tables.flat[at][:, :, None, :, None]  # [calls, rows, 1, sampled, 1]
                    chosen = chosen.gather(3, flat.expand(*chosen.shape[:3], flat.shape[3], chosen.shape[-1]))
            probs = mean_softmax(chosen, queries, None if tables.bias is None else tables.bias[at])
            if tables.mean is not None:
                probs = torch.matmul(probs, tables.mean[at])  # [calls, rows, heads, concepts]
            heads = self._heads_of(layers, self._buffer.device).view(len(entries), -1)  # [calls, heads]
            at_steps = torch.tensor(steps, device=heads.device)[:, None].expand_as(heads)
            if self.soft:  # [steps, heads, concepts] += the calls' scores summed over rows
                self._buffer.index_put_((at_steps, heads), probs.sum(dim=1), accumulate=True)
            else:  # [steps, heads, rows] = the winners
                self._buffer.transpose(1, 2)[at_steps, heads] = probs.argmax(dim=-1).transpose(1, 2)

    def _tables_of(self, layers, steps: list[int]) -> tuple[StepTables, torch.Tensor]:
        """The tables of these calls' steps joined ([steps x draws, ...]) and each call's row in them: its
        step's draw for its layer on a UNet, its step's one draw on joint models."""
        distinct = list(dict.fromkeys(steps))
        position = {step: number for number, step in enumerate(distinct)}
        draws = self.n_layers if self.keys is not None else 1
        at = torch.tensor([position[step] * draws + (layer.index if self.keys is not None else 0)
                           for layer, step in zip(layers, steps)], device=self._buffer.device)
        return StepTables.join([self._tables[step] for step in distinct]), at

    def _stacked_keys(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The scaled keys of these layers' calls: the distinct layers' stacked, [layers, heads, tokens, head_dim]
        (cached), and each call's position in it, [calls, 1, 1]."""
        distinct = tuple(dict.fromkeys(index))
        if distinct not in self._stacks:
            stacked = torch.stack([self._scaled[layer] for layer in distinct])
            self._stacks[distinct] = (stacked, {layer: number for number, layer in enumerate(distinct)})
        stacked, position = self._stacks[distinct]
        return stacked, torch.tensor([position[layer] for layer in index], device=stacked.device)[:, None, None]

    def _heads_of(self, layers, device) -> torch.Tensor:
        """Flat head ids of these layers, in order: [sum of their heads] long (cached)."""
        key = tuple(layer.index for layer in layers)
        if key not in self._head_ids:
            self._head_ids[key] = torch.cat([torch.arange(layer.offset, layer.offset + layer.heads)
                                             for layer in layers]).to(device)
        return self._head_ids[key]

    def _flush(self) -> None:
        """Score what is kept and count the pending steps' votes into `step_votes` (one transfer)."""
        if self._buffer is None:
            return
        self._score_kept()
        buffer, self._buffer, self._tables, self._call = self._buffer, None, {}, None
        self.grow(buffer.shape[0])
        n_steps = buffer.shape[0]
        if self.soft:
            self._votes[:n_steps] += buffer.transpose(1, 2).double().cpu()
        else:
            # -1 marks heads that did not vote at a step (their layer did not run); they count for no concept.
            winners = buffer.transpose(1, 2) + 1  # [steps, heads, rows]
            counts = torch.zeros(*winners.shape[:2], self.n_concepts + 1, dtype=torch.long, device=buffer.device)
            counts.scatter_add_(2, winners, torch.ones_like(winners))  # [steps, heads, concepts + 1]
            self._votes[:n_steps] += counts[..., 1:].transpose(1, 2).cpu()

    def _draw(self, ctx: HookContext) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's words on a UNet: (positions, valid), each [draws, rows, concepts, longest]."""
        choices = self._choices(ctx)[0]  # [draws, rows, concepts]
        return self._positions[self._concepts, choices], self._valid[self._concepts, choices]

    def _draw_ahead(self, ctx: HookContext) -> dict:
        """Joint models: the words of this step and of the call's steps after it, drawn at once ({(call, step):
        (positions, valid)}, each [1, rows, concepts, the step's longest chosen word]). The same words as
        drawing step by step: each prompt's generator gives its values in the same order."""
        ahead = max(1, (ctx.n_steps or 0) - ctx.step)
        choices = self._choices(ctx, ahead)  # [ahead, 1, rows, concepts]
        positions, valid = self._positions[self._concepts, choices], self._valid[self._concepts, choices]
        longest = valid.sum(dim=-1).flatten(1).max(dim=1).values.tolist()
        return {(ctx.call, ctx.step + number): (positions[number, ..., :width], valid[number, ..., :width])
                for number, width in enumerate(longest)}

    def _step_tables(self, ctx: HookContext, device) -> StepTables:
        """The step's tables, made at its first layer call: its words drawn then on a UNet (per layer call),
        by `select_tokens` before on joint models. A new call counts the one before first."""
        if self._call is not None and ctx.call != self._call:
            self._flush()
        if ctx.step not in self._tables:
            if self.keys is not None:  # a UNet's step starts: score the step before (keep one step's queries)
                self._score_kept()
            drawn = self._drawn.pop((ctx.call, ctx.step), None)
            if drawn is None:  # a UNet's layer call (a joint forward's words were drawn by `select_tokens`)
                drawn = self._draw(ctx) if self.keys is not None else self._draw_ahead(ctx)[(ctx.call, ctx.step)]
            positions, valid = drawn
            if self.keys is None:  # a block's concept keys are the selection, packed as `select_tokens` packs it
                positions = packed_positions(valid)
            self._tables[ctx.step] = StepTables.build(positions, valid, device)
            self._call = ctx.call
            self._make_room(ctx, device)
        return self._tables[ctx.step]

    def _make_room(self, ctx: HookContext, device) -> None:
        """A buffer for every step of the call (grown when a scheduler runs more forwards than it said)."""
        if self._buffer is not None and self._buffer.shape[0] > ctx.step:
            return
        steps = max(ctx.step + 1, self._votes.shape[0], ctx.n_steps or 0)
        shape = (steps, self.n_heads, self.n_concepts) if self.soft else (steps, len(ctx.rows), self.n_heads)
        fresh = (torch.zeros(shape, device=device) if self.soft
                 else torch.full(shape, -1, dtype=torch.long, device=device))
        if self._buffer is not None:
            fresh[:self._buffer.shape[0]] = self._buffer
        self._buffer = fresh

    def _choices(self, ctx: HookContext, steps: int = 1) -> torch.Tensor:
        """The word sampled for each concept, per row, at this step and the `steps` - 1 after it: [steps, draws,
        rows, concepts], draws = every layer call of the step on a UNet, one for the whole forward on joint
        models (see the module docstring).

        Each prompt's generator draws one value per (step, draw, row of the prompt, concept), step- then
        draw-major, which on a UNet is the order of one draw per concept at every layer call.
        """
        n_draws = self.n_layers if self.keys is not None else 1
        prompts = [ctx.layout.prompt_index(ctx.layout.image(row)) for row in ctx.rows]
        per_prompt = {prompt: prompts.count(prompt) for prompt in dict.fromkeys(prompts)}
        draws = {prompt: torch.rand(steps, n_draws, count, self.n_concepts, generator=self._generators[prompt],
                                    dtype=torch.float64) for prompt, count in per_prompt.items()}
        seen = dict.fromkeys(per_prompt, 0)
        rows = []
        for prompt in prompts:
            rows.append(draws[prompt][:, :, seen[prompt]])  # [steps, draws, concepts]
            seen[prompt] += 1
        draws = rows[0][:, :, None] if len(rows) == 1 else torch.stack(rows, dim=2)  # [steps, draws, rows, concepts]
        return (draws * self.n_words).long().clamp(max=self.n_words.long() - 1)
