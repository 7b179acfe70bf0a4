"""A concept stream carrying a per-forward, per-row selection of its tokens (tiny SD3 and Flux): a row's
keys are those of a stream holding only its chosen words, padding changes nothing, the image stays
bitwise the same, a prompt's HRV votes do not depend on its batch, and a second selecting reader is
refused."""
import pytest
import torch

import headscope
from headscope import HeadIndex, HeadscopeError
from headscope.concepts import ConceptSet
from headscope.hrv import HRVBuilder, concept_reader, prompt_seed
from headscope.stream import ConceptStream
from headscope.testing_joint import generate_joint

WORDS = ["red", "giraffe", "blue", "dog", "circle"]  # "giraffe" is two tokens with both tokenizers
PROMPTS = ["a red dog", "a blue circle"]
STEPS = 2


class Recorder:
    """A reader of the concept stream keeping every block's record at step 1 (the states have gone
    through a step's blocks before, from the encodings)."""

    def __init__(self):
        self.blocks = {}

    def read_concepts(self, ctx, block):
        if ctx.step == 1:
            self.blocks[ctx.layer.index] = block


class FixedSelection(Recorder):
    """A selecting reader: chosen[row] are entry numbers of the stream; rows are padded to the longest,
    with `pad_at` (row, slot) an extra padded slot inserted before that slot."""

    def __init__(self, stream, chosen, pad_at=None):
        super().__init__()
        rows = [torch.cat([torch.arange(*stream.spans[entry]) for entry in entries]) for entries in chosen]
        if pad_at is not None:
            row, slot = pad_at
            rows[row] = torch.cat([rows[row][:slot], torch.zeros(1, dtype=torch.long), rows[row][slot:]])
        width = max(len(row) for row in rows)
        self.index = torch.zeros(len(rows), width, dtype=torch.long)
        self.valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for number, row in enumerate(rows):
            self.index[number, :len(row)] = row
            self.valid[number, :len(row)] = True
        if pad_at is not None:
            self.valid[pad_at] = False

    def select_tokens(self, ctx):
        return self.index, self.valid


def record(pipe, stream, reader):
    stream.readers.append(reader)
    with headscope.trace(pipe, maps=False, concepts=stream):
        return generate_joint(pipe, PROMPTS, steps=STEPS)


@torch.no_grad()
@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_a_rows_selected_keys_are_those_of_a_stream_of_only_its_chosen_words(family, request):
    pipe = request.getfixturevalue(family)
    stream = ConceptStream(pipe, WORDS)
    selection = FixedSelection(stream, [[0, 1], [2, 3]])  # red, giraffe (3 tokens); blue, dog (2, padded)
    record(pipe, stream, selection)
    for row, entries in enumerate([[0, 1], [2, 3]]):
        alone = Recorder()
        record(pipe, ConceptStream(pipe, [WORDS[entry] for entry in entries]), alone)
        for layer, block in selection.blocks.items():
            assert block.concept_key.shape[2] == 3
            real = block.concept_key[row][:, selection.valid[row]]
            assert torch.allclose(real, alone.blocks[layer].concept_key[row], atol=1e-5), (row, layer)


@torch.no_grad()
@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_a_padded_slot_changes_no_real_tokens_key(family, request):
    pipe = request.getfixturevalue(family)
    stream = ConceptStream(pipe, WORDS)
    unpadded = FixedSelection(stream, [[0, 1], [1, 4]])  # 3 tokens each: no padding, no mask
    record(pipe, stream, unpadded)
    stream = ConceptStream(pipe, WORDS)
    padded = FixedSelection(stream, [[0, 1], [1, 4]], pad_at=(1, 1))  # a slot between giraffe's two tokens
    record(pipe, stream, padded)
    for layer, block in padded.blocks.items():
        assert block.concept_key.shape[2] == 4
        for row in range(2):
            real = block.concept_key[row][:, padded.valid[row]]
            assert torch.allclose(real, unpadded.blocks[layer].concept_key[row], atol=1e-5), (row, layer)


@torch.no_grad()
@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_the_image_is_bitwise_unchanged_by_a_padded_selection(family, request):
    pipe = request.getfixturevalue(family)
    plain = generate_joint(pipe, PROMPTS, steps=STEPS)
    stream = ConceptStream(pipe, WORDS)
    probed = record(pipe, stream, FixedSelection(stream, [[0, 1], [2, 3]]))
    assert torch.equal(plain, probed)


class Selections:
    """A second (non-selecting) reader of the vote stream: keeps every forward's selection."""

    def __init__(self):
        self.seen = {}

    def read_concepts(self, ctx, block):
        self.seen[(ctx.call, ctx.step)] = block.selection


def vote(pipe, prompts, indices, concepts, selections=None):
    """Hard votes of these prompts (global indices) in one batch, started as HRVBuilder starts them."""
    reader, stream = concept_reader(pipe, HeadIndex.from_model(pipe), concepts, STEPS, seed=1)
    if selections is not None:
        stream.readers.append(selections)
    reader.begin(indices)
    generators = [torch.Generator("cpu").manual_seed(prompt_seed(1, i, "latents")) for i in indices]
    with headscope.trace(pipe, maps=False, concepts=stream):
        pipe(prompts, num_inference_steps=STEPS, generator=generators, output_type="latent", height=16, width=16,
             max_sequence_length=16)
    return reader.step_votes


@torch.no_grad()
@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_a_prompts_votes_are_the_same_built_alone_or_batched_with_another(family, request):
    pipe = request.getfixturevalue(family)
    concepts = ConceptSet("tiny", {"color": ["red", "blue"], "animal": ["dog", "giraffe", "cat"]})
    selections = Selections()
    batched = vote(pipe, PROMPTS, [0, 1], concepts, selections)
    # the batch's rows chose words of different lengths at some step: one row was padded
    assert any(not selection.valid.all() for selection in selections.seen.values())
    alone = vote(pipe, PROMPTS[:1], [0], concepts) + vote(pipe, PROMPTS[1:], [1], concepts)
    assert torch.equal(batched, alone)


def test_the_stream_carries_each_rows_chosen_tokens_packed_not_every_word(tiny_flux):
    concepts = ConceptSet("tiny", {"color": ["red", "blue"], "animal": ["dog", "giraffe", "cat"]})
    selections = Selections()
    vote(tiny_flux, PROMPTS, [0, 1], concepts, selections)
    giraffe = (3, 4)  # tokens: red, blue, dog, gir, affe, cat
    for selection in selections.seen.values():
        chose = [bool((row == giraffe[0]).any()) for row in selection.index]
        # a color and an animal per row, one after another: 2 tokens, 3 with giraffe, padded at the end only
        assert selection.index.shape == (2, 3 if any(chose) else 2)  # of the stream's 6 tokens
        for row, giraffe_chosen in zip(range(2), chose):
            real = selection.index[row][selection.valid[row]].tolist()
            assert len(real) == (3 if giraffe_chosen else 2)
            assert real[0] in (0, 1) and (real[1:] == list(giraffe) if giraffe_chosen else real[1] in (2, 5))
            assert selection.valid[row].tolist() == sorted(selection.valid[row].tolist(), reverse=True)


def test_packed_positions_point_at_each_words_own_tokens():
    from headscope.hrv.sampling import packed_positions

    valid = torch.tensor([[[True, False], [True, True], [True, False]],  # words of 1, 2 and 1 tokens
                          [[True, False], [True, False], [True, False]]])  # [rows, concepts, longest]
    positions = packed_positions(valid)
    assert positions[0][valid[0]].tolist() == [0, 1, 2, 3]
    assert positions[1][valid[1]].tolist() == [0, 1, 2]
    assert bool((positions >= 0).all()) and bool((positions < 4).all())


def test_a_second_selecting_reader_is_refused_and_the_pipeline_left_untraced(tiny_sd3):
    reader, stream = concept_reader(tiny_sd3, HeadIndex.from_model(tiny_sd3),
                                    ConceptSet("tiny", {"color": ["red", "blue"]}), STEPS)
    stream.readers.append(FixedSelection(stream, [[0]]))
    with pytest.raises(HeadscopeError, match=r"2 of its readers select tokens \(ConceptVotes, FixedSelection\)"):
        with headscope.trace(tiny_sd3, maps=False, concepts=stream):
            pass
    stream.readers.pop()
    with headscope.trace(tiny_sd3, maps=False, concepts=stream):  # nothing was left installed
        pass


@torch.no_grad()
def test_steps_of_one_packed_width_with_different_longest_words_are_scored_apart(tiny_flux):
    # color and shape words of 1 or 2 tokens, animal of 1 or 3 ("ox": 3 with the tiny T5 tokenizer): a step
    # choosing giraffe, dog, ant and one choosing red, ox, circle both carry 5 tokens, in tables 6 and 9 wide.
    concepts = ConceptSet("tiny", {"color": ["red", "giraffe"], "animal": ["dog", "ox"], "shape": ["circle", "ant"]})
    steps, prompts = 8, ["a red dog", "a blue circle", "an ox", "a red ant"]
    reader, stream = concept_reader(tiny_flux, HeadIndex.from_model(tiny_flux), concepts, steps, seed=0)
    selections = Selections()
    stream.readers.append(selections)
    with headscope.trace(tiny_flux, maps=False, concepts=stream):
        for number, prompt in enumerate(prompts):  # a call per prompt: one row, its steps scored together
            reader.begin([number])
            tiny_flux(prompt, num_inference_steps=steps, output_type="latent", height=16, width=16,
                      max_sequence_length=16, generator=torch.Generator().manual_seed(number))
    votes = reader.step_votes  # every call's so far
    widths = {}  # (call, packed width) -> the longest words of the call's steps that carried it
    for (call, _), selection in selections.seen.items():
        entries = torch.tensor([stream_entry(stream, int(position)) for position in selection.index[0]])
        longest = int(torch.unique_consecutive(entries, return_counts=True)[1].max())
        widths.setdefault((call, selection.index.shape[1]), set()).add(longest)
    assert any(len(longest) > 1 for longest in widths.values())  # the case happened in a call
    assert int(votes.sum()) == steps * len(prompts) * HeadIndex.from_model(tiny_flux).n_heads  # every vote counted
    # the stream's room: each concept's longest word, summed (giraffe 2 + ox 3 + ant 2), not 3 concepts x 3
    assert reader.max_tokens == 7 and max(selection.index.shape[1] for selection in selections.seen.values()) <= 7


def stream_entry(stream, position: int) -> int:
    """The entry (word) of the stream whose tokens hold this position."""
    return next(number for number, (start, stop) in enumerate(stream.spans) if start <= position < stop)


def test_the_scorer_in_chunks_of_queries_gives_the_one_pass_mean_padding_hidden(monkeypatch):
    from headscope.hrv import votes

    generator = torch.Generator().manual_seed(0)
    keys = torch.randn(3, 2, 4, 5, 8, generator=generator)  # [calls, rows, heads, sampled, d]
    queries = torch.randn(3, 2, 4, 37, 8, generator=generator)  # 37 queries: the last chunk is short
    bias = torch.zeros(3, 2, 1, 5, 1).index_fill_(3, torch.tensor([4]), float("-inf"))  # a padded slot
    whole = (keys @ queries.transpose(-1, -2) + bias).softmax(dim=-2).mean(dim=-1)
    assert torch.equal(votes.mean_softmax(keys, queries, bias), whole)  # fits: the one pass itself
    monkeypatch.setattr(votes, "SCORE_CHUNK_BYTES", 3 * 2 * 4 * 5 * 4 * 8)  # 8 queries a chunk: 5 chunks
    chunked = votes.mean_softmax(keys, queries, bias)
    assert torch.allclose(chunked, whole, atol=1e-6) and not torch.equal(chunked, whole)
    assert bool((chunked[..., 4] == 0).all())


@torch.no_grad()
@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_votes_scored_in_chunks_of_queries_are_the_one_pass_votes(family, request, monkeypatch):
    from headscope.hrv import votes

    pipe = request.getfixturevalue(family)
    concepts = ConceptSet("tiny", {"color": ["red", "blue"], "animal": ["dog", "giraffe", "cat"]})
    whole = vote(pipe, PROMPTS, [0, 1], concepts)
    monkeypatch.setattr(votes, "SCORE_CHUNK_BYTES", 1)  # a query per chunk
    assert torch.equal(vote(pipe, PROMPTS, [0, 1], concepts), whole)
