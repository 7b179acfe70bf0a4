"""benchmarks/hrv_build.py's FLOP counts: the CPU attention kernel is counted, tracing without hooks adds no
arithmetic, the vote probe adds some, and --repeats 0 counts without timing (only with --flops); the arena
budget arms (--stream-budgets) run with streams of their own budgets; the rows-bound arm (--rows-bound) is a
plain call whose text is longer by a token per concept."""
import argparse

import pytest
import torch
import torch.nn.functional as F

from headscope.concepts import ConceptSet

CONCEPTS = ConceptSet("tiny", {"color": ["red", "blue"], "animal": ["dog", "cat"]})
CALL = {"height": 16, "width": 16, "max_sequence_length": 16}


@pytest.fixture
def hrv_build(load_benchmark):
    return load_benchmark("hrv_build")


def test_the_cpu_attention_kernel_is_counted(hrv_build):
    query, key, value = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    flops = hrv_build.count_flops(lambda arm: F.scaled_dot_product_attention(query, key, value), "any")
    assert flops == 2 * (2 * 2 * 3 * 5 * 7 * 8)  # q k^T and the weighted sum of values


@torch.no_grad()
def test_tracing_adds_no_flops_and_the_probe_adds_its_streams(hrv_build, tiny_flux):
    args = argparse.Namespace(steps=2, repeats=0, flops=True, stream_budgets=[], rows_bound=False)
    counted = hrv_build.time_arms(tiny_flux, CONCEPTS, ["a red dog"], CALL, args)
    assert set(counted) == {"flops", "probe_flops_over_plain", "traced_flops_over_plain", "repeats", "arm_prompts"}
    flops = counted["flops"]
    assert flops["traced"] == flops["plain"] and flops["probe"] > flops["plain"]
    assert counted["probe_flops_over_plain"] == round(flops["probe"] / flops["plain"], 4)


@torch.no_grad()
def test_budget_arms_carry_with_their_own_arenas(hrv_build, tiny_flux):
    args = argparse.Namespace(steps=3, repeats=1, flops=False, stream_budgets=[0, 2**20], rows_bound=False)
    timed = hrv_build.time_arms(tiny_flux, CONCEPTS, ["a red dog"], CALL, args)
    assert timed["slots"] == 3  # the default arena holds every step of this tiny model
    assert [(arm["budget_mib"], arm["slots"]) for arm in timed["budget_arms"]] == [(0, 0), (2**20, 3)]
    assert set(timed["median_seconds"]) == {"plain", "traced", "probe", hrv_build.budget_arm(0),
                                            hrv_build.budget_arm(2**20)}


@torch.no_grad()
def test_the_rows_bound_arm_is_a_plain_call_a_text_token_longer_per_concept(hrv_build, tiny_flux, monkeypatch):
    lengths = []
    call = type(tiny_flux).__call__

    def spy(pipe, *args, **kwargs):
        lengths.append(kwargs["max_sequence_length"])
        return call(pipe, *args, **kwargs)
    monkeypatch.setattr(type(tiny_flux), "__call__", spy)
    args = argparse.Namespace(steps=2, repeats=1, flops=True, stream_budgets=[], rows_bound=True)
    timed = hrv_build.time_arms(tiny_flux, CONCEPTS, ["a red dog"], CALL, args)
    bound = timed["rows_bound"]
    assert (bound["extra_tokens"], bound["max_sequence_length"]) == (2, 18)  # 2 concepts over 16 text tokens
    assert hrv_build.ROWS_BOUND in timed["median_seconds"] and sorted(set(lengths)) == [16, 18]
    assert timed["flops"][hrv_build.ROWS_BOUND] > timed["flops"]["plain"] and bound["flops_over_plain"] > 1


def test_repeats_zero_needs_flops(hrv_build, capsys):
    with pytest.raises(SystemExit) as stopped:
        hrv_build.main(["--tiny", "--repeats", "0"])
    assert stopped.value.code == 2
    assert "--repeats 0: give a positive number of timed runs (0 only with --flops)" in capsys.readouterr().err
