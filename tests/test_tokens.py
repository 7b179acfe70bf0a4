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


# -- words the tokenizer cannot represent ------------------------------------------------------

PLAIN_WORDS = ["dragon", "zebra", "Castle", "xylophone", "qwertz", "ice-cream", "dog's", "a1b2"]


@pytest.fixture(scope="module")
def word_level():
    from headscope.shapes.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="module")
def sentencepiece():
    """A T5-style SentencePiece (unigram) tokenizer: every ASCII letter and digit, a few whole words, <unk>."""
    import string

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{word}", -1.0) for word in ("a", "red", "dog", "circle")]
    pieces += [(char, -5.0) for char in string.ascii_letters + string.digits + "'-.,"]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=64)


def test_a_word_outside_a_word_level_vocabulary_is_refused_with_the_vocabulary(word_level):
    with pytest.raises(HeadscopeError) as refused:
        tokenize(word_level, "a red dragon")
    message = str(refused.value)
    assert message.startswith("'dragon' is not in this model's vocabulary")
    assert "the words it knows: a, an, and, at, blue, bottom," in message and "--allow-unknown-words" in message
    assert "<|unk|>" not in message.split("knows:")[1] and "\n" not in message


def test_every_unknown_word_is_named_once(word_level):
    with pytest.raises(HeadscopeError, match=r"^'dragon', 'castle' are not in this model's vocabulary"):
        tokenize(word_level, "a dragon and a castle and a dragon")


def test_unknown_words_pass_when_allowed(word_level):
    from headscope.tokens import allow_unknown_words

    tokens = tokenize(word_level, "a red dragon", allow_unknown=True)
    assert tokens.input_ids[tokens.positions("dragon")[0]] == word_level.unk_token_id
    with allow_unknown_words():
        assert tokenize(word_level, "a red dragon").positions("dragon") == [3]
        with pytest.raises(HeadscopeError):
            tokenize(word_level, "a red dragon", allow_unknown=False)  # an explicit argument wins
    with pytest.raises(HeadscopeError):
        tokenize(word_level, "a red dragon")  # the block is over


def test_known_words_are_sorted_plain_words_without_special_tokens(word_level, tokenizer):
    from headscope.tokens import known_words

    words = known_words(word_level)
    assert words == sorted(words) and "circle" in words and "." not in words
    assert not {"<|startoftext|>", "<|endoftext|>", "<|unk|>"} & set(words)
    assert {"dog", "circle", "a"} <= set(known_words(tokenizer)) and "<|endoftext|>" not in known_words(tokenizer)


@pytest.mark.parametrize("word", PLAIN_WORDS)
def test_bpe_tokenizers_never_need_the_unknown_token_for_a_plain_word(tokenizer, sentencepiece, word):
    for bpe in (tokenizer, sentencepiece):  # CLIP byte-level BPE; T5-style SentencePiece
        tokens = tokenize(bpe, f"a red {word} and a dog")
        assert bpe.unk_token_id not in [tokens.input_ids[p] for p in tokens.positions(word)]


def test_a_sentencepiece_character_outside_the_vocabulary_is_refused(sentencepiece):
    with pytest.raises(HeadscopeError, match=r"^'€' is not in this model's vocabulary .* the words it knows: "
                                             r"0, 1, 2, .* and \d+ more"):
        tokenize(sentencepiece, "a red dog for 5 €")
