"""Concept words as keys: each word encoded alone by the pipeline, projected by a UNet layer's `to_k`,
and the plain statement of the vote's scores (`concept_scores`), which the reader (`headscope.hrv.votes`)
computes in batches."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from headscope.concepts import ConceptSet
from headscope.heads import HeadIndex

_WORD_CHUNK = 64


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
