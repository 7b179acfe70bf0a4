"""Descriptive adjectives (DAAM, sec. 6): does an adjective's map spread beyond its noun's object?

For every adjective that modifies a noun (spaCy amod, or ADJ whose head is a NOUN), both maps are
thresholded at tau: the coverage ratio is the adjective's coverage over the noun's (above 1: the
adjective attends more broadly than its noun). On the shapes world the object is known: the
annotator's object that overlaps the noun's map most gives a mask, and the share of each map outside
that mask says how far it spreads beyond the object. The paper finds that descriptive adjectives
attend too broadly (colour bleeding into the background and other objects).
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy import ndimage

from headscope.studies.plots import OTHER_COLOR, OURS_COLOR, bars, example_figure, standard_error
from headscope.studies.runner import Sample, Study, described_single, mean

SHAPES_KINDS = {"size": ("small", "large"), "fill": ("hollow",)}  # other shapes-world adjectives are colours


class AdjectiveStudy(Study):
    """Coverage ratio of adjective to noun maps; on the shapes world, their spread outside the object."""

    name = "adjectives"
    title = "Do adjectives attend beyond their noun's object?"
    captions = {"adjectives.png": "left: an adjective's map coverage over its noun's (above 1: broader); right: "
                                  "share of each thresholded map outside the noun's object (annotator's mask)",
                "adjectives-examples.png": "example prompts: an adjective's map beside its noun's"}

    def shapes_scenes(self, sampler, n: int) -> list:
        scenes = []
        for number in range(n):
            if number % 3 == 2:
                scenes.append(sampler.pair())
                continue
            scene = sampler.single(fill="hollow", allow_glyphs=False) if number % 6 == 4 else sampler.single()
            # name size, colour and position, so every adjective can be read
            scenes.append(described_single(scene.objects[0], say_size=True))
        return scenes

    def measure(self, sample: Sample) -> tuple[dict, dict]:
        pairs, arrays = [], {}
        for token in sample.parse:
            head = sample.parse[token.head]
            if token.pos != "ADJ" or head.pos not in ("NOUN", "PROPN") or head.word_index == token.word_index:
                continue
            adjective_map = sample.word_map(token.word, token.occurrence)
            noun_map = sample.word_map(head.word, head.occurrence)
            adjective_mask, noun_mask = sample.mask(token.word, token.occurrence), sample.mask(head.word, head.occurrence)
            adjective_cover, noun_cover = float(adjective_mask.float().mean()), float(noun_mask.float().mean())
            pair = {"adjective": token.text.lower(), "noun": head.text.lower(), "kind": adjective_kind(token.text),
                    "adjective_coverage": adjective_cover, "noun_coverage": noun_cover,
                    "coverage_ratio": adjective_cover / noun_cover if noun_cover else None,
                    "adjective_outside_object": None, "noun_outside_object": None}
            if sample.scene is not None:
                obj = _object_of(sample.objects, noun_mask)
                if obj is not None:
                    inside = torch.from_numpy(ndimage.binary_fill_holes(obj.mask))  # a hollow shape's inside is its own
                    pair["adjective_outside_object"] = _outside(adjective_mask, inside)
                    pair["noun_outside_object"] = _outside(noun_mask, inside)
                    pair["object_share"] = float(inside.float().mean())
            pairs.append(pair)
            if sample.example and not arrays:
                arrays = {"maps": np.stack([adjective_map.numpy(), noun_map.numpy()]).astype(np.float16)}
        return {"pairs": pairs}, arrays

    def summarize(self, records: list[dict]) -> dict:
        by_adjective, by_kind = defaultdict(list), defaultdict(list)
        for record in records:
            for pair in record["pairs"]:
                by_adjective[pair["adjective"]].append(pair)
                by_kind[pair["kind"]].append(pair)
        table = [_row("adjective", word, pairs) for word, pairs in sorted(by_adjective.items())]
        kinds = {kind: _row("kind", kind, pairs) for kind, pairs in sorted(by_kind.items())}
        every = [pair for pairs in by_kind.values() for pair in pairs]
        overall = _row("all", "all", every) if every else None
        return {"table": table + list(kinds.values()) + ([overall] if overall else []), "kinds": kinds,
                "all": overall}

    def figures(self, summary: dict, records: list[dict], store) -> dict:
        files = {"adjectives.png": adjective_figure(summary)}
        rows = []
        for record in records:
            maps = store.arrays(record["key"]).get("maps")
            image = store.image(record["key"])
            if maps is None or image is None:
                continue
            pair = record["pairs"][0]
            outside = pair["adjective_outside_object"]
            label = f'"{pair["adjective"]}"' + ("" if outside is None else f"\n{outside:.0%} outside the object")
            rows.append({"image": image, "prompt": record["prompt"], "tau": summary["tau"],
                         "panels": [(label, maps[0]), (f'its noun "{pair["noun"]}"', maps[1])]})
        if rows:
            files["adjectives-examples.png"] = example_figure(rows, "An adjective's map beside its noun's",
                                                              "white line: the tau contour")
        return files

    def headline(self, summary: dict) -> list[str]:
        lines = [f"{'adjectives':<12}{'n':>5}{'ratio':>7}{'adj outside':>13}{'noun outside':>14}"]
        for row in list(summary["kinds"].values()) + ([summary["all"]] if summary["all"] else []):
            lines.append(f"{row['name']:<12}{row['n']:>5}{_fmt(row['coverage_ratio']):>7}"
                         f"{_fmt(row['adjective_outside_object']):>13}{_fmt(row['noun_outside_object']):>14}")
        return lines


def adjective_kind(word: str) -> str:
    """"size", "fill" or "colour" for shapes-world adjectives; "other" for any other word."""
    from headscope.shapes.world import COLORS

    word = word.lower()
    for kind, words in SHAPES_KINDS.items():
        if word in words:
            return kind
    return "colour" if word in COLORS else "other"


def _object_of(objects, noun_mask: torch.Tensor):
    """The detected object the noun's map overlaps most (None if there is none or no overlap)."""
    best, best_overlap = None, 0.0
    for obj in objects:
        shared = float((torch.from_numpy(obj.mask) & noun_mask).sum())
        if shared > best_overlap:
            best, best_overlap = obj, shared
    return best


def _outside(mask: torch.Tensor, inside: torch.Tensor) -> float | None:
    size = float(mask.sum())
    return float((mask & ~inside).sum()) / size if size else None


def _row(level: str, name: str, pairs: list[dict]) -> dict:
    ratios = [p["coverage_ratio"] for p in pairs]
    return {"level": level, "name": name, "n": len(pairs), "coverage_ratio": mean(ratios),
            "coverage_ratio_stderr": standard_error(ratios),
            "adjective_coverage": mean(p["adjective_coverage"] for p in pairs),
            "noun_coverage": mean(p["noun_coverage"] for p in pairs),
            "adjective_outside_object": mean(p["adjective_outside_object"] for p in pairs),
            "noun_outside_object": mean(p["noun_outside_object"] for p in pairs)}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def adjective_figure(summary: dict) -> Figure:
    """Left: coverage ratio per adjective (1 = as broad as its noun). Right: share outside the object."""
    rows = [row for row in summary["table"] if row["level"] == "adjective"]
    figure = Figure(figsize=(max(8.0, 0.55 * len(rows) + 5.0), 4.2), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[max(1.0, len(rows) / 5), 1])
    bars(left, [row["name"] for row in rows], [row["coverage_ratio"] for row in rows],
         errors=[row["coverage_ratio_stderr"] for row in rows], counts=[row["n"] for row in rows])
    left.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    left.text(-0.45, 1.02, "as broad as its noun", ha="left", va="bottom", fontsize=7)
    left.set_ylabel("adjective's coverage / its noun's coverage")
    left.tick_params(axis="x", labelrotation=45)
    left.set_title("How broad is an adjective's map, relative to its noun's?", fontsize=9)
    kinds = list(summary["kinds"].values())
    labels = [row["name"] for row in kinds]
    bars(right, labels, [row["adjective_outside_object"] for row in kinds], color=OURS_COLOR, width=0.38,
         offset=-0.2, label="adjective")
    bars(right, labels, [row["noun_outside_object"] for row in kinds], color=OTHER_COLOR, width=0.38, offset=0.2,
         label="its noun")
    right.set_ylim(0, 1.15)
    right.set_ylabel("share of the thresholded map outside the object")
    right.legend(fontsize=7)
    known = any(row["adjective_outside_object"] is not None for row in kinds)
    right.set_title("Spread beyond the object" + ("" if known else "\n(needs the shapes annotator: n/a)"), fontsize=9)
    figure.suptitle("Descriptive adjectives (DAAM paper: they attend too broadly)", fontsize=10)
    return figure
