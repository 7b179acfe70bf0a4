"""Which heads a word map sums, and with what weight: one argument of the same call.

    "daam"       every head, weight 1 (Tang et al. 2022; the default)
    "selective"  only the heads most relevant to the word's concept by an HRV (Park et al. 2026,
                 "Selective Aggregation of Attention Maps"): the top `k`, or those whose relevance is
                 at least `min_relevance` (HRV rows have mean 1, so 1.0 keeps the heads above average)
    "weighted"   every head, weighted by its relevance to the word's concept

or explicit `heads=` (flat ids) / `weights=` (`[n_heads]`) from the caller. The word's concept is
looked up in the HRV's own concept set (the words it was built from), or given as `concept=`.

Everything reduces to one weight per head, `[n_heads]` float32, or None for DAAM's plain sum (kept
apart so a DAAM map stays bitwise the sum it always was).
"""
from __future__ import annotations

import torch

from headscope.errors import HeadscopeError

METHODS = ("daam", "selective", "weighted")
DEFAULT_MIN_RELEVANCE = 1.0


def head_weights(trace, word: str, *, method: str = "daam", hrv=None, concept: str | None = None,
                 k: int | None = None, min_relevance: float | None = None, heads=None,
                 weights=None) -> torch.Tensor | None:
    """Weight of every head for `word`'s map: [n_heads] float32, or None (DAAM: the chosen heads, weight 1).

    `heads` and `weights` are the caller's own choice and go with method "daam" only; "selective" and
    "weighted" read `hrv` (default: the model's shipped HRV).
    """
    n_heads = trace.index.n_heads
    if method not in METHODS:
        raise HeadscopeError(f"unknown map method {method!r}; use one of {', '.join(METHODS)}")
    if method != "daam" and (heads is not None or weights is not None):
        raise HeadscopeError(f"method={method!r} chooses its own heads; pass heads= or weights= with method='daam'")
    if weights is not None:
        if heads is not None:
            raise HeadscopeError("pass heads= or weights=, not both")
        return _check_weights(weights, n_heads)
    if method == "daam":
        return None  # the caller's `heads` (if any) choose among the layers' heads, weight 1
    from headscope.steer.scale import resolve_hrv

    hrv = resolve_hrv(trace.pipe, hrv)
    hrv.check_compatible(trace.index)
    name = hrv.concept(concept) if concept is not None else word_concept(hrv, word)
    relevance = hrv.vector(name)  # [n_heads]
    if method == "weighted":
        return relevance.clamp_min(0)
    if k is not None and min_relevance is not None:
        raise HeadscopeError("selective maps take k= or min_relevance=, not both")
    if k is not None:
        return _indicator(hrv.top_heads(name, _check_k(k, n_heads)), n_heads)
    floor = DEFAULT_MIN_RELEVANCE if min_relevance is None else float(min_relevance)
    chosen = (relevance >= floor).float()
    if not chosen.any():
        raise HeadscopeError(f"no head has relevance >= {floor} for this concept (max {relevance.max():.2f}); "
                             "lower min_relevance or pass k")
    return chosen


def word_concept(hrv, word: str) -> str:
    """The HRV concept whose words hold `word` (`HRV.concepts_of`); HeadscopeError when none or several."""
    if not hrv.concept_words:
        raise HeadscopeError(f"this HRV does not store its concept words; pass concept= (one of "
                             f"{', '.join(hrv.concepts)})")
    found = hrv.concepts_of(word)
    if not found:
        raise HeadscopeError(f"{word!r} is in none of this HRV's concepts; pass concept= (one of "
                             f"{', '.join(hrv.concepts)})")
    if len(found) > 1:
        raise HeadscopeError(f"{word!r} belongs to several concepts ({', '.join(found)}); pass concept= to choose")
    return found[0]


def _indicator(head_ids: torch.Tensor, n_heads: int) -> torch.Tensor:
    chosen = torch.zeros(n_heads)
    chosen[head_ids] = 1.0
    return chosen


def _check_weights(weights, n_heads: int) -> torch.Tensor:
    weights = torch.as_tensor(weights, dtype=torch.float32).flatten()
    if weights.numel() != n_heads:
        raise HeadscopeError(f"weights= has {weights.numel()} values; this model has {n_heads} heads")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise HeadscopeError("weights= must be finite and >= 0")
    if not weights.any():
        raise HeadscopeError("weights= are all zero; nothing to sum")
    return weights


def _check_k(k: int, n_heads: int) -> int:
    if not 1 <= int(k) <= n_heads:
        raise HeadscopeError(f"k={k} out of range; choose 1..{n_heads}")
    return int(k)
