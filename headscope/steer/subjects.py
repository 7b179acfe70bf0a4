"""Who a neglect method protects: subject words of a prompt (spaCy nouns or given), their concepts,
and head reweighting (no gradient), each subject token strengthened by its concept's HRV."""
from __future__ import annotations

from dataclasses import dataclass

from headscope.errors import HeadscopeError
from headscope.steer.scale import HeadScale, resolve_hrv, strengthen_factors, tokenize_prompts


# -- subjects -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Subject:
    """A subject word: its token positions in each prompt (first occurrence) and its concept (or None)."""

    word: str
    positions: tuple[tuple[int, ...], ...]
    concept: str | None = None


def parse_subjects(spec) -> dict[str, str | None]:
    """{word: concept or None} from "circle,square=shape", a list of words, or a dict."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return {str(word).strip().lower(): concept for word, concept in spec.items()}
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    subjects: dict[str, str | None] = {}
    for item in items:
        word, _, concept = str(item).partition("=")
        word, concept = word.strip().lower(), concept.strip() or None
        if not word or (concept is None and "=" in str(item)):
            raise HeadscopeError(f"bad subject {item!r}: write WORD or WORD=CONCEPT, e.g. circle,square=shape")
        subjects[word] = concept
    return subjects


def find_subjects(pipe, prompt, subjects=None, *, hrv=None, need_concepts: bool = False) -> list[Subject]:
    """Subjects of a prompt (or of every prompt of a batch, which must share the words).

    Args:
        subjects: words (with optional concepts, see `parse_subjects`); None: the prompt's subject
            nouns found by spaCy (`headscope.language.subject_nouns`, of the first prompt).
        hrv: the HRV whose concept set gives a word's default concept (the concept whose word list
            holds the word or its singular, e.g. circle -> "shape" for the shapes model).
        need_concepts: raise when a subject's concept cannot be found.
    """
    tokenizations = tokenize_prompts(pipe, prompt)
    wanted = parse_subjects(subjects)
    if not wanted:
        from headscope.language import subject_nouns

        wanted = dict.fromkeys(subject_nouns(tokenizations[0].prompt))
        if not wanted:
            raise HeadscopeError(f"found no subject nouns in {tokenizations[0].prompt!r}; name them with "
                                 "--subjects W,W")
    found = []
    for word, concept in wanted.items():
        positions = tuple(tuple(tokens.positions(word)) for tokens in tokenizations)
        if concept is None and hrv is not None:
            concept = default_concept(word, hrv)
        if need_concepts and concept is None:
            known = ", ".join(hrv.concepts) if hrv is not None else "?"
            raise HeadscopeError(f"no concept known for subject {word!r}; give it as --subjects {word}=CONCEPT "
                                 f"(this HRV has: {known})")
        if concept is not None and hrv is not None:
            concept = hrv.concept(concept)
        found.append(Subject(word, positions, concept))
    return found


def default_concept(word: str, hrv) -> str | None:
    """The concept of a subject noun: "shape" for a shapes-world shape when the HRV has that concept
    (the polysemous glyphs "rose" and "orange" are colour words in the concept set, but as subjects
    they are drawn objects); else the first concept whose stored words hold `word` or its singular;
    else None."""
    from headscope.shapes.world import SHAPES

    if "shape" in hrv.concepts and {word.lower(), word.lower().rstrip("s")} & set(SHAPES):
        return "shape"
    found = hrv.concepts_of(word)
    return found[0] if found else None


# -- (c) head reweighting --------------------------------------------------------------------------

def heads_hook(pipe, prompt, subjects=None, *, hrv=None, strength: float = 1.0, steps=None) -> HeadScale:
    """(c): HeadScale strengthening each subject token by its concept's HRV (value scaling, no gradient)."""
    return _heads(pipe, prompt, subjects, hrv, strength, steps)[0]


def _heads(pipe, prompt, subjects, hrv, strength, steps) -> tuple[HeadScale, list[Subject]]:
    hrv = resolve_hrv(pipe, hrv)
    found = find_subjects(pipe, prompt, subjects, hrv=hrv, need_concepts=True)
    factors = {subject.word: strengthen_factors(hrv.vector(subject.concept), strength) for subject in found}
    return HeadScale.for_words(pipe, prompt, factors, steps=steps), found


def _describe(subjects: list[Subject]) -> list[dict]:
    return [{"word": subject.word, "tokens": list(subject.positions[0]), "concept": subject.concept}
            for subject in subjects]
