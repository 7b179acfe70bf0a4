"""Map methods fit on a calibration split and scored on a held-out one (used by daam_segmentation.py).

A *record* is one word of one image whose object was found: its role, its target mask and, per
*view*, the word's per-head maps at each layer's native resolution (`native_maps`). A view is a step
window of the run (and, for maps of existing images, a noising strength). Every method's map is a
weighted sum of the upsampled per-head maps, `weights @ heads`, which is exactly what
`tc.word_map(word, method=..., steps=window)` returns, so one trace serves every method:

    daam       every head, weight 1
    selective  the HRV's top-k heads of the role's concept (k from K_GRID)
    weighted   every head times its HRV relevance
    fitted     the k heads with the best calibration mIoU@0.4 for the role (not a library method:
               `tc.word_map(word, heads=...)` with heads found on the calibration split)
    oracle     the k heads with the best *held-out* mIoU@0.4, k and view chosen on held-out too:
               an upper bound of any choice of heads, not a result

Fit, per role and method, on the calibration records: the view and k with the highest mean IoU at
tau = 0.4 (ties: the earlier view, the smaller k), then tau* of the DAAM protocol on TAU_GRID. Scored on
the held-out records: the pointing game, DAAM's mIoU at TAUS and at tau*, and ConceptAttention's
mean-threshold protocol (`headscope.maps.metrics`).
"""
from __future__ import annotations

import numpy as np
import torch

from headscope.maps import daam, metrics

ROLES = ("shape", "color", "size", "position")
ROLE_CONCEPT = {"shape": "shape", "color": "color", "size": "size", "position": "position"}
METHODS = ("daam", "selective", "weighted", "fitted", "oracle")
K_GRID = (1, 2, 4, 8, 16, 32)
TAUS = (0.3, 0.4, 0.5)
TAU_GRID = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
FIT_TAU = 0.4


def native_maps(tc, word: str, occurrence: int, image: int, steps) -> list[torch.Tensor]:
    """The word's maps per layer at native resolution, averaged over `steps` (None: every recorded
    step): [[heads, h, w] per layer], the pieces `tc.head_maps(word, steps=steps)` upsamples."""
    positions = tc.tokenization(image).positions(word, occurrence)
    chosen = daam._chosen_steps(tc, steps, "cond")
    return [tc.reducer.layer_maps("cond", layer.index, image, positions, chosen).clone() for layer in tc.index.layers]


def head_stack(native: list[torch.Tensor], size, upsample: str) -> torch.Tensor:
    """[n_heads, H, W]: every head's map upsampled on its own to `size` (= `tc.head_maps(size=size)`)."""
    return torch.cat([daam._upsample(maps, tuple(size), upsample) for maps in native])


def method_map(weights: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """[H, W] = sum over heads of weights[head] * heads[head]; weights [n_heads], heads [n_heads, H, W]."""
    return torch.einsum("n,nhw->hw", weights.to(heads), heads)


class Fit:
    """Candidate head weights per role and view, calibration choices, held-out scores.

    hrv: the model's HRV (selective, weighted); views: ordered view names; ks: K_GRID capped at n_heads.
    """

    def __init__(self, hrv, n_heads: int, views: list[str], size, upsample: str):
        self.hrv, self.n_heads, self.views, self.size, self.upsample = hrv, n_heads, views, tuple(size), upsample
        self.ks = [k for k in K_GRID if k <= n_heads]
        self.rankings: dict[str, dict] = {"fitted": {}, "oracle": {}}

    # -- candidates ---------------------------------------------------------------------------

    def rank_heads(self, calibration, heldout) -> None:
        """Order the heads by mean IoU@0.4, per role and view: on calibration (fitted), on held-out (oracle)."""
        for name, records in (("fitted", calibration), ("oracle", heldout)):
            for role in ROLES:
                for view in self.views:
                    scored = [r for r in records if r["role"] == role and view in r["maps"]]
                    if scored:
                        per_head = np.mean([self.head_ious(r, view) for r in scored], axis=0)
                        self.rankings[name][role, view] = np.argsort(-per_head, kind="stable")

    def head_ious(self, record, view) -> np.ndarray:
        """[n_heads] IoU@0.4 of each head's own map (cached on the record)."""
        cache = record.setdefault("_head_iou", {})
        if view not in cache:
            heads = head_stack(record["maps"][view], self.size, self.upsample)
            cache[view] = metrics.daam_iou_stack(heads, record["target"], (FIT_TAU,))[:, 0]
        return cache[view]

    def candidates(self, role: str, view: str) -> list[tuple[str, int | None, torch.Tensor]]:
        """(method, k, weights [n_heads]) of every candidate for one role and view."""
        concept = ROLE_CONCEPT[role]
        found = [("daam", None, torch.ones(self.n_heads))]
        if self.hrv is not None:
            found += [("selective", k, _indicator(self.hrv.top_heads(concept, k), self.n_heads)) for k in self.ks]
            found.append(("weighted", None, self.hrv.vector(concept).clamp_min(0)))
        for name in ("fitted", "oracle"):
            ranking = self.rankings[name].get((role, view))
            if ranking is not None:
                found += [(name, k, _indicator(torch.as_tensor(ranking[:k].copy()), self.n_heads)) for k in self.ks]
        return found

    # -- fitting and scoring ------------------------------------------------------------------

    def cheap_scores(self, records) -> dict:
        """{(role, view, method, k): [records, len(TAU_GRID)] IoUs} for every candidate (pointing aside)."""
        scores: dict = {}
        for record in records:
            for view, native in record["maps"].items():
                heads = head_stack(native, self.size, self.upsample)
                cands = self.candidates(record["role"], view)
                maps = torch.einsum("cn,nhw->chw", torch.stack([w for _, _, w in cands]).to(heads), heads)
                ious = metrics.daam_iou_stack(maps, record["target"], TAU_GRID)
                for (method, k, _), row in zip(cands, ious):
                    scores.setdefault((record["role"], view, method, k), []).append(row)
        return {key: np.array(rows) for key, rows in scores.items()}

    def choose(self, scores: dict, role: str, method: str) -> dict | None:
        """The view, k and tau* of `method` for `role` with the best mean IoU@0.4 in `scores`."""
        column = TAU_GRID.index(FIT_TAU)
        options = [(view, k) for (r, view, m, k) in scores if r == role and m == method]
        if not options:
            return None
        order = {view: i for i, view in enumerate(self.views)}
        options.sort(key=lambda vk: (order[vk[0]], vk[1] or 0))
        view, k = max(options, key=lambda vk: scores[role, vk[0], method, vk[1]][:, column].mean())
        taus = scores[role, view, method, k].mean(axis=0)
        return {"view": view, "k": k, "tau": TAU_GRID[int(np.argmax(taus))],
                "fit_miou@0.4": float(taus[column]), "n_fit": int(len(scores[role, view, method, k]))}

    def weights(self, role: str, method: str, choice: dict) -> torch.Tensor:
        return next(w for m, k, w in self.candidates(role, choice["view"]) if m == method and k == choice["k"])

    def score(self, records, role: str, method: str, choice: dict) -> dict:
        """Every protocol's numbers for one method's chosen configuration on `records` (one role)."""
        weights = self.weights(role, method, choice)
        rows = [r for r in records if r["role"] == role and choice["view"] in r["maps"]]
        per_pair = []
        for record in rows:
            heat = method_map(weights, head_stack(record["maps"][choice["view"]], self.size, self.upsample))
            target = record["target"]
            taus = metrics.daam_iou_stack(heat[None], target, (*TAUS, choice["tau"]))[0]
            per_pair.append({"pointing": float(metrics.pointing(heat, target)),
                             **{f"miou@{tau}": float(v) for tau, v in zip(TAUS, taus)},
                             "miou@fit": float(taus[-1]),
                             **{f"mean_threshold_{key}": v for key, v in metrics.mean_threshold(heat, target).items()}})
        if not per_pair:
            return {"n": 0}
        summary = {key: float(np.nanmean([pair[key] for pair in per_pair])) for key in per_pair[0]}
        summary["n"] = len(per_pair)
        contexts = sorted({r.get("context", "") for r in rows})
        if len(contexts) > 1:
            summary["pointing_by_context"] = {c: float(np.mean([p["pointing"] for p, r in zip(per_pair, rows)
                                                                if r.get("context", "") == c])) for c in contexts}
        return summary

    def heads_of(self, role: str, method: str, choice: dict) -> list[int] | None:
        """The flat ids a method's choice sums (None: every head, with weights)."""
        if method in ("daam", "weighted"):
            return None
        return torch.nonzero(self.weights(role, method, choice)).flatten().tolist()


def fit_and_score(fit: Fit, calibration, heldout, methods=METHODS) -> dict:
    """{role: {method: {"config", "calibration", "heldout"}}}: each of `methods` fit on calibration, scored
    held-out (the oracle both chosen and scored on held-out). Heads are ranked only for fitted or oracle."""
    if {"fitted", "oracle"} & set(methods):
        fit.rank_heads(calibration, heldout)
    cal_scores, held_scores = fit.cheap_scores(calibration), fit.cheap_scores(heldout)
    table: dict = {}
    for role in ROLES:
        for method in methods:
            choice = fit.choose(held_scores if method == "oracle" else cal_scores, role, method)
            if choice is None:
                continue
            config = {"view": choice["view"], "k": choice["k"], "tau_fit": choice["tau"],
                      "heads": fit.heads_of(role, method, choice)}
            table.setdefault(role, {})[method] = {
                "config": config, "chosen_on": "heldout (oracle)" if method == "oracle" else "calibration",
                "fit_miou@0.4": choice["fit_miou@0.4"], "n_fit": choice["n_fit"],
                "heldout": fit.score(heldout, role, method, choice)}
    return table


def _indicator(head_ids: torch.Tensor, n_heads: int) -> torch.Tensor:
    chosen = torch.zeros(n_heads)
    chosen[head_ids.long()] = 1.0
    return chosen
