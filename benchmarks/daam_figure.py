"""The comparison figure of daam_segmentation.py: image | each method's map | ground truth, one row per pick."""
from __future__ import annotations

import sys
from pathlib import Path

import map_fit
from headscope.maps import metrics

FIGURE_METHODS = ("daam", "selective", "weighted", "fitted")
JOINT_FIGURE_METHODS = ("daam", "fitted", "concept")  # a joint model's: word maps, and ConceptAttention's
FIGURE_PICKS = (("shape", "one object"), ("shape", "pair, second"), ("color", "one object"), ("size", ""),
                ("position", ""))  # (role, context): one row each, each from another prompt
FIGURE_RENDERED_PICKS = (("shape", "pair"),)


def save(figure: Path, records, fit: map_fit.Fit, methods: dict, image_maps: dict | None, *,
         shown=FIGURE_METHODS, concept_fit: map_fit.Fit | None = None) -> None:
    """Draw the generated (and rendered) held-out rows to `figure`, when there is a row to draw; takes the
    rendered records and fit out of `image_maps` ("_heldout", "_fit"), which the JSON does not keep.
    On a joint model `shown` = JOINT_FIGURE_METHODS and `concept_fit` the concept maps' fit
    (`daam_joint.concept_fit`): their maps are each record's "concept_maps"."""
    rows = figure_rows(records, fit, methods, label="generated", picks=FIGURE_PICKS, shown=shown,
                       concept_fit=concept_fit)
    if image_maps:
        rows += figure_rows(image_maps.pop("_heldout"), image_maps.pop("_fit"), image_maps["methods"],
                            label="rendered", picks=FIGURE_RENDERED_PICKS)
    if rows:
        from headscope import viz

        viz.save_figure(viz.method_comparison_figure(rows, shown), figure)
        print(f"wrote {figure}", file=sys.stderr)


def figure_rows(records, fit: map_fit.Fit, table: dict, *, label: str, picks, shown=FIGURE_METHODS,
                concept_fit: map_fit.Fit | None = None) -> list[dict]:
    """Panels of the comparison figure, one per (role, context) in `picks`: the first scored record of
    that kind (any context when none) whose prompt no earlier row used, with every method's map (its
    chosen view and heads; a concept map: its view of the record's one-map stack, as it was scored)."""
    rows, used = [], set()
    for role, context in picks:
        fresh = [r for r in records if r["found"] and r["role"] == role and r["prompt"] not in used]
        record = next((r for r in fresh if context in r["context"]), fresh[0] if fresh else None)
        if record is None:
            continue
        used.add(record["prompt"])
        maps, scores = {}, {}
        for method in shown:
            entry = table.get(role, {}).get(method)
            concept = method == "concept"
            source = record.get("concept_maps") if concept else record["maps"]
            if entry is None or source is None or entry["config"]["view"] not in source or (concept and not concept_fit):
                continue
            choice = {"view": entry["config"]["view"], "k": entry["config"]["k"]}
            heads = map_fit.head_stack(source[choice["view"]], record["target"].shape, fit.upsample)
            weights = concept_fit.weights(role, "daam", choice) if concept else fit.weights(role, method, choice)
            maps[method] = map_fit.method_map(weights, heads)
            scores[method] = metrics.daam_iou(maps[method], record["target"], 0.4)
        rows.append({"image": record["_image"], "word": record["word"], "prompt": record["prompt"],
                     "source": label, "maps": maps, "scores": scores, "truth": record["target"]})
    return rows
