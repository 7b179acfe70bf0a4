"""The concept stream keeps a call's blocks and carries them for every forward side by side (tiny SD3 and
Flux): the same keys and outputs as carrying each block as it runs, handed out in the order they ran, no
more held than its budget, everything handed out by the end of the call, and what ran before an
interruption handed out when the trace closes."""
import pytest
import torch

import headscope
from headscope.stream import ConceptStream
from headscope.stream_arena import Arena, stacked
from headscope.testing_joint import generate_joint

WORDS = ["red", "giraffe", "dog"]  # "giraffe" is two tokens with both tokenizers
PROMPTS = ["a red dog", "a blue circle"]
STEPS = 3


class Recorder:
    """Every record the stream hands out, in order: ((call, step, layer), concept key, concept output)."""

    def __init__(self):
        self.records = []

    def read_concepts(self, ctx, block):
        self.records.append(((ctx.call, ctx.step, ctx.layer.index), block.concept_key.clone(),
                             None if block.concept_output is None else block.concept_output.clone()))


def carried(pipe, budget, monkeypatch, **options):
    monkeypatch.setattr("headscope.stream.STREAM_BUDGET_BYTES", budget)
    recorder = Recorder()
    stream = ConceptStream(pipe, WORDS, readers=[recorder])
    with headscope.trace(pipe, maps=False, concepts=stream):
        generate_joint(pipe, PROMPTS, steps=STEPS, **options)
    return recorder.records


@torch.no_grad()
@pytest.mark.parametrize("family", ["tiny_sd3", "tiny_flux"])
def test_forwards_side_by_side_give_the_keys_and_outputs_of_carrying_each_block_as_it_runs(family, request,
                                                                                            monkeypatch):
    pipe = request.getfixturevalue(family)
    layers = [layer.index for layer in headscope.HeadIndex.from_model(pipe).layers]
    together = carried(pipe, 2**40, monkeypatch)
    one_by_one = carried(pipe, 0, monkeypatch)
    order = [(0, step, layer) for step in range(STEPS) for layer in layers]  # step by step, block by block
    assert [where for where, _, _ in together] == [where for where, _, _ in one_by_one] == order
    for (where, key, output), (_, key_alone, output_alone) in zip(together, one_by_one):
        assert key.shape == key_alone.shape and torch.allclose(key, key_alone, atol=1e-5), where
        assert (output is None) == (output_alone is None), where
        if output is not None:
            assert torch.allclose(output, output_alone, atol=1e-5), where


def arena_bytes(stream):
    arena = stream._arena
    parts = [arena.key, arena.value, arena.query or {}, arena.output or {}]
    return sum(tensor.nbytes for part in parts for tensor in part.values())


@torch.no_grad()
def test_the_stream_hands_out_a_call_by_its_end_and_holds_no_more_than_its_budget(tiny_flux, monkeypatch):
    arrived = []  # records handed out when each denoiser forward starts
    recorder = Recorder()
    handle = tiny_flux.transformer.register_forward_pre_hook(lambda *_: arrived.append(len(recorder.records)))
    n_layers = headscope.HeadIndex.from_model(tiny_flux).n_layers

    def run(budget, own=False):  # own: the stream's budget, over a module budget that holds every forward
        monkeypatch.setattr("headscope.stream.STREAM_BUDGET_BYTES", 2**40 if own else budget)
        arrived.clear()
        recorder.records.clear()
        stream = ConceptStream(tiny_flux, WORDS, readers=[recorder])
        stream.budget = budget if own else None
        with headscope.trace(tiny_flux, maps=False, concepts=stream):
            generate_joint(tiny_flux, PROMPTS, steps=STEPS)
            assert len(recorder.records) == STEPS * n_layers  # by the call's end, inside the trace
            assert stream._forwards == []
            return stream.slots, (arena_bytes(stream) if stream._arena is not None else 0)

    try:
        slots, held = run(2**40)
        assert slots == STEPS and arrived == [0] * STEPS  # every forward side by side after the last step
        per_forward = held // STEPS
        assert run(2 * per_forward) == (2, 2 * per_forward)  # two fit: carried after the second forward
        assert arrived == [0, 0, 2 * n_layers]
        assert run(2 * per_forward - 1) == (0, 0)  # fewer than two fit: block by block, as they run
        assert arrived == [step * n_layers for step in range(STEPS)]
        assert run(2 * per_forward, own=True) == (2, 2 * per_forward) and run(0, own=True) == (0, 0)
        assert arrived == [step * n_layers for step in range(STEPS)]
    finally:
        handle.remove()


@torch.no_grad()
def test_one_arena_serves_every_call_of_every_trace_of_a_stream(tiny_sd3, monkeypatch):
    monkeypatch.setattr("headscope.stream.STREAM_BUDGET_BYTES", 2**40)
    stream = ConceptStream(tiny_sd3, WORDS, readers=[Recorder()])
    with headscope.trace(tiny_sd3, maps=False, concepts=stream):
        generate_joint(tiny_sd3, PROMPTS, steps=STEPS)
        first = {layer: tensor.data_ptr() for layer, tensor in stream._arena.query.items()}
        generate_joint(tiny_sd3, PROMPTS, seed=1, steps=STEPS)
        assert {layer: tensor.data_ptr() for layer, tensor in stream._arena.query.items()} == first
    with headscope.trace(tiny_sd3, maps=False, concepts=stream):
        generate_joint(tiny_sd3, PROMPTS, seed=2, steps=STEPS)
    assert {layer: tensor.data_ptr() for layer, tensor in stream._arena.query.items()} == first
    assert list(stream._arena.key) == list(first)  # a reader of outputs: the last block's keys are kept too


class KeysOnly(Recorder):
    needs_outputs = False


@torch.no_grad()
def test_without_a_reader_of_outputs_the_last_block_keeps_no_image_keys_and_gives_keys(tiny_flux, monkeypatch):
    monkeypatch.setattr("headscope.stream.STREAM_BUDGET_BYTES", 2**40)
    reader = KeysOnly()
    stream = ConceptStream(tiny_flux, WORDS, readers=[reader])
    with headscope.trace(tiny_flux, maps=False, concepts=stream):
        generate_joint(tiny_flux, PROMPTS, steps=STEPS)
    layers = [layer.index for layer in headscope.HeadIndex.from_model(tiny_flux).layers]
    assert list(stream._arena.key) == list(stream._arena.value) == layers[:-1]
    last = [(key, output) for (_, _, layer), key, output in reader.records if layer == layers[-1]]
    assert len(last) == STEPS and all(output is None for _, output in last)
    with_outputs = carried(tiny_flux, 2**40, monkeypatch)
    assert all(torch.equal(key, other) for (_, key, _), (_, other, _) in zip(reader.records, with_outputs))


def test_steps_spread_evenly_over_as_few_batches_as_the_budget_allows():
    assert [Arena.spread(10, most) for most in (0, 1, 2, 4, 5, 6, 9, 10, 64)] == [0, 0, 2, 4, 5, 5, 5, 10, 10]
    assert Arena.spread(1, 64) == 0  # one forward: nothing to carry side by side


@torch.no_grad()
def test_two_calls_of_other_lengths_in_one_trace_are_each_carried_from_their_own_encodings(tiny_sd3, monkeypatch):
    alone = [carried(tiny_sd3, 2**40, monkeypatch, max_sequence_length=length) for length in (16, 24)]
    recorder = Recorder()
    stream = ConceptStream(tiny_sd3, WORDS, readers=[recorder])
    with headscope.trace(tiny_sd3, maps=False, concepts=stream):
        generate_joint(tiny_sd3, PROMPTS, steps=STEPS, max_sequence_length=16)
        generate_joint(tiny_sd3, PROMPTS, steps=STEPS, max_sequence_length=24)
    assert [where[0] for where, _, _ in recorder.records] == [0] * (len(recorder.records) // 2) + \
        [1] * (len(recorder.records) // 2)
    for (where, key, _), (_, key_alone, _) in zip(recorder.records, alone[0] + alone[1]):
        assert torch.allclose(key, key_alone, atol=1e-5), where


@torch.no_grad()
def test_the_blocks_that_ran_before_an_interruption_are_handed_out_when_the_trace_closes(tiny_sd3):
    recorder = Recorder()
    n_layers = headscope.HeadIndex.from_model(tiny_sd3).n_layers

    def stop(pipe, step, timestep, kwargs):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        with headscope.trace(tiny_sd3, maps=False, concepts=ConceptStream(tiny_sd3, WORDS, readers=[recorder])):
            generate_joint(tiny_sd3, PROMPTS, steps=STEPS, callback_on_step_end=stop)
    assert [where for where, _, _ in recorder.records] == [(0, 0, layer) for layer in range(n_layers)]


def test_stacked_joins_evenly_spaced_views_without_a_copy_and_copies_anything_else():
    room = torch.randn(3, 4, 2, 5)
    parts = [room[0, slot] for slot in range(4)]
    joined = stacked(parts)
    assert torch.equal(joined, torch.stack(parts)) and joined.data_ptr() == room.data_ptr()  # a view
    across = [room[layer, slot] for layer in range(3) for slot in range(4)]  # blocks one after another
    assert torch.equal(stacked(across), torch.stack(across)) and stacked(across).data_ptr() == room.data_ptr()
    for uneven in ([room[0, 0], room[0, 1], room[0, 3]], [room[0, 1], room[0, 0]], [room[0, 0], room[0, 0]],
                   [room[0, 0], torch.randn(2, 5)], [room[0, 0]]):
        result = stacked(uneven)
        assert torch.equal(result, torch.stack(uneven))
        assert result.data_ptr() != room.data_ptr() or len(uneven) == 1
