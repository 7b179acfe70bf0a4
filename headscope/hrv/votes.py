"""Concept keys and the vote reader: which concept each head's queries attend to most.

Cost: the reader runs beside every text-conditioned layer call, and a small torch op interleaved with a
model's own work costs several times what it costs back to back (cold caches: 30 against 4 ms per 100
calls of the embedded model's reader), so a layer call only keeps its queries (a reference, no op). At
the step's end, or once the kept queries' storage passes `VOTE_BUDGET_BYTES`, the layers of one query
shape are scored together, in one batch: the sampled words' keys, one product with the queries,
softmax, mean over pixels, per-word mean, argmax. What depends on the step alone (the sampled words,
their key positions, the padding mask and the per-word averaging matrix, `headscope.hrv.sampling`) is
made once per step for every layer, keys are scaled once, and the winners stay on the model's device
until the step is counted (one transfer per step).

Sampling: on a UNet one word per concept is drawn at every layer call (per (layer, row, concept)), as
the HRV paper does. On joint-attention models (SD3, Flux) one word per concept is drawn per (step,
row), the same for every block of that denoiser forward: a block's concept keys come from the text
stream as it stands there, so a token must be carried from the first block for its keys to exist in
a later one, and a choice per block would force carrying every word of the set. The concept stream
(`headscope.stream`) asks the reader for that choice (`select_tokens`) and carries only it: per row,
the concepts x the longest chosen word's tokens (padding hidden from attention), instead of every word
of the set (the shapes set: 23 tokens; hrv34: 340). Draws come from each prompt's own generator either
way, so a prompt's votes do not depend on the batch it is built in.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from headscope.concepts import ConceptSet
from headscope.heads import HeadIndex
from headscope.hrv.meta import prompt_seed
from headscope.hrv.sampling import StepTables, word_table
from headscope.processor import Hook, HookContext

_WORD_CHUNK = 64
VOTE_BUDGET_BYTES = 64 * 2**20  # kept queries' storage beyond this is scored at once (read at call time)


@dataclass
class ConceptTokens:
    """Every concept word's token embeddings, concatenated, and where each word's tokens lie.

    embeddings: [tokens, dim] text-encoder outputs of the words' own tokens (None when a concept
        stream carries them: joint-attention models, `headscope.stream`).
    spans[c][w]: (start, stop) of word w of concept c among those tokens.
    """

    embeddings: torch.Tensor | None
    spans: list[list[tuple[int, int]]]

    @property
    def n_words(self) -> list[int]:
        return [len(words) for words in self.spans]


@torch.no_grad()
def encode_concepts(pipe, concept_set: ConceptSet) -> ConceptTokens:
    """Encode each word alone with `pipe.encode_prompt` (the pipeline's own conditioning) and keep its
    own tokens' outputs."""
    concept_set.token_ids(pipe.tokenizer)  # validates: no empty or unknown word
    words = [word for concept in concept_set.names for word in concept_set.concepts[concept]]
    tokenizer = pipe.tokenizer
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    pieces = []
    for start in range(0, len(words), _WORD_CHUNK):
        chunk = words[start:start + _WORD_CHUNK]
        embeds = _encode(pipe, chunk)  # [words, keys, dim]
        for row, word in enumerate(chunk):
            ids = tokenizer(word, add_special_tokens=True).input_ids
            positions = [position for position, token in enumerate(ids) if token not in special]
            pieces.append(embeds[row, positions].float().cpu())
    return ConceptTokens(embeddings=torch.cat(pieces), spans=word_spans(concept_set, [len(p) for p in pieces]))


def word_spans(concept_set: ConceptSet, lengths: list[int]) -> list[list[tuple[int, int]]]:
    """spans[c][w] of consecutive words (concept-major) of `lengths` tokens each."""
    spans, cursor, length = [], 0, iter(lengths)
    for concept in concept_set.names:
        concept_spans = []
        for _ in concept_set.concepts[concept]:
            size = next(length)
            concept_spans.append((cursor, cursor + size))
            cursor += size
        spans.append(concept_spans)
    return spans


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


def _encode(pipe, words: list[str]) -> torch.Tensor:
    """Conditional prompt embeddings [len(words), keys, dim] exactly as the pipeline makes them."""
    output = pipe.encode_prompt(prompt=words, device=pipe.device, num_images_per_prompt=1,
                                do_classifier_free_guidance=False)
    return output[0]


@torch.no_grad()
def project_keys(pipe, index: HeadIndex, embeddings: torch.Tensor) -> dict[int, tuple[torch.Tensor, float]]:
    """Per layer: (keys [heads, tokens, head_dim] float32, attn.scale), through the layer's own to_k (UNet)."""
    keys = {}
    for layer in index.layers:
        attn = pipe.unet.get_submodule(layer.name)
        states = embeddings.to(device=attn.to_k.weight.device, dtype=attn.to_k.weight.dtype)[None]
        if attn.norm_cross:
            states = attn.norm_encoder_hidden_states(states)
        projected = attn.to_k(states)  # [1, tokens, heads * head_dim]
        projected = projected.view(1, -1, attn.heads, layer.head_dim).transpose(1, 2)  # [1, heads, tokens, head_dim]
        if attn.norm_k is not None:
            projected = attn.norm_k(projected)
        keys[layer.index] = (projected[0].float(), float(attn.scale))
    return keys


def concept_scores(query: torch.Tensor, keys: torch.Tensor, scale: float, positions: torch.Tensor,
                   valid: torch.Tensor) -> torch.Tensor:
    """Mean attention of each head's queries to each sampled concept word: [rows, heads, concepts].

    query: [rows, heads, n_query, head_dim]; keys: [heads, tokens, head_dim], or [rows, heads, tokens,
    head_dim] when every row has its own (joint attention); positions: [rows, concepts, word tokens]
    into keys (padded), valid: the same shape, False on padding.
    Softmax over all sampled concept tokens per head and pixel, mean over pixels, mean over a word's tokens.
    (The reader computes the same with its per-step tables; this is the plain statement.)
    """
    n_rows, n_concepts, length = positions.shape
    chosen = _gather_keys(keys, positions.flatten(1))  # [rows, heads, sampled, head_dim]
    scores = torch.matmul(query.float(), chosen.float().transpose(-1, -2)) * scale  # [rows, heads, n_query, sampled]
    if not valid.all():  # words of several tokens: padding takes no attention
        scores = scores.masked_fill(~valid.flatten(1)[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).mean(dim=2).unflatten(-1, (n_concepts, length))  # [rows, heads, concepts, length]
    weights = valid / valid.sum(dim=-1, keepdim=True)  # [rows, concepts, length], 1/len(word) on its tokens
    return (probs * weights[:, None]).sum(dim=-1)


def _gather_keys(keys: torch.Tensor, flat_positions: torch.Tensor) -> torch.Tensor:
    """Keys of the sampled tokens: [rows, heads, sampled, head_dim] from keys [heads, tokens, head_dim] or
    [rows, heads, tokens, head_dim] and flat_positions [rows, sampled]."""
    if keys.ndim == 3:
        if flat_positions.shape[0] == 1:
            return keys.index_select(1, flat_positions[0])[None]
        return keys[:, flat_positions].transpose(0, 1)
    if keys.shape[0] == 1:
        return keys[0].index_select(1, flat_positions[0])[None]
    rows = torch.arange(keys.shape[0], device=keys.device)[:, None]
    return keys[rows, :, flat_positions].transpose(1, 2)  # advanced indices first: [rows, sampled, heads, d]


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
        self._drawn_for: tuple[int, int] | None = None
        self._positions, self._valid = word_table(tokens.spans)
        self._concepts = torch.arange(self.n_concepts)
        self._sampled: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (positions, valid)
        self._tables: StepTables | None = None
        self._pending: tuple[int, torch.Tensor] | None = None  # (step, winners or summed scores) not yet counted
        self._kept: list = []  # (layer, queries, concept keys or None) of this step, not yet scored
        self._kept_bytes = 0
        self._head_ids: dict[tuple[int, ...], torch.Tensor] = {}
        self._stacks: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def step_votes(self) -> torch.Tensor:
        """[steps, concepts, heads] votes so far (the step being voted is counted first)."""
        self._flush()
        return self._votes

    def begin(self, prompt_indices) -> None:
        self._flush()
        self._generators = [torch.Generator().manual_seed(prompt_seed(self.seed, index, "words"))
                            for index in prompt_indices]
        self._drawn_for = None

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
        row: (index [rows, concepts x longest chosen word] long into the stream's tokens, valid, the same
        shape, False on padding). Asked by the concept stream at the forward's first block."""
        self._begin_step(ctx)
        positions, valid = self._sampled  # [1, rows, concepts, longest]
        return positions[0].flatten(1), valid[0].flatten(1)

    def read_concepts(self, ctx: HookContext, block) -> None:
        """A joint block's image queries [rows, heads, L_img, head_dim] x the selected tokens' keys [rows,
        heads, T_sel, head_dim] (`headscope.stream.ConceptBlock`)."""
        self._step_tables(ctx, block.image_query.device)
        self._keep(ctx, block.image_query, block.concept_key)

    def _keep(self, ctx: HookContext, query, keys) -> None:
        """Keep a layer call's queries (and a joint block's concept keys) until the step is scored."""
        self._kept.append((ctx.layer, query, keys))
        self._kept_bytes += query.numel() * query.element_size()
        if self._kept_bytes > VOTE_BUDGET_BYTES:
            self._score_kept()

    @torch.no_grad()
    def _score_kept(self) -> None:
        """Softmax over the sampled tokens, mean over pixels, mean over a word's tokens, and the winner (soft:
        the scores) of every kept layer call, one batch per query shape, into the step's buffer."""
        groups: dict[tuple, list] = {}
        for layer, query, keys in self._kept:
            shape = (tuple(query.shape), query.dtype, None if keys is None else tuple(keys.shape))
            groups.setdefault(shape, []).append((layer, query, keys))
        self._kept, self._kept_bytes = [], 0
        tables, buffer = self._tables, self._pending[1]
        for entries in groups.values():
            index = [layer.index for layer, _, _ in entries]
            at = index if self.keys is not None else slice(None)  # joint tables: one draw for every block
            queries = torch.stack([query for _, query, _ in entries]).float()  # [layers, rows, heads, n_query, d]
            if entries[0][2] is None:  # fixed keys, scaled already, stacked once per group of layers
                stacked, layer_ids = self._stacked_keys(index)  # [layers, heads, tokens, d], [layers, 1, 1]
                chosen = stacked[layer_ids, :, tables.flat[index]].permute(0, 1, 3, 2, 4)
            else:  # a joint block's own keys (the selected tokens, in table order), at the model's scale
                chosen = torch.stack([keys for _, _, keys in entries]).float() * queries.shape[-1] ** -0.5
            # Keys-major logits: a softmax over a short, strided dimension is several times faster on CPU than
            # over the last one when that is as short as the sampled tokens (6 for the shapes concepts).
            logits = torch.matmul(chosen, queries.transpose(-1, -2))  # [layers, rows, heads, sampled, n_query]
            if tables.bias is not None:
                logits = logits + tables.bias[at]
            probs = logits.softmax(dim=-2).mean(dim=-1)  # [layers, rows, heads, sampled]
            if tables.mean is not None:
                probs = torch.matmul(probs, tables.mean[at])  # [layers, rows, heads, concepts]
            heads = self._heads_of([layer for layer, _, _ in entries], buffer.device)
            if self.soft:
                buffer[heads] += probs.sum(dim=1).flatten(0, 1)  # [layers * heads, concepts]
            else:
                buffer[:, heads] = probs.argmax(dim=-1).transpose(0, 1).flatten(1)  # [rows, layers * heads]

    def _stacked_keys(self, index: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The scaled keys of these layers stacked, [layers, heads, tokens, head_dim], and [layers, 1, 1] positions
        into it (cached per group)."""
        key = tuple(index)
        if key not in self._stacks:
            stacked = torch.stack([self._scaled[layer] for layer in index])
            self._stacks[key] = (stacked, torch.arange(len(index), device=stacked.device)[:, None, None])
        return self._stacks[key]

    def _heads_of(self, layers, device) -> torch.Tensor:
        """Flat head ids of these layers, in order: [sum of their heads] long (cached)."""
        key = tuple(layer.index for layer in layers)
        if key not in self._head_ids:
            self._head_ids[key] = torch.cat([torch.arange(layer.offset, layer.offset + layer.heads)
                                             for layer in layers]).to(device)
        return self._head_ids[key]

    def _flush(self) -> None:
        """Count the pending step's votes into `step_votes` (one transfer per step)."""
        if self._pending is None:
            return
        self._score_kept()
        step, buffer = self._pending
        self._pending = None
        self.grow(step + 1)
        if self.soft:
            self._votes[step] += buffer.T.double().cpu()
        else:
            # -1 marks heads whose layer did not run this step; they count for no concept.
            counts = torch.nn.functional.one_hot(buffer + 1, self.n_concepts + 1).sum(dim=0)  # [heads, concepts + 1]
            self._votes[step] += counts[:, 1:].T.cpu()

    def _begin_step(self, ctx: HookContext) -> None:
        """Count the step before and draw this step's words: `_sampled` = (positions, valid), each [draws,
        rows, concepts, longest] (draws: the layers on a UNet; 1 on joint models, where the positions are
        the stream's tokens and longest is the longest chosen word, the stream carrying no more)."""
        self._flush()
        self._drawn_for, self._tables = (ctx.call, ctx.step), None
        choices = self._choices(ctx)  # [draws, rows, concepts]
        positions, valid = self._positions[self._concepts, choices], self._valid[self._concepts, choices]
        if self.keys is None:
            longest = int(valid.sum(dim=-1).max())
            positions, valid = positions[..., :longest], valid[..., :longest]
        self._sampled = (positions, valid)

    def _step_tables(self, ctx: HookContext, device) -> StepTables:
        """The step's tables, made at its first layer call (joint models: after `select_tokens` drew the words)."""
        if self._drawn_for != (ctx.call, ctx.step):
            self._begin_step(ctx)
        if self._tables is None:
            positions, valid = self._sampled
            if self.keys is None:  # a block's concept keys are the selection, in this order
                positions = torch.arange(valid[0, 0].numel()).view(valid.shape[2:]).expand(valid.shape)
            self._tables = StepTables.build(positions, valid, device)
            buffer = (torch.zeros(self.n_heads, self.n_concepts, device=device) if self.soft
                      else torch.full((len(ctx.rows), self.n_heads), -1, dtype=torch.long, device=device))
            self._pending = (ctx.step, buffer)
        return self._tables

    def _choices(self, ctx: HookContext) -> torch.Tensor:
        """The word sampled for each concept, per row: [draws, rows, concepts], draws = every layer call of the
        step on a UNet, one for the whole forward on joint models (see the module docstring).

        Each prompt's generator draws one value per (draw, row of the prompt, concept), draw-major, which
        on a UNet is the order of one draw per concept at every layer call.
        """
        n_draws = self.n_layers if self.keys is not None else 1
        prompts = [ctx.layout.prompt_index(ctx.layout.image(row)) for row in ctx.rows]
        per_prompt = {prompt: prompts.count(prompt) for prompt in dict.fromkeys(prompts)}
        draws = {prompt: torch.rand(n_draws, count, self.n_concepts, generator=self._generators[prompt],
                                    dtype=torch.float64) for prompt, count in per_prompt.items()}
        seen = dict.fromkeys(per_prompt, 0)
        rows = []
        for prompt in prompts:
            rows.append(draws[prompt][:, seen[prompt]])  # [draws, concepts]
            seen[prompt] += 1
        draws = torch.stack(rows, dim=1)  # [draws, rows, concepts]
        return (draws * self.n_words).long().clamp(max=self.n_words.long() - 1)
