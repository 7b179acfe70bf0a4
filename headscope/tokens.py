"""Words <-> token positions, through the pipeline's own tokenizer.

A prompt's words are runs of letters/digits (with inner ' or -, as in "dog's" or "ice-cream") and
single punctuation marks. Each word maps to the positions of its tokens in the text encoder's input
(position 0 is the start token), which are also the key positions of every cross-attention layer.
Fast tokenizers give character offsets for each token; for others each word is encoded on its own
and the pieces are checked against the whole prompt's encoding.

A word the tokenizer can only represent by its unknown token (a word outside a word-level
vocabulary) is refused: the model would draw something for a token that means nothing, under the
word's name. `allow_unknown=True`, or the block `with allow_unknown_words():`, lets it through.
Byte-level BPE tokenizers (CLIP) and SentencePiece ones with every letter (T5) never need the
unknown token for a plain word.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from headscope.errors import HeadscopeError

WORD_PATTERN = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]")
VOCABULARY_SHOWN = 60  # plain words listed when a word is refused; a larger vocabulary is cut short
_ALLOW_UNKNOWN: ContextVar[bool] = ContextVar("headscope_allow_unknown_words", default=False)
_TOKEN_MARKERS = re.compile(r"^(?:Ġ|▁|##)|</w>$")


@contextmanager
def allow_unknown_words(allowed: bool = True):
    """Inside the block, `tokenize` (and so every trace and command) accepts words that become the
    tokenizer's unknown token, unless a call says otherwise."""
    token = _ALLOW_UNKNOWN.set(allowed)
    try:
        yield
    finally:
        _ALLOW_UNKNOWN.reset(token)


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


def tokenize(tokenizer, prompt: str, max_length: int | None = None, *,
             allow_unknown: bool | None = None) -> Tokenization:
    """Tokenize `prompt` and map each word to its token positions.

    Args:
        tokenizer: the pipeline's tokenizer (a transformers tokenizer).
        prompt: the text.
        max_length: the text encoder's limit in tokens, start/end tokens included; default
            `tokenizer.model_max_length`. A longer prompt raises HeadscopeError (no silent truncation).
        allow_unknown: accept words that become the tokenizer's unknown token. False raises
            HeadscopeError naming them and listing the vocabulary's words; None (default) follows the
            enclosing `allow_unknown_words()` block, else False.
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
    if not (_ALLOW_UNKNOWN.get() if allow_unknown is None else allow_unknown):
        _refuse_unknown(tokenizer, input_ids, words)
    return Tokenization(prompt=prompt, input_ids=tuple(input_ids),
                        tokens=tuple(tokenizer.convert_ids_to_tokens(input_ids)),
                        words=words, max_length=max_length)


def _refuse_unknown(tokenizer, input_ids: list[int], words) -> None:
    """HeadscopeError naming the words whose tokens include the unknown token, with the known words."""
    unknown_id = getattr(tokenizer, "unk_token_id", None)
    if unknown_id is None:
        return
    unknown = list(dict.fromkeys(word.text for word in words
                                 if any(input_ids[position] == unknown_id for position in word.positions)))
    if not unknown:
        return
    known = known_words(tokenizer)
    shown = ", ".join(known[:VOCABULARY_SHOWN])
    more = f" and {len(known) - VOCABULARY_SHOWN:,} more" if len(known) > VOCABULARY_SHOWN else ""
    names = ", ".join(repr(word) for word in unknown)
    raise HeadscopeError(f"{names} {'is' if len(unknown) == 1 else 'are'} not in this model's vocabulary (its "
                         f"tokenizer would feed the unknown token {tokenizer.unk_token}); the words it knows: "
                         f"{shown or '(none)'}{more}. Rephrase with those words, or pass --allow-unknown-words "
                         "(API: allow_unknown=True) to use the unknown token anyway")


def known_words(tokenizer) -> list[str]:
    """The plain words of a tokenizer's vocabulary, sorted: whole-word tokens made of letters or digits,
    BPE / SentencePiece markers removed, special tokens left out."""
    special = set(getattr(tokenizer, "all_special_tokens", ()))
    words = {_TOKEN_MARKERS.sub("", token) for token in tokenizer.get_vocab() if token not in special}
    return sorted(word for word in words if word.isalnum())


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
