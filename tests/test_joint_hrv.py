"""HRVs on joint attention (tiny SD3 and Flux): one value per head of the index, votes equal a hand
computation from the concept stream's keys of the words sampled for the step, the image untouched,
another family or layout refused, and `headscope hrv build --model FOLDER` on an SD3 folder."""
import json

import pytest
import torch
from click.testing import CliRunner

import headscope
from headscope import HeadIndex, HeadscopeError
from headscope.concepts import ConceptSet
from headscope.hrv import HRV, HRVBuilder, concept_reader, concept_scores, prompt_seed
from headscope.testing_joint import generate_joint

CONCEPTS = ConceptSet("tiny", {"color": ["red", "blue", "green"], "animal": ["dog", "cat", "giraffe", "bird"],
                               "shape": ["circle", "square"]})
PROMPTS = ["a red dog", "a blue circle", "a cat on the tree"]
CALL = {"height": 16, "width": 16, "max_sequence_length": 16}
STEPS = 2


@pytest.fixture(scope="module", params=["tiny_sd3", "tiny_flux"])
def joint(request):
    pipe = request.getfixturevalue(request.param)
    builder = HRVBuilder(CONCEPTS, steps=STEPS, batch_size=2, seed=3, call_options=CALL).fit(pipe, PROMPTS)
    return pipe, builder


def test_a_joint_hrv_has_one_value_per_head_of_its_index(joint):
    pipe, builder = joint
    index = HeadIndex.from_model(pipe)
    assert builder.hrv_.vectors.shape == (3, index.n_heads)
    assert torch.allclose(builder.hrv_.vectors.mean(dim=1), torch.ones(3))
    # every head of every layer (Flux: double- and single-stream) votes once per step and prompt
    assert torch.equal(builder.step_votes_.sum(dim=1), torch.full((STEPS, index.n_heads), len(PROMPTS)))
    meta = builder.hrv_.meta
    assert meta["heads"]["fingerprint"] == index.fingerprint() and meta["model"]["family"] == builder.hrv_.family
    assert meta["model"]["denoiser_class"] == type(pipe.transformer).__name__ and meta["call_options"] == CALL


def test_the_family_survives_saving(joint, tmp_path):
    pipe, builder = joint
    loaded = HRV.load(builder.hrv_.save(tmp_path / "joint.hrv"))
    assert loaded.family == builder.hrv_.family in ("sd3", "flux")
    loaded.check_compatible(pipe)


class BlockRecorder:
    """A second reader of the concept stream: keeps each block's record at step 0."""

    def __init__(self):
        self.blocks = {}

    def read_concepts(self, ctx, block):
        if ctx.step == 0:
            self.blocks[ctx.layer.index] = block


@torch.no_grad()
@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_votes_of_one_step_match_a_softmax_over_the_blocks_concept_keys(family, request):
    pipe = request.getfixturevalue(family)
    index = HeadIndex.from_model(pipe)
    reader, stream = concept_reader(pipe, index, CONCEPTS, 1, seed=5)
    recorder = BlockRecorder()
    stream.readers.append(recorder)
    reader.begin([0])
    with headscope.trace(pipe, maps=False, concepts=stream):
        generate_joint(pipe, "a red dog", steps=1)

    words = [word for name in CONCEPTS.names for word in CONCEPTS.concepts[name]]
    spans = dict(zip(words, stream.spans))
    generator = torch.Generator().manual_seed(prompt_seed(5, 0, "words"))
    draws = torch.rand(1, 1, 3, generator=generator, dtype=torch.float64)[0, 0]  # one draw per step and row
    sampled = [CONCEPTS.concepts[name][int(u * len(CONCEPTS.concepts[name]))]
               for name, u in zip(CONCEPTS.names, draws.tolist())]
    lengths = [spans[word][1] - spans[word][0] for word in sampled]
    assert sampled[1] == "giraffe" and max(lengths) == 2  # this seed: a two-token word among one-token ones
    # The block's keys are the sampled words' tokens one after another: word c's start at the sum of those before.
    positions = torch.zeros(1, 3, 2, dtype=torch.long)
    valid = torch.zeros(1, 3, 2, dtype=torch.bool)
    for concept, length in enumerate(lengths):
        positions[0, concept, :length] = sum(lengths[:concept]) + torch.arange(length)
        valid[0, concept, :length] = True
    carried = torch.cat([torch.arange(*spans[word]) for word in sampled])
    for layer in index.layers:
        block = recorder.blocks[layer.index]
        assert torch.equal(block.selection.index[0][block.selection.valid[0]], carried), layer.name
        scores = concept_scores(block.image_query, block.concept_key, layer.head_dim ** -0.5, positions, valid)
        expected = torch.zeros(3, layer.heads, dtype=torch.int64)
        expected[scores[0].argmax(dim=-1), torch.arange(layer.heads)] = 1
        assert torch.equal(reader.step_votes[0][:, layer.head_ids.start:layer.head_ids.stop], expected), layer.name


def test_scoring_at_every_layer_call_gives_the_votes_of_scoring_per_step(joint, monkeypatch):
    pipe, builder = joint
    monkeypatch.setattr("headscope.hrv.votes.VOTE_BUDGET_BYTES", 0)  # every kept query is scored at once
    again = HRVBuilder(CONCEPTS, steps=STEPS, batch_size=2, seed=3, call_options=CALL).fit(pipe, PROMPTS)
    assert torch.equal(again.step_votes_, builder.step_votes_)


@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_building_does_not_change_the_generated_image(family, request):
    pipe = request.getfixturevalue(family)
    index = HeadIndex.from_model(pipe)
    reader, stream = concept_reader(pipe, index, CONCEPTS, STEPS)
    plain = generate_joint(pipe, ["a red dog", "a cat"], steps=STEPS)
    reader.begin([0, 1])
    with headscope.trace(pipe, maps=False, concepts=stream):
        probed = generate_joint(pipe, ["a red dog", "a cat"], steps=STEPS)
    assert torch.equal(plain, probed) and reader.step_votes.sum() == 2 * STEPS * index.n_heads


# -- refusals ---------------------------------------------------------------------------------------

def test_a_joint_hrv_is_refused_on_the_other_family_and_on_a_unet(tiny_sd3, tiny_flux, tiny_sd):
    sd3 = HRVBuilder(CONCEPTS, steps=1, call_options=CALL).fit(tiny_sd3, PROMPTS[:1]).hrv_
    flux = HRVBuilder(CONCEPTS, steps=1, call_options=CALL).fit(tiny_flux, PROMPTS[:1]).hrv_
    with pytest.raises(HeadscopeError, match=r"^HRV built for an SD3 transformer with layout \w+ \(6 heads\); this "
                                             r"pipeline is a Flux transformer with layout \w+ \(8 heads\); rebuild"):
        sd3.check_compatible(tiny_flux)
    with pytest.raises(HeadscopeError, match=r"HRV built for a Flux transformer .* pipeline is an SD3 transformer"):
        flux.check_compatible(tiny_sd3)
    with pytest.raises(HeadscopeError, match=r"HRV built for a Flux transformer .* pipeline is a UNet with layout"):
        flux.check_compatible(tiny_sd)


def test_a_concept_word_the_t5_tokenizer_cannot_represent_is_refused(tiny_flux):
    odd = ConceptSet("odd", {"animal": ["dog", "猫"], "color": ["red"]})
    with pytest.raises(HeadscopeError, match="word '猫' of concept 'animal' is not in this model's vocabulary"):
        HRVBuilder(odd, steps=1, call_options=CALL).fit(tiny_flux, PROMPTS[:1])


# -- the command line -------------------------------------------------------------------------------

def test_hrv_build_runs_on_an_sd3_folder_and_show_reads_it(tiny_sd3, tmp_path):
    from headscope_cli.main import cli

    folder = tmp_path / "sd3"
    tiny_sd3.save_pretrained(folder)
    (folder / "headscope.json").write_text(json.dumps({"defaults": {"max_sequence_length": 16}}))
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps({"name": "tiny", "concepts": CONCEPTS.concepts}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "sd3.hrv"
    result = CliRunner().invoke(cli, ["hrv", "build", "--model", str(folder), "--concepts", str(concepts),
                                      "--prompts", str(prompts), "--steps", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "3 concepts x 6 heads from 3 prompts" in result.output
    built = HRV.load(out)
    assert built.family == "sd3" and built.meta["call_options"] == {"max_sequence_length": 16}
    shown = CliRunner().invoke(cli, ["hrv", "show", str(out), "--top", "2"])
    assert shown.exit_code == 0 and "transformer_blocks." in shown.output
