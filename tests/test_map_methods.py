"""Map methods: which heads a word map sums (daam, selective, weighted, explicit heads or weights)."""
import pytest
import torch

import headscope
from headscope import HeadscopeError
from headscope.testing import generate, random_hrv

PROMPT = "a red circle and a blue square"
CONCEPTS = {"color": ["red", "blue"], "shape": ["circle", "square"], "size": ["big", "small"]}


@pytest.fixture(scope="module")
def traced(tiny_sd):
    hrv = random_hrv(tiny_sd, CONCEPTS, seed=3)
    with headscope.trace(tiny_sd) as tc:
        generate(tiny_sd, PROMPT, steps=2)
    return tc, hrv


def test_selective_with_every_head_equals_daam(traced):
    tc, hrv = traced
    every = tc.word_map("circle", method="selective", hrv=hrv, k=tc.index.n_heads)
    assert torch.equal(every, tc.word_map("circle"))


def test_weights_of_ones_equal_daam(traced):
    tc, _ = traced
    assert torch.equal(tc.word_map("square", weights=torch.ones(tc.index.n_heads)), tc.word_map("square"))


def test_a_one_hot_weight_equals_that_head_alone(traced):
    tc, _ = traced
    weights = torch.zeros(tc.index.n_heads)
    weights[5] = 2.0
    assert torch.allclose(tc.word_map("red", weights=weights), 2 * tc.word_map("red", heads=[5]))


def test_selective_top_k_sums_the_hrvs_most_relevant_heads_of_the_words_concept(traced):
    tc, hrv = traced
    top = hrv.top_heads("shape", 3).tolist()
    assert torch.equal(tc.word_map("circle", method="selective", hrv=hrv, k=3), tc.word_map("circle", heads=top))
    above_mean = torch.nonzero(hrv.vector("color") >= 1.0).flatten().tolist()
    assert torch.equal(tc.word_map("blue", method="selective", hrv=hrv), tc.word_map("blue", heads=above_mean))


def test_weighted_weights_every_head_by_its_relevance(traced):
    tc, hrv = traced
    expected = tc.word_map("square", weights=hrv.vector("shape"))
    assert torch.equal(tc.word_map("square", method="weighted", hrv=hrv), expected)
    assert torch.equal(tc.word_map("square", method="weighted", hrv=hrv, concept="color"),
                       tc.word_map("square", weights=hrv.vector("color")))


def test_a_word_whose_concept_the_hrv_lacks_names_the_concepts_it_has(traced):
    tc, hrv = traced
    with pytest.raises(HeadscopeError, match="'and' is in none of this HRV's concepts.*color, shape, size"):
        tc.word_map("and", method="selective", hrv=hrv)


@pytest.mark.parametrize("options, message", [
    ({"method": "best"}, "unknown map method 'best'; use one of daam, selective, weighted"),
    ({"method": "selective", "k": 0}, "k=0 out of range"),
    ({"weights": torch.ones(3)}, "weights= has 3 values"),
    ({"weights": -torch.ones(1)}, "has 1 values"),
    ({"method": "weighted", "heads": [1]}, "pass heads= or weights= with method='daam'"),
])
def test_bad_method_options_are_one_clear_error(traced, options, message):
    tc, hrv = traced
    with pytest.raises(HeadscopeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tc.word_map("circle", hrv=hrv, **options)


def test_head_maps_carry_the_methods_weights(traced):
    tc, hrv = traced
    plain = tc.head_maps("circle")
    selective = tc.head_maps("circle", method="selective", hrv=hrv, k=4)
    kept = torch.zeros(tc.index.n_heads, dtype=torch.bool)
    kept[hrv.top_heads("shape", 4)] = True
    assert torch.equal(selective[kept], plain[kept]) and not selective[~kept].any()


def test_head_maps_of_chosen_heads_keep_those_heads_only(traced):
    tc, _ = traced
    chosen = tc.head_maps("red", heads=[2, 7])
    plain = tc.head_maps("red")
    assert torch.equal(chosen[[2, 7]], plain[[2, 7]]) and chosen.abs().sum() == chosen[[2, 7]].abs().sum()
