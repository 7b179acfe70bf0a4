"""HRVs derived from one file: the votes of a step window, and relevance as each head's share over concepts."""
import pytest
import torch

from headscope import HeadscopeError
from headscope.hrv import HRV

# [steps, concepts, heads]: 3 steps, 2 concepts, 4 heads; every head casts one vote per step
STEP_VOTES = torch.tensor([[[1.0, 1, 0, 0], [0, 0, 1, 1]],
                           [[1.0, 0, 0, 0], [0, 1, 1, 1]],
                           [[0.0, 0, 0, 1], [1, 1, 1, 0]]])


def hrv():
    return HRV.from_votes(STEP_VOTES.sum(dim=0), ["color", "shape"], {"steps": 3}, STEP_VOTES)


def test_a_step_window_holds_only_the_votes_of_its_steps():
    early = hrv().window(0, 2)
    assert torch.equal(early.step_votes, STEP_VOTES[:2])
    assert torch.allclose(early.vectors, HRV.from_votes(STEP_VOTES[:2].sum(dim=0), ["color", "shape"], {}).vectors)
    assert early.vectors[0].tolist() == pytest.approx([8 / 3, 4 / 3, 0.0, 0.0])
    assert early.meta["step_window"] == [0, 2] and early.meta["steps"] == 3


def test_the_full_window_is_the_hrv_itself():
    assert torch.allclose(hrv().window(0, 3).vectors, hrv().vectors)


def test_a_window_of_a_window_counts_in_the_builds_steps():
    assert hrv().window(1, 3).window(1, 2).meta["step_window"] == [2, 3]
    assert torch.equal(hrv().window(1, 3).window(1, 2).step_votes, STEP_VOTES[2:3])


def test_a_concept_without_votes_in_the_window_gets_a_uniform_row():
    late = hrv().window(2, 3)
    assert late.vectors[0].tolist() == [0.0, 0.0, 0.0, 4.0] and late.meta["unvoted"] == []
    assert HRV.from_votes(torch.zeros(2, 4), ["a", "b"], {}, torch.zeros(1, 2, 4)).window(0, 1).meta["unvoted"] == ["a", "b"]


@pytest.mark.parametrize("start, stop", [(2, 2), (-1, 2), (0, 4), (3, 1)])
def test_an_empty_or_outside_window_is_refused(start, stop):
    with pytest.raises(HeadscopeError, match=r"outside this HRV's 3 steps; give 0 <= start < stop <= 3"):
        hrv().window(start, stop)


def test_an_hrv_without_step_votes_has_no_windows():
    with pytest.raises(HeadscopeError, match="keeps no per-step votes"):
        HRV(["color"], torch.ones(1, 4)).window(0, 1)


def test_head_shares_divide_each_heads_relevance_by_its_sum_then_rescale_each_row():
    vectors = torch.tensor([[3.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # rows of mean 1
    shares = HRV(["color", "shape"], vectors, None, {"soft": True}).head_shares()
    expected = torch.tensor([[0.75, 0.5, 0.0], [0.25, 0.5, 1.0]])
    assert torch.allclose(shares.vectors, expected / expected.sum(dim=1, keepdim=True) * 3)
    assert shares.meta["relevance"] == "head shares" and shares.meta["soft"] and shares.step_votes is None


def test_head_shares_demote_a_head_that_serves_every_concept():
    # head 0 is the most relevant to color, but it is as relevant to shape; head 1 serves color alone
    vectors = torch.tensor([[2.0, 1.5, 0.5], [2.0, 0.0, 1.0]])
    before = HRV(["color", "shape"], vectors, None, {})
    assert before.ranking("color").tolist()[0] == 0 and before.head_shares().ranking("color").tolist()[0] == 1


def test_head_shares_of_a_head_without_relevance_are_zero():
    shares = HRV(["color", "shape"], torch.tensor([[2.0, 0.0], [2.0, 0.0]]), None, {}).head_shares()
    assert shares.vectors.tolist() == [[2.0, 0.0], [2.0, 0.0]]
