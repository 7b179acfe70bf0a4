"""The vote reader's word tables: every concept word's token positions, and what one step's sampled words
mean for scoring (key positions, padding bias, per-word mean), made once per step for every layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepTables:
    """What the sampled words of one step mean for every layer (on the model's device).

    flat: [layers, rows, sampled] key positions of the sampled words' tokens (sampled = concepts x longest word).
    bias: [layers, rows, 1, sampled, 1] 0 on real tokens, -inf on padding; None when no word is padded.
    mean: [layers, rows, sampled, concepts] 1/len(word) on a word's tokens; None when every word is one token.
    On joint models one draw serves every block: layers is 1 (the tables broadcast over blocks), and
    flat points into the selection, whose tokens are the chosen words' one after another
    (`packed_positions`; longest = the longest chosen word).
    """

    flat: torch.Tensor
    bias: torch.Tensor | None
    mean: torch.Tensor | None

    @classmethod
    def build(cls, positions: torch.Tensor, valid: torch.Tensor, device) -> "StepTables":
        """positions, valid: [layers (1 on joint models), rows, concepts, longest word] -> the step's tables."""
        flat = positions.flatten(2).to(device)
        if valid.shape[-1] == 1:
            return cls(flat=flat, bias=None, mean=None)
        bias = None
        if not valid.all():
            bias = torch.zeros(valid.shape).masked_fill(~valid, float("-inf")).flatten(2)[:, :, None, :, None]
            bias = bias.to(device)
        weights = valid / valid.sum(dim=-1, keepdim=True)  # [layers, rows, concepts, longest]
        # mean[l, r, c * longest + j, c'] = weights[l, r, c, j] if c == c' else 0
        mean = torch.diag_embed(weights.transpose(-1, -2)).transpose(-3, -2).flatten(2, 3)
        return cls(flat=flat, bias=bias, mean=mean.float().to(device))

    @classmethod
    def join(cls, tables: list["StepTables"]) -> "StepTables":
        """Several steps' tables of one width, one after another along the first dimension (a step without
        padding gets a zero bias when another has some; `mean` is None for all or none of them: it is None
        exactly when the width is one token per concept)."""
        if len(tables) == 1:
            return tables[0]
        flat = torch.cat([table.flat for table in tables])
        bias = None
        if any(table.bias is not None for table in tables):
            bias = torch.cat([table.bias if table.bias is not None else
                              table.flat.new_zeros(table.flat.shape, dtype=torch.float32)[:, :, None, :, None]
                              for table in tables])
        mean = None if tables[0].mean is None else torch.cat([table.mean for table in tables])
        return cls(flat=flat, bias=bias, mean=mean)


def word_table(spans: list[list[tuple[int, int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token positions of every word, padded: (positions, valid), each [concepts, most words, longest word].

    spans[c][w]: (start, stop) of word w of concept c among the concept tokens (`ConceptTokens.spans`).
    """
    most = max(len(words) for words in spans)
    longest = max(stop - start for words in spans for start, stop in words)
    positions = torch.zeros(len(spans), most, longest, dtype=torch.long)
    valid = torch.zeros(len(spans), most, longest, dtype=torch.bool)
    for concept, words in enumerate(spans):
        for word, (start, stop) in enumerate(words):
            positions[concept, word, :stop - start] = torch.arange(start, stop)
            valid[concept, word, :stop - start] = True
    return positions, valid


def packed_positions(valid: torch.Tensor) -> torch.Tensor:
    """Where each chosen word's tokens lie when a row's real tokens are packed one after another in slot order:
    valid [..., rows, concepts, longest] -> positions, the same shape (the number of real slots before each
    real slot of its row; padding slots get their row's last real position before them, or 0, and are
    hidden by the tables' bias)."""
    flat = valid.flatten(-2)
    return (flat.cumsum(dim=-1) - 1).clamp_min(0).view(valid.shape)
