"""Words <-> token positions, through the pipeline's own tokenizer.

A prompt's words are runs of letters/digits (with inner ' or -, as in "dog's" or "ice-cream") and
single punctuation marks. Each word maps to the positions of its tokens in the text encoder's input
(position 0 is the start token), which are also the key positions of every cross-attention layer.
Fast tokenizers give character offsets for each token; for others each word is encoded on its own
and the pieces are checked against the whole prompt's encoding.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from headscope.errors import HeadscopeError

WORD_PATTERN = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")


@dataclass(frozen=True)
class Word:
    """One word of a prompt: its text, character span and token positions (0 = start token)."""

    text: str
    start: int
    end: int
    positions: tuple[int, ...]

    @property
    def is_punctuation(self) -> bool:
        return not any(char.isalnum() for char in self.text)


@dataclass(frozen=True)
class Tokenization:
    """A prompt as the text encoder sees it: token ids (with start/end tokens, no padding) and words."""

    prompt: str
    input_ids: tuple[int, ...]
    tokens: tuple[str, ...]
    words: tuple[Word, ...]
    max_length: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def word_texts(self, punctuation: bool = False) -> list[str]:
        """The prompt's words in order (punctuation marks left out unless asked for)."""
        return [word.text for word in self.words if punctuation or not word.is_punctuation]

    def positions(self, word: str, occurrence: int = 0) -> list[int]:
        """Token positions of the `occurrence`-th (0-based) match of `word` in the prompt.

        `word` matches case-insensitively, whole words only; it may be several words ("hot dog"),
        which then match consecutive prompt words.
        """
        matches = self._matches(word)
        if not matches:
            raise HeadscopeError(f"{word!r} is not in the prompt {self.prompt!r}; its words are: "
                                 f"{', '.join(self.word_texts()) or '(none)'}")
        if not 0 <= occurrence < len(matches):
            raise HeadscopeError(f"{word!r} occurs {len(matches)} time(s) in the prompt; "
                                 f"occurrence={occurrence} is out of range (occurrences count from 0)")
        return matches[occurrence]

    def _matches(self, word: str) -> list[list[int]]:
        query = [part.lower() for part in WORD_PATTERN.findall(word)]
        texts = [entry.text.lower() for entry in self.words]
        found = []
        for start in range(len(texts) - len(query) + 1):
            if query and texts[start:start + len(query)] == query:
                span = self.words[start:start + len(query)]
                found.append(sorted({position for entry in span for position in entry.positions}))
        return found


def tokenize(tokenizer, prompt: str, max_length: int | None = None) -> Tokenization:
    """Tokenize `prompt` and map each word to its token positions.

    Args:
        tokenizer: the pipeline's tokenizer (a transformers tokenizer).
        prompt: the text.
        max_length: the text encoder's limit in tokens, start/end tokens included; default
            `tokenizer.model_max_length`. A longer prompt raises HeadscopeError (no silent truncation).
    """
    max_length = max_length or tokenizer.model_max_length
    input_ids = list(tokenizer(prompt, add_special_tokens=True, verbose=False).input_ids)
    if len(input_ids) > max_length:
        raise HeadscopeError(f"prompt has {len(input_ids)} tokens; the text encoder takes at most "
                             f"{max_length} (headscope does not truncate: shorten the prompt)")
    spans = [(match.group(), match.start(), match.end()) for match in WORD_PATTERN.finditer(prompt)]
    if getattr(tokenizer, "is_fast", False):
        positions = _positions_from_offsets(tokenizer, prompt, spans)
    else:
        positions = _positions_by_word(tokenizer, prompt, input_ids, spans)
    words = tuple(Word(text, start, end, tuple(pos)) for (text, start, end), pos in zip(spans, positions))
    return Tokenization(prompt=prompt, input_ids=tuple(input_ids),
                        tokens=tuple(tokenizer.convert_ids_to_tokens(input_ids)),
                        words=words, max_length=max_length)


def _positions_from_offsets(tokenizer, prompt: str, spans) -> list[list[int]]:
    """Token positions per word span, from the fast tokenizer's character offsets."""
    offsets = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True).offset_mapping
    return [[position for position, (first, last) in enumerate(offsets)
             if last > first and first < end and last > start]
            for _, start, end in spans]


def _positions_by_word(tokenizer, prompt: str, input_ids: list[int], spans) -> list[list[int]]:
    """Token positions per word span, by encoding each word alone (slow tokenizers)."""
    body = list(tokenizer(prompt, add_special_tokens=False).input_ids)
    prefix = _find(input_ids, body)
    positions, cursor, pieces = [], prefix, []
    for text, _, _ in spans:
        word_ids = list(tokenizer(text, add_special_tokens=False).input_ids)
        positions.append(list(range(cursor, cursor + len(word_ids))))
        pieces.extend(word_ids)
        cursor += len(word_ids)
    if pieces != body:
        raise HeadscopeError("cannot align words to tokens with this tokenizer (its word-by-word "
                             "encoding differs from the prompt's); use a fast tokenizer")
    return positions


def _find(sequence: list[int], part: list[int]) -> int:
    for start in range(len(sequence) - len(part) + 1):
        if sequence[start:start + len(part)] == part:
            return start
    raise HeadscopeError("cannot locate the prompt's tokens among the encoder input ids")
