"""Subject nouns with spaCy."""
import pytest

from headscope import HeadscopeError, language


def test_subject_nouns_of_a_two_object_prompt():
    assert language.subject_nouns("a red circle and a blue square") == ["circle", "square"]


def test_place_and_picture_nouns_are_not_subjects():
    assert language.nouns("a photo of a dog in the center") == ["photo", "dog", "center"]
    assert language.subject_nouns("a photo of a dog in the center") == ["dog"]


def test_repeated_nouns_are_listed_once_lower_cased():
    assert language.subject_nouns("A Circle and a circle") == ["circle"]


def test_a_missing_spacy_model_is_a_clear_error(monkeypatch):
    import spacy

    def refuse(name):
        raise OSError(f"[E050] Can't find model '{name}'")

    language.load_spacy.cache_clear()
    monkeypatch.setattr(spacy, "load", refuse)
    with pytest.raises(HeadscopeError, match="no spaCy English model installed"):
        language.nouns("a dog")
    language.load_spacy.cache_clear()
