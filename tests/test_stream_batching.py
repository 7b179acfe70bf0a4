"""The concept stream keeps a call's blocks and carries them for every forward side by side (tiny SD3 and
Flux): the same keys and outputs as carrying each block as it runs, handed out in the order they ran, no
more held than its budget, everything handed out by the end of the call, and what ran before an
interruption handed out when the trace closes."""
import pytest
import torch

import headscope
from headscope.stream import ConceptStream
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

    def run(budget):
        monkeypatch.setattr("headscope.stream.STREAM_BUDGET_BYTES", budget)
        arrived.clear()
        recorder.records.clear()
        stream = ConceptStream(tiny_flux, WORDS, readers=[recorder])
        with headscope.trace(tiny_flux, maps=False, concepts=stream):
            generate_joint(tiny_flux, PROMPTS, steps=STEPS)
            assert len(recorder.records) == STEPS * n_layers  # by the call's end, inside the trace
            assert stream._forwards == []
            return stream._slots, (arena_bytes(stream) if stream._arena is not None else 0)

    try:
        slots, held = run(2**40)
        assert slots == STEPS and arrived == [0] * STEPS  # every forward side by side after the last step
        per_forward = held // STEPS
        assert run(2 * per_forward) == (2, 2 * per_forward)  # two fit: carried after the second forward
        assert arrived == [0, 0, 2 * n_layers]
        assert run(2 * per_forward - 1) == (0, 0)  # fewer than two fit: block by block, as they run
        assert arrived == [step * n_layers for step in range(STEPS)]
    finally:
        handle.remove()


@torch.no_grad()
def test_one_arena_serves_every_call_of_a_trace_and_goes_when_it_closes(tiny_sd3):
    stream = ConceptStream(tiny_sd3, WORDS, readers=[Recorder()])
    with headscope.trace(tiny_sd3, maps=False, concepts=stream):
        generate_joint(tiny_sd3, PROMPTS, steps=STEPS)
        first = {layer: tensor.data_ptr() for layer, tensor in stream._arena.key.items()}
        generate_joint(tiny_sd3, PROMPTS, seed=1, steps=STEPS)
        assert {layer: tensor.data_ptr() for layer, tensor in stream._arena.key.items()} == first
    assert stream._arena is None


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
