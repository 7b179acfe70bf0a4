"""Concept keys and the vote reader: which concept each head's queries attend to most."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from headscope.concepts import ConceptSet
from headscope.heads import HeadIndex
from headscope.hrv.meta import prompt_seed
from headscope.processor import Hook, HookContext

_WORD_CHUNK = 64


@dataclass
class ConceptTokens:
    """Every concept word's token embeddings, concatenated, and where each word's tokens lie.

    embeddings: [tokens, dim] text-encoder outputs of the words' own tokens.
    spans[c][w]: (start, stop) of word w of concept c in `embeddings`.
    """

    embeddings: torch.Tensor
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
    spans, cursor, piece = [], 0, iter(pieces)
    for concept in concept_set.names:
        concept_spans = []
        for _ in concept_set.concepts[concept]:
            length = next(piece).shape[0]
            concept_spans.append((cursor, cursor + length))
            cursor += length
        spans.append(concept_spans)
    return ConceptTokens(embeddings=torch.cat(pieces), spans=spans)


def _encode(pipe, words: list[str]) -> torch.Tensor:
    """Conditional prompt embeddings [len(words), keys, dim] exactly as the pipeline makes them."""
    output = pipe.encode_prompt(prompt=words, device=pipe.device, num_images_per_prompt=1,
                                do_classifier_free_guidance=False)
    return output[0]


@torch.no_grad()
def project_keys(pipe, index: HeadIndex, embeddings: torch.Tensor) -> dict[int, tuple[torch.Tensor, float]]:
    """Per layer: (keys [heads, tokens, head_dim] float32, attn.scale), through the layer's own to_k."""
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

    query: [rows, heads, n_query, head_dim]; keys: [heads, tokens, head_dim]; positions: [rows, concepts,
    word tokens] into keys (padded), valid: the same shape, False on padding.
    Softmax over all sampled concept tokens per head and pixel, mean over pixels, mean over a word's tokens.
    """
    n_rows, n_concepts, length = positions.shape
    chosen = keys[:, positions.flatten()].unflatten(1, (n_rows, n_concepts * length)).transpose(0, 1)
    scores = torch.matmul(query.float(), chosen.transpose(-1, -2)) * scale  # [rows, heads, n_query, sampled]
    if not valid.all():  # words of several tokens: padding takes no attention
        scores = scores.masked_fill(~valid.flatten(1)[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).mean(dim=2).unflatten(-1, (n_concepts, length))  # [rows, heads, concepts, length]
    weights = valid / valid.sum(dim=-1, keepdim=True)  # [rows, concepts, length], 1/len(word) on its tokens
    return (probs * weights[:, None]).sum(dim=-1)


# -- the reader ------------------------------------------------------------------------------------

class ConceptVotes(Hook):
    """Reader of the conditional queries: one vote per head and layer call for its most-attended concept.

    State: `step_votes` [steps, concepts, heads] (int64 counts; soft: float64 summed probabilities),
    added to across pipeline calls. Before each call, `begin(prompt_indices)` names the global prompt
    index of every image of the batch; word sampling then uses one generator per prompt, seeded by
    (seed, prompt index) only.
    """

    rows = "cond"

    def __init__(self, tokens: ConceptTokens, keys: dict, n_heads: int, n_steps: int, *, soft: bool = False,
                 seed: int = 0):
        self.tokens, self.keys, self.soft, self.seed = tokens, keys, soft, seed
        self.n_words = torch.tensor(tokens.n_words, dtype=torch.float64)
        self.step_votes = torch.zeros(n_steps, len(tokens.spans), n_heads,
                                      dtype=torch.float64 if soft else torch.int64)
        self.n_layers = len(keys)
        self._generators: list[torch.Generator] = []
        self._drawn_for: tuple[int, int] | None = None
        self._positions, self._valid = _word_table(tokens)
        self._concepts = torch.arange(len(tokens.spans))

    def begin(self, prompt_indices) -> None:
        self._generators = [torch.Generator().manual_seed(prompt_seed(self.seed, index, "words"))
                            for index in prompt_indices]
        self._drawn_for = None

    def wants_query(self, ctx: HookContext) -> bool:
        return True

    def _choices(self, ctx: HookContext) -> torch.Tensor:
        """The word sampled for each concept at this layer call, per row: [rows, concepts] long.

        At a step's first layer call each prompt's generator draws one value per (layer, row of the
        prompt, concept), layer-major, which is the order of one draw per concept at every layer call.
        """
        if self._drawn_for != (ctx.call, ctx.step):
            self._drawn_for = (ctx.call, ctx.step)
            prompts = [ctx.layout.prompt_index(ctx.layout.image(row)) for row in ctx.rows]
            per_prompt = {prompt: prompts.count(prompt) for prompt in dict.fromkeys(prompts)}
            draws = {prompt: torch.rand(self.n_layers, count, len(self.tokens.spans), generator=self._generators[prompt],
                                        dtype=torch.float64) for prompt, count in per_prompt.items()}
            seen = dict.fromkeys(per_prompt, 0)
            rows = []
            for prompt in prompts:
                rows.append(draws[prompt][:, seen[prompt]])  # [layers, concepts]
                seen[prompt] += 1
            self._draws = torch.stack(rows, dim=1)  # [layers, rows, concepts]
        draws = self._draws[ctx.layer.index]
        return (draws * self.n_words).long().clamp(max=self.n_words.long() - 1)

    def grow(self, n_steps: int) -> None:
        """Make room for `n_steps` UNet forwards per call (some schedulers run more than one per step)."""
        missing = n_steps - self.step_votes.shape[0]
        if missing > 0:
            extra = self.step_votes.new_zeros(missing, *self.step_votes.shape[1:])
            self.step_votes = torch.cat([self.step_votes, extra])

    @torch.no_grad()
    def read_query(self, ctx: HookContext, query: torch.Tensor) -> None:
        """query: [cond rows, heads, n_query, head_dim] of one layer call."""
        self.grow(ctx.step + 1)
        keys, scale = self.keys[ctx.layer.index]
        choices = self._choices(ctx)  # [rows, concepts]
        positions = self._positions[self._concepts, choices]  # [rows, concepts, longest word]
        valid = self._valid[self._concepts, choices]
        scores = concept_scores(query.to(keys.device), keys, scale, positions.to(keys.device),
                                valid.to(keys.device)).cpu()  # [rows, heads, concepts]
        heads = slice(ctx.layer.offset, ctx.layer.offset + ctx.layer.heads)
        if self.soft:
            self.step_votes[ctx.step, :, heads] += scores.sum(dim=0).T.double()
        else:
            winners = torch.nn.functional.one_hot(scores.argmax(dim=-1), len(self.tokens.spans))  # [rows, heads, concepts]
            self.step_votes[ctx.step, :, heads] += winners.sum(dim=0).T


def _word_table(tokens: ConceptTokens) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions of every word, padded: (positions, valid), each [concepts, most words, longest word]."""
    most = max(tokens.n_words)
    longest = max(stop - start for spans in tokens.spans for start, stop in spans)
    positions = torch.zeros(len(tokens.spans), most, longest, dtype=torch.long)
    valid = torch.zeros(len(tokens.spans), most, longest, dtype=torch.bool)
    for concept, spans in enumerate(tokens.spans):
        for word, (start, stop) in enumerate(spans):
            positions[concept, word, :stop - start] = torch.arange(start, stop)
            valid[concept, word, :stop - start] = True
    return positions, valid
