"""Ordered weakening: the writer hook scales exactly the chosen heads' word tokens; orders; sweeps; scorers."""
import pytest
import torch
from diffusers.models.attention_processor import Attention

from headscope import HeadscopeError
from headscope.concepts import ConceptSet
from headscope.heads import LayerInfo
from headscope.hrv import HRV, HRVBuilder
from headscope.processor import BatchLayout, HeadProcessor, Hook, Hooks, attention_probs
from headscope.shapes.world import ObjectSpec, Scene
from headscope.weaken import (HeadWeakening, OrderedWeakening, default_ks, head_order, summarize, weakening_scenes,
                              word_positions)

HEADS, HEAD_DIM, QUERIES, KEYS = 4, 8, 16, 6
CONCEPTS = ConceptSet("tiny", {"color": ["red", "blue", "green"], "shape": ["circle", "square"],
                               "size": ["big", "small"]})


class Recorder(Hook):
    rows = "all"

    def wants_probs(self, ctx):
        return True

    def read(self, ctx, probs):
        self.probs = probs.clone()


def test_the_hook_scales_the_chosen_heads_word_tokens_on_conditional_rows_only():
    torch.manual_seed(0)
    attn = Attention(query_dim=32, cross_attention_dim=16, heads=HEADS, dim_head=HEAD_DIM).eval()
    hidden, context = torch.randn(4, QUERIES, 32), torch.randn(4, KEYS, 16)  # rows: 2 uncond, then 2 cond
    layer = LayerInfo(index=3, name="attn", block="up", block_index=0, level=0, heads=HEADS, head_dim=HEAD_DIM,
                      offset=10, resolution=(4, 4))
    positions = [[1, 2], [1, 2, 3]]  # word tokens of prompt 0 and prompt 1
    weakening = HeadWeakening({11, 13, 50}, -2.0, positions, KEYS)  # heads 1 and 3 of this layer (50: elsewhere)
    recorder = Recorder()
    hooks = Hooks([weakening, recorder])
    hooks.state.layout = BatchLayout(n_images=2, cfg=True)
    with torch.no_grad():
        output = HeadProcessor(layer, hooks)(attn, hidden, context)
        query = attn.to_q(hidden).view(4, -1, HEADS, HEAD_DIM).transpose(1, 2)
        key = attn.to_k(context).view(4, -1, HEADS, HEAD_DIM).transpose(1, 2)
        value = attn.to_v(context).view(4, -1, HEADS, HEAD_DIM).transpose(1, 2)
        probs = attention_probs(attn, query, key)
        expected = probs.clone()
        for row, image in ((2, 0), (3, 1)):
            for head in (1, 3):
                expected[row, head][:, positions[image]] *= -2.0
        mixed = (expected @ value).transpose(1, 2).reshape(4, QUERIES, HEADS * HEAD_DIM)
        reference = attn.to_out[1](attn.to_out[0](mixed))
    assert torch.allclose(recorder.probs, expected, atol=1e-6)
    assert torch.equal(recorder.probs[:2], probs[:2]) and torch.equal(recorder.probs[:, [0, 2]], probs[:, [0, 2]])
    assert torch.allclose(output, reference, atol=1e-5)


def test_the_hook_leaves_layers_without_chosen_heads_alone():
    layer = LayerInfo(index=0, name="attn", block="down", block_index=0, level=0, heads=2, head_dim=4, offset=0,
                      resolution=(2, 2))
    from headscope.processor import HookContext

    ctx = HookContext(layer=layer, call=0, step=0, n_steps=1, layout=BatchLayout(1, cfg=True), latent_hw=(2, 2),
                      query_hw=(2, 2), rows=(0, 1))
    assert HeadWeakening({5}, -2.0, [[1]], 4).value_factors(ctx) is None
    factors = HeadWeakening({1}, 0.0, [[1, 2]], 4).value_factors(ctx)
    assert factors.tolist() == [[[1, 1, 1, 1], [1, 1, 1, 1]], [[1, 1, 1, 1], [1, 0, 0, 1]]]


def test_word_positions_leave_out_start_end_and_padding(tiny_sd):
    assert word_positions(tiny_sd.tokenizer, "a red giraffe") == [1, 2, 3, 4]


@pytest.fixture(scope="module")
def tiny_hrv():
    vectors = torch.tensor([[0.0, 3.0, 1.0, 2.0, 2.0, 0.0], [1.0] * 6, [6.0, 0, 0, 0, 0, 0]])
    return HRV(["color", "shape", "size"], vectors, None, {})


def test_orders_are_what_they_say(tiny_hrv):
    assert head_order(tiny_hrv, "color", "morhf").tolist() == [1, 3, 4, 2, 0, 5]  # ties: lower id first
    assert head_order(tiny_hrv, "color", "lerhf").tolist() == [0, 5, 2, 3, 4, 1]
    shuffled = head_order(tiny_hrv, "color", "random", seed=7)
    assert sorted(shuffled.tolist()) == list(range(6))
    assert torch.equal(shuffled, head_order(tiny_hrv, "size", "random", seed=7))  # independent of the concept
    assert torch.equal(shuffled, torch.randperm(6, generator=torch.Generator().manual_seed(7)))


def test_default_grid_is_eighths_quarters_halves_and_all():
    assert default_ks(128) == [0, 16, 32, 64, 128] and default_ks(22) == [0, 2, 5, 11, 22]


def test_plan_weakens_the_first_k_heads_of_each_order(tiny_hrv):
    plan = OrderedWeakening("color", tiny_hrv, ks=[0, 2, 6], orders=("morhf", "lerhf")).plan()
    assert plan[("morhf", 2)] == (1, 3) and plan[("lerhf", 2)] == (0, 5)
    assert plan[("morhf", 0)] == plan[("lerhf", 0)] == () and plan[("morhf", 6)] == tuple(range(6))


@pytest.mark.parametrize("options, message", [
    ({"ks": [0, 7]}, r"k values \[0, 7\] must lie in 0..6"),
    ({"orders": ("morhf", "best")}, "unknown order"),
    ({"seeds": ()}, "at least one seed"),
])
def test_bad_sweep_parameters_are_refused(tiny_hrv, options, message):
    with pytest.raises(HeadscopeError, match=message):
        OrderedWeakening("color", tiny_hrv, **options).plan()


def test_unknown_concept_lists_the_known_ones(tiny_hrv):
    with pytest.raises(HeadscopeError, match="this HRV has: color, shape, size"):
        OrderedWeakening("texture", tiny_hrv).plan()


def scenes():
    spec = [("red", "circle", "small"), ("blue", "square", "big")]
    return [Scene([ObjectSpec(shape=shape, color=color, size="small" if size == "small" else "large",
                              position="center")], f"a {size} {color} {shape}", "single",
                  {"size": True, "color": True, "fill": True, "position": False}) for color, shape, size in spec]


@pytest.fixture(scope="module")
def tiny_sd_hrv(tiny_sd):
    return HRVBuilder(CONCEPTS, steps=1, seed=0).fit(tiny_sd, ["a red circle", "a big blue square"]).hrv_


@pytest.fixture
def generated_head_sets(monkeypatch):
    """The head set of every generation OrderedWeakening makes in the test, in order."""
    calls = []
    original = OrderedWeakening._generate

    def counting(self, pipe, heads, *args):
        calls.append(heads)
        return original(self, pipe, heads, *args)

    monkeypatch.setattr(OrderedWeakening, "_generate", counting)
    return calls


def test_a_sweep_on_shapes_scenes_scores_every_order_k_seed_and_concept(tiny_sd, tiny_sd_hrv, generated_head_sets):
    calls = generated_head_sets
    sweep = OrderedWeakening("color", tiny_sd_hrv, ks=[0, 4, 22], seeds=(0, 1), steps=1).fit(tiny_sd, scenes())
    assert len(calls) == 5 * 2  # head sets: none, 3 orders x 4 heads, all; x 2 seeds (one batch each)
    assert len(sweep.results_) == 3 * 3 * 2 * 2 * 3  # orders x ks x seeds x prompts x scored concepts
    assert {row["concept"] for row in sweep.results_} == {"color", "shape", "size"}
    assert {(row["concept"], row["role"]) for row in sweep.summary_} == {("color", "weakened"), ("shape", "control"),
                                                                        ("size", "control")}
    assert all(row["n"] == 4 and 0.0 <= row["mean"] <= 1.0 for row in sweep.summary_)
    baseline = {(row["concept"], row["mean"]) for row in sweep.summary_ if row["k"] == 0}
    assert len(baseline) == 3  # k = 0 is the same generation for every order
    assert sweep.settings_["metric"] == "annotator accuracy" and sweep.settings_["generations"] == 20


def test_sweeps_sharing_a_cache_generate_each_head_set_once_and_score_as_alone(tiny_sd, tiny_sd_hrv,
                                                                               generated_head_sets):
    calls = generated_head_sets
    options = {"ks": [0, 4], "seeds": (0,), "steps": 1}
    cache = {}
    color = OrderedWeakening("color", tiny_sd_hrv, cache=cache, **options).fit(tiny_sd, scenes())
    shape = OrderedWeakening("shape", tiny_sd_hrv, cache=cache, **options)
    new_sets = set(shape.plan().values()) - set(color.plan().values())  # k = 0 and the random order are shared
    calls.clear()
    shape.fit(tiny_sd, scenes())
    assert sorted(calls) == sorted(new_sets) and shape.settings_["generations"] == 2 * len(new_sets)
    alone = OrderedWeakening("shape", tiny_sd_hrv, **options).fit(tiny_sd, scenes())
    assert shape.summary_ == alone.summary_ and alone.settings_["generations"] == 2 * len(set(alone.plan().values()))
    calls.clear()
    OrderedWeakening("shape", tiny_sd_hrv, cache=cache, factor=0.0, **options).fit(tiny_sd, scenes())
    assert len(calls) == len(set(alone.plan().values()))  # another factor: other images


def test_weakened_heads_change_the_image(tiny_sd, tiny_sd_hrv):
    sweep = OrderedWeakening("color", tiny_sd_hrv, steps=2)
    plain = sweep._generate(tiny_sd, (), ["a red circle"], [[1, 2]], 0, 2, 7.5)[0]
    weakened = sweep._generate(tiny_sd, tuple(range(22)), ["a red circle"], [[1, 2]], 0, 2, 7.5)[0]
    again = sweep._generate(tiny_sd, tuple(range(22)), ["a red circle"], [[1, 2]], 0, 2, 7.5)[0]
    assert list(plain.getdata()) != list(weakened.getdata()) and list(weakened.getdata()) == list(again.getdata())


def test_summary_averages_per_order_k_and_concept():
    rows = [{"order": "morhf", "k": 2, "concept": "color", "role": "weakened", "score": value} for value in (1.0, 0.0)]
    assert summarize(rows) == [{"order": "morhf", "k": 2, "concept": "color", "role": "weakened", "mean": 0.5, "n": 2}]


def test_weakening_scenes_name_every_attribute():
    scenes_ = weakening_scenes(6, seed=1)
    assert len(scenes_) == 6 and all(scene.kind == "single" for scene in scenes_)
    for scene in scenes_:
        obj = scene.objects[0]
        assert obj.size in scene.caption and obj.color in scene.caption and obj.shape in scene.caption


@pytest.fixture(scope="module")
def tiny_clip(tiny_sd, tmp_path_factory):
    from headscope.testing import build_tiny_clip

    return build_tiny_clip(tmp_path_factory.mktemp("tiny-clip"), tiny_sd.tokenizer)


def test_text_prompts_are_scored_with_clip_for_the_concept_words_they_contain(tiny_sd, tiny_sd_hrv, tiny_clip):
    hrv = HRV(tiny_sd_hrv.concepts, tiny_sd_hrv.vectors, None,
              {**tiny_sd_hrv.meta, "concept_set": {"concepts": CONCEPTS.concepts}})
    sweep = OrderedWeakening("shape", hrv, ks=[0, 5], orders=("morhf",), seeds=(0,), steps=1, clip=tiny_clip)
    sweep.fit(tiny_sd, ["a red circle", "a small dog"])
    scored = {(row["prompt"], row["concept"]) for row in sweep.results_}
    assert scored == {("a red circle", "color"), ("a red circle", "shape"), ("a small dog", "size")}
    assert all(-1.0 <= row["score"] <= 1.0 for row in sweep.results_)
    assert sweep.settings_["metric"] == "CLIP similarity"


def test_text_prompts_without_clip_are_refused(tiny_sd, tiny_sd_hrv):
    with pytest.raises(HeadscopeError, match="pass clip=PATH"):
        OrderedWeakening("color", tiny_sd_hrv, steps=1).fit(tiny_sd, ["a red circle"])
