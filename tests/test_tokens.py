"""Words <-> tokens through the pipeline's own tokenizer."""
import pytest

from headscope.testing import MAX_TOKENS
from headscope import HeadscopeError
from headscope.tokens import tokenize


@pytest.fixture(scope="module")
def tokenizer(tiny_sd):
    return tiny_sd.tokenizer


def test_single_token_words_map_to_their_position(tokenizer):
    tokens = tokenize(tokenizer, "a red dog")
    assert tokens.tokens == ("<|startoftext|>", "a</w>", "red</w>", "dog</w>", "<|endoftext|>")
    assert tokens.positions("dog") == [3]


def test_multi_token_word_maps_to_all_its_tokens(tokenizer):
    tokens = tokenize(tokenizer, "a giraffe on a tree")
    assert tokens.positions("giraffe") == [2, 3]
    assert [tokens.tokens[position] for position in (2, 3)] == ["gir", "affe</w>"]
    assert tokens.positions("tree") == [6]


def test_repeated_words_are_picked_by_occurrence(tokenizer):
    tokens = tokenize(tokenizer, "a dog and a cat and a dog")
    assert tokens.positions("dog") == [2]
    assert tokens.positions("dog", occurrence=1) == [8]
    assert tokens.positions("a", occurrence=2) == [7]
    with pytest.raises(HeadscopeError, match="occurs 2 time"):
        tokens.positions("dog", occurrence=2)


def test_matching_ignores_case_and_punctuation(tokenizer):
    tokens = tokenize(tokenizer, "A Dog, a cat.")
    assert tokens.positions("dog") == tokens.positions("DOG") == [2]
    assert tokens.positions("cat") == [5]
    assert tokens.word_texts() == ["A", "Dog", "a", "cat"]
    assert tokens.positions(",") == [3]


def test_several_words_match_consecutive_prompt_words(tokenizer):
    tokens = tokenize(tokenizer, "a red dog and a blue cat")
    assert tokens.positions("blue cat") == [6, 7]


def test_unknown_word_lists_the_prompt_words(tokenizer):
    tokens = tokenize(tokenizer, "a red dog")
    with pytest.raises(HeadscopeError, match=r"'zebra' is not in the prompt 'a red dog'; its words are: a, red, dog"):
        tokens.positions("zebra")
    with pytest.raises(HeadscopeError):
        tokens.positions("do")  # whole words only


def test_long_prompt_is_refused_not_truncated(tokenizer):
    prompt = " ".join(["dog"] * MAX_TOKENS)
    with pytest.raises(HeadscopeError, match=f"prompt has {MAX_TOKENS + 2} tokens; the text encoder takes "
                                             f"at most {MAX_TOKENS}"):
        tokenize(tokenizer, prompt)


def test_word_by_word_alignment_agrees_with_offsets(tokenizer, monkeypatch):
    prompt = "A giraffe, a dog and a zebra!"
    fast = tokenize(tokenizer, prompt)
    monkeypatch.setattr(type(tokenizer), "is_fast", property(lambda self: False))
    slow = tokenize(tokenizer, prompt)
    assert [word.positions for word in slow.words] == [word.positions for word in fast.words]
    assert fast.positions("zebra") == [9, 10, 11, 12, 13]  # unknown to the vocabulary: one token per letter
