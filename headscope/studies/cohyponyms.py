"""Co-hyponyms (DAAM, sec. 6): two words of one kind ("giraffe" and "zebra") in one prompt.

The paper finds that co-hyponyms' maps overlap heavily and that their images are worse (generation
quality 9 % lower than with unrelated pairs). Here every prompt holds two nouns; their DAAM maps are
thresholded at tau and compared (IoU, share of each inside the other), for co-hyponym pairs against
unrelated pairs. On the shapes world the generation's quality is the annotator's verdict that both
objects were drawn; on other models there is no annotator and quality is left out.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
from matplotlib.figure import Figure

from headscope.errors import HeadscopeError
from headscope.studies.plots import OTHER_COLOR, OURS_COLOR, bars, example_figure
from headscope.studies.runner import Sample, Study, mean, overlap

SHAPES_COHYPONYMS = (("circle", "oval"), ("square", "rectangle"))
# The same four words with the other kind's partner: word identity is controlled for.
SHAPES_UNRELATED = (("circle", "square"), ("circle", "rectangle"), ("oval", "square"), ("oval", "rectangle"))
REAL_COHYPONYMS = (("giraffe", "zebra"), ("dog", "cat"), ("horse", "cow"), ("car", "bus"), ("apple", "orange"),
                   ("cup", "bowl"))
KINDS = ("cohyponym", "unrelated")


def crossed(pairs) -> list[tuple[str, str]]:
    """Unrelated pairs from co-hyponym pairs: each pair's first word with the next pair's second."""
    pairs = list(pairs)
    return [(pairs[i][0], pairs[(i + 1) % len(pairs)][1]) for i in range(len(pairs))] if len(pairs) > 1 else []


class CohyponymStudy(Study):
    """Map overlap (and, on the shapes world, both objects drawn) for co-hyponym against unrelated pairs.

    Args:
        cohyponyms: word pairs of one kind.
        unrelated: control pairs; None: with prompts from a file, any other two nouns of a prompt.
    """

    name = "cohyponyms"
    title = "Do co-hyponyms share their maps, and are their images worse?"
    captions = {"cohyponyms.png": "left: IoU of the two nouns' thresholded maps per word pair; right: share of "
                                  "images in which the annotator finds both objects",
                "cohyponyms-examples.png": "example prompts: the two nouns' maps"}

    def __init__(self, cohyponyms=SHAPES_COHYPONYMS, unrelated=SHAPES_UNRELATED):
        self.cohyponyms = [tuple(pair) for pair in cohyponyms]
        self.unrelated = None if unrelated is None else [tuple(pair) for pair in unrelated]
        if not self.cohyponyms:
            raise HeadscopeError("give at least one co-hyponym pair, e.g. circle:oval")

    def settings(self) -> dict:
        return {"cohyponyms": self.cohyponyms, "unrelated": self.unrelated}

    def shapes_scenes(self, sampler, n: int) -> list:
        unrelated = self.unrelated or crossed(self.cohyponyms)
        scenes = []
        for number in range(n):
            pairs = self.cohyponyms if number % 2 == 0 else unrelated
            first, second = pairs[(number // 2) % len(pairs)]
            if sampler.rng.random() < 0.5:
                first, second = second, first
            objects = [sampler.sample_object(shape=shape, color=trained_color(sampler, shape), fill="solid")
                       for shape in (first, second)]
            while objects[1].color == objects[0].color:
                objects[1].color = trained_color(sampler, second)
            scenes.append(sampler.pair(*objects, say_position=False))
        return scenes

    def check_prompts(self, prompts: list[str]) -> None:
        if not any(self._pairs_in(prompt) for prompt in prompts):
            listed = ", ".join(f"{a}:{b}" for a, b in self.cohyponyms)
            raise HeadscopeError(f"no prompt holds a word pair to compare; listed co-hyponyms: {listed} "
                                 "(give --pairs A:B for your words)")

    def _pairs_in(self, prompt: str, nouns=None) -> list[tuple[str, str, str]]:
        """(kind, first, second) for every listed pair whose two words are words of the prompt."""
        from headscope.tokens import WORD_PATTERN

        words = {word.lower() for word in WORD_PATTERN.findall(prompt)}
        found = [("cohyponym", a, b) for a, b in self.cohyponyms if a in words and b in words]
        if self.unrelated is not None:
            found += [("unrelated", a, b) for a, b in self.unrelated if a in words and b in words]
        elif nouns is not None:
            listed = {frozenset(pair) for pair in self.cohyponyms}
            found += [("unrelated", a, b) for i, a in enumerate(nouns) for b in nouns[i + 1:]
                      if frozenset((a, b)) not in listed]
        return found

    def measure(self, sample: Sample) -> tuple[dict, dict]:
        nouns = None
        if self.unrelated is None:
            nouns = list(dict.fromkeys(t.word.lower() for t in sample.parse if t.pos in ("NOUN", "PROPN")))
        pairs, arrays = [], {}
        for kind, first, second in self._pairs_in(sample.job.prompt, nouns):
            map_a, map_b = sample.word_map(first), sample.word_map(second)
            measured = overlap(sample.mask(first), sample.mask(second))
            pairs.append({"kind": kind, "first": first, "second": second, "iou": measured["iou"],
                          "first_in_second": measured["first_in_second"],
                          "second_in_first": measured["second_in_first"]})
            if sample.example and not arrays:
                arrays = {"maps": np.stack([map_a.numpy(), map_b.numpy()]).astype(np.float16)}
        record = {"pairs": pairs, "both_present": None, "both_correct": None}
        if sample.scene is not None and sample.scene.kind == "pair":
            from headscope.shapes.annotate import score_scene

            scored = score_scene(sample.scene, sample.objects)
            record.update(both_present=scored["both_present"], both_correct=scored["both_correct"],
                          detected=[o.shape for o in sample.objects])
        return record, arrays

    def summarize(self, records: list[dict]) -> dict:
        by_kind, by_pair = defaultdict(list), defaultdict(list)
        for record in records:
            for pair in record["pairs"]:
                by_kind[pair["kind"]].append((pair, record))
                by_pair[(pair["kind"], pair["first"], pair["second"])].append((pair, record))
        table = []
        for (kind, first, second), entries in sorted(by_pair.items()):
            table.append(_row(kind, f"{first}:{second}", entries))
        kinds = {kind: _row(kind, "all", by_kind[kind]) for kind in KINDS if by_kind.get(kind)}
        table += list(kinds.values())
        change = None
        if all(kinds.get(kind, {}).get("both_present") is not None for kind in KINDS):
            unrelated = kinds["unrelated"]["both_present"]
            change = (kinds["cohyponym"]["both_present"] - unrelated) / unrelated if unrelated else None
        return {"table": table, "kinds": kinds, "quality_change": change}

    def figures(self, summary: dict, records: list[dict], store) -> dict:
        files = {"cohyponyms.png": cohyponym_figure(summary)}
        rows = []
        for record in records:
            maps = store.arrays(record["key"]).get("maps")
            image = store.image(record["key"])
            if maps is None or image is None or not record["pairs"]:
                continue
            pair = record["pairs"][0]
            iou = "n/a" if pair["iou"] is None else f"{pair['iou']:.2f}"
            rows.append({"image": image, "prompt": record["prompt"], "tau": summary["tau"],
                         "panels": [(f'"{pair["first"]}" ({pair["kind"]})', maps[0]),
                                    (f'"{pair["second"]}"  IoU {iou}', maps[1])]})
        if rows:
            files["cohyponyms-examples.png"] = example_figure(rows, "The two nouns' maps in example prompts",
                                                              "white line: the tau contour")
        return files

    def headline(self, summary: dict) -> list[str]:
        lines = [f"{'kind':<11}{'pairs':>6}{'IoU':>7}{'both drawn':>12}"]
        for kind, row in summary["kinds"].items():
            both = "n/a" if row["both_present"] is None else f"{row['both_present']:.2f}"
            lines.append(f"{kind:<11}{row['n']:>6}{row['iou']:>7.2f}{both:>12}")
        return lines


def trained_color(sampler, shape: str) -> str:
    """A colour the shapes model saw with `shape` in training (no held-out pair, no polysemous word)."""
    from headscope.shapes.world import COLORS, HELD_OUT, POLYSEMOUS

    colors = [color for color in COLORS if color not in POLYSEMOUS and (color, shape) not in HELD_OUT]
    return colors[int(sampler.rng.integers(len(colors)))]


def _row(kind: str, pair: str, entries) -> dict:
    present = [record["both_present"] for _, record in entries]
    return {"kind": kind, "pair": pair, "n": len(entries), "iou": mean(p["iou"] for p, _ in entries),
            "first_in_second": mean(p["first_in_second"] for p, _ in entries),
            "second_in_first": mean(p["second_in_first"] for p, _ in entries),
            "both_present": mean(present), "both_correct": mean(record["both_correct"] for _, record in entries)}


def cohyponym_figure(summary: dict) -> Figure:
    """Two panels: map IoU per pair (grouped by kind) and the share of images with both objects drawn."""
    figure = Figure(figsize=(9.0, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2, width_ratios=[1.6, 1])
    pairs = [row for row in summary["table"] if row["pair"] != "all"]
    colors = [OURS_COLOR if row["kind"] == "cohyponym" else OTHER_COLOR for row in pairs]
    xs = np.arange(len(pairs))
    left.bar(xs, [row["iou"] or 0.0 for row in pairs], color=colors)
    for x, row in zip(xs, pairs):
        left.text(x, (row["iou"] or 0) + 0.01, f"{row['iou']:.2f}\nn={row['n']}" if row["iou"] is not None else "n/a",
                  ha="center", va="bottom", fontsize=6.5)
    left.set_xticks(xs)
    left.set_xticklabels([row["pair"].replace(":", "\n") for row in pairs], fontsize=7)
    left.set_ylim(0, 1)
    left.set_ylabel("IoU of the two words' thresholded maps")
    left.set_title("Map overlap per word pair\n(blue: co-hyponyms, orange: unrelated)", fontsize=9)
    kinds = summary["kinds"]
    labels = list(kinds)
    bars(right, labels, [kinds[kind]["both_present"] for kind in labels], counts=[kinds[kind]["n"] for kind in labels],
         color=[OURS_COLOR if kind == "cohyponym" else OTHER_COLOR for kind in labels], width=0.6)
    right.set_ylim(0, 1.15)
    right.set_ylabel("share of images with both objects drawn")
    note = ("no annotator for this model: n/a" if all(kinds[k]["both_present"] is None for k in labels)
            else "the shapes annotator's verdict")
    right.set_title(f"Generation quality\n({note})", fontsize=9)
    figure.suptitle("Co-hyponyms against unrelated pairs (DAAM paper: co-hyponyms overlap more and are drawn "
                    "9 % worse)", fontsize=10)
    return figure
