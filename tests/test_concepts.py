"""ConceptSet: shipped sets, user files (JSON and the paper's CSV), validation, hashing, tokenizer checks."""
import json
from pathlib import Path

import pytest

from headscope import HeadscopeError
from headscope.concepts import ConceptSet

ANCHORS = Path(__file__).resolve().parent / "data" / "hrv"  # the official HRV data, Apache-2.0


def test_shipped_sets_load_by_name():
    shapes, hrv34 = ConceptSet.load("shapes"), ConceptSet.load("hrv34")
    assert shapes.names == ["color", "shape", "size", "position", "count", "fill"]
    assert shapes["shape"][:2] == ["circle", "oval"]
    assert len(hrv34) == 34 and all(len(words) == 10 for words in hrv34.concepts.values())
    assert hrv34.names[17] == "Color" and "Apache-2.0" in hrv34.license


@pytest.mark.skipif(not (ANCHORS / "concepts_34x10.csv").is_file(), reason="shared/anchors not present")
def test_the_papers_csv_reads_as_the_shipped_hrv34_set():
    from_csv = ConceptSet.load(ANCHORS / "concepts_34x10.csv")
    assert from_csv.concepts == ConceptSet.load("hrv34").concepts
    assert from_csv.hash() == ConceptSet.load("hrv34").hash()


def test_a_users_json_file_loads_in_file_order(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"concepts": {"b": ["dog", "cat"], "a": ["red"]}}))
    concepts = ConceptSet.load(path)
    assert concepts.name == "mine" and concepts.names == ["b", "a"]


def test_hash_depends_on_content_only():
    one = ConceptSet("one", {"color": ["red", "blue"]}, source="x")
    two = ConceptSet("two", {"color": ["red", "blue"]}, source="y")
    assert one.hash() == two.hash() and len(one.hash()) == 64
    assert one.hash() != ConceptSet("one", {"color": ["blue", "red"]}).hash()


def test_subset_keeps_the_given_order_and_refuses_unknown_names():
    shapes = ConceptSet.load("shapes")
    assert shapes.subset(["size", "COLOR"]).names == ["size", "color"]
    with pytest.raises(HeadscopeError, match="unknown concept 'colour'.*known: color, shape, size"):
        shapes.subset(["colour"])


@pytest.mark.parametrize("concepts, message", [
    ({"color": []}, "'color' of 'bad' is empty"),
    ({"color": ["red", ""]}, "is empty"),
    ({}, "has no concepts"),
    ({"color": ["red", "red"]}, "lists red twice"),
])
def test_invalid_sets_are_refused(concepts, message):
    with pytest.raises(HeadscopeError, match=message):
        ConceptSet("bad", concepts)


def test_a_json_file_naming_a_concept_twice_is_refused(tmp_path):
    path = tmp_path / "twice.json"
    path.write_text('{"concepts": {"color": ["red"], "color": ["blue"]}}')
    with pytest.raises(HeadscopeError, match="'color' twice"):
        ConceptSet.load(path)


def test_a_csv_file_naming_a_concept_twice_is_refused(tmp_path):
    path = tmp_path / "twice.csv"
    path.write_text("Color\n\n1. Red\n\nColor\n\n1. Blue\n")
    with pytest.raises(HeadscopeError, match="'Color' appears twice"):
        ConceptSet.load(path)


def test_a_csv_concept_without_words_is_refused(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("Color\n\n1. Red\n\nShape\n\n")
    with pytest.raises(HeadscopeError, match="'Shape' of 'empty' is empty"):
        ConceptSet.load(path)


def test_missing_file_names_the_shipped_sets():
    with pytest.raises(HeadscopeError, match="shapes, hrv34"):
        ConceptSet.load("no-such-set")


class NothingTokenizer:
    """A tokenizer that turns the word 'void' into no token at all."""

    bos_token_id, eos_token_id, pad_token_id, unk_token_id, unk_token = 0, 1, 1, 1, "<unk>"

    def __call__(self, text, add_special_tokens=False):
        class Encoding:
            input_ids = [] if text == "void" else [5, 6]
        return Encoding()


def test_a_word_that_becomes_no_token_is_refused():
    concepts = ConceptSet("set", {"color": ["red", "void"]})
    with pytest.raises(HeadscopeError, match="word 'void' of concept 'color' becomes no token"):
        concepts.token_ids(NothingTokenizer())


def test_a_word_outside_a_word_level_vocabulary_is_refused():
    from headscope.shapes.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    assert ConceptSet.load("shapes").token_ids(tokenizer)["size"] == [[tokenizer.convert_tokens_to_ids("small")],
                                                                        [tokenizer.convert_tokens_to_ids("large")]]
    with pytest.raises(HeadscopeError, match="'giraffe' of concept 'animal' is not in this model's vocabulary"):
        ConceptSet("set", {"animal": ["giraffe"]}).token_ids(tokenizer)


def test_multi_token_words_keep_all_their_tokens(tiny_sd):
    ids = ConceptSet("set", {"animal": ["giraffe", "dog"]}).token_ids(tiny_sd.tokenizer)["animal"]
    assert [len(word) for word in ids] == [2, 1]
