"""Numeracy (DAAM, sec. 5): does a numeral's map cover anything, and does the count come out right?

The paper finds numerals among the least covering words (16-19 % with determiners) and poor counting:
the map of "two" in "two laptops" is empty and four laptops are drawn. Here every numeral (spaCy NUM)
gets the coverage of its thresholded map, beside the coverage of the noun it counts; on the shapes
world the annotator says whether the count came out right (objects of the asked shape == the number).
The student report's counting prompts ("two dogs playing in the park", ...) are the default prompts
on models other than the shapes model.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
from matplotlib.figure import Figure

from headscope.studies.plots import OTHER_COLOR, OURS_COLOR, bars, example_figure, standard_error
from headscope.studies.runner import Sample, Study, described_single, mean

COUNTING_PROMPTS = ("two dogs playing in the park", "three horses running in water",
                    "four red elephants flying in the sky", "two laptops on a desk", "three apples on a table",
                    "two cats sleeping on a sofa", "four birds sitting on a wire", "one red car on a street")
NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
           "ten": 10}


class NumeracyStudy(Study):
    """Numerals' map coverage against whether the count came out right."""

    name = "numeracy"
    title = "Do numerals get a map, and does the count come out right?"
    captions = {"numeracy.png": "left: coverage of each numeral's map and of its noun's; right: share of images "
                                "with the asked number of objects (annotator)",
                "numeracy-examples.png": "example prompts: a numeral's map beside its noun's, and the count drawn"}

    def shapes_scenes(self, sampler, n: int) -> list:
        scenes = []
        for number in range(n):
            if number % 3 == 0:  # "one red circle on the left": the numeral one, a single object
                scenes.append(described_single(sampler.single(allow_glyphs=False).objects[0], say_size=False,
                                               use_one=True))
            else:
                scenes.append(sampler.count(n=1 + number % 3, fill="solid", allow_glyphs=False))
        return scenes

    def check_prompts(self, prompts: list[str]) -> None:
        from headscope.errors import HeadscopeError
        from headscope.tokens import WORD_PATTERN

        if not any(word.lower() in NUMBERS or word.isdigit() for prompt in prompts
                   for word in WORD_PATTERN.findall(prompt)):
            raise HeadscopeError("no prompt holds a numeral (one, two, ... or digits); numeracy needs counting "
                                 "prompts such as 'two dogs playing in the park'")

    def measure(self, sample: Sample) -> tuple[dict, dict]:
        numerals, arrays = [], {}
        scored = None
        if sample.scene is not None:
            from headscope.shapes.annotate import score_scene

            scored = score_scene(sample.scene, sample.objects)
        for token in sample.parse:
            if token.pos != "NUM":
                continue
            head = sample.parse[token.head]
            numeral_map = sample.word_map(token.word, token.occurrence)
            noun_map = sample.word_map(head.word, head.occurrence) if head.word_index != token.word_index else None
            entry = {"numeral": token.text.lower(), "value": NUMBERS.get(token.text.lower()), "noun": head.text.lower(),
                     "coverage": float(sample.mask(token.word, token.occurrence).float().mean()),
                     "noun_coverage": None if noun_map is None else
                     float(sample.mask(head.word, head.occurrence).float().mean()),
                     "count_ok": None, "drawn": None}
            if scored is not None:
                want = sample.scene.objects[0].shape
                entry["count_ok"] = bool(scored.get("count_ok"))
                entry["drawn"] = sum(1 for o in sample.objects if o.shape == want)
            numerals.append(entry)
            if sample.example and not arrays and noun_map is not None:
                arrays = {"maps": np.stack([numeral_map.numpy(), noun_map.numpy()]).astype(np.float16)}
        return {"numerals": numerals}, arrays

    def summarize(self, records: list[dict]) -> dict:
        by_numeral = defaultdict(list)
        for record in records:
            for entry in record["numerals"]:
                by_numeral[entry["numeral"]].append(entry)
        order = sorted(by_numeral, key=lambda word: (NUMBERS.get(word, 99), word))
        table = [_row(word, by_numeral[word]) for word in order]
        every = [entry for entries in by_numeral.values() for entry in entries]
        return {"table": table + ([_row("all", every)] if every else [])}

    def figures(self, summary: dict, records: list[dict], store) -> dict:
        files = {"numeracy.png": numeracy_figure(summary)}
        rows = []
        for record in records:
            maps = store.arrays(record["key"]).get("maps")
            image = store.image(record["key"])
            if maps is None or image is None:
                continue
            entry = record["numerals"][0]
            verdict = "" if entry["count_ok"] is None else \
                f"\n{entry['drawn']} drawn: {'right' if entry['count_ok'] else 'wrong'}"
            rows.append({"image": image, "prompt": record["prompt"], "tau": summary["tau"],
                         "panels": [(f'"{entry["numeral"]}" covers {entry["coverage"]:.0%}{verdict}', maps[0]),
                                    (f'"{entry["noun"]}" covers {entry["noun_coverage"]:.0%}', maps[1])]})
        if rows:
            files["numeracy-examples.png"] = example_figure(rows, "A numeral's map beside its noun's",
                                                            "white line: the tau contour")
        return files

    def headline(self, summary: dict) -> list[str]:
        lines = [f"{'numeral':<9}{'n':>5}{'coverage':>10}{'noun':>7}{'count right':>13}"]
        for row in summary["table"]:
            right = "n/a" if row["count_accuracy"] is None else f"{row['count_accuracy']:.2f}"
            lines.append(f"{row['numeral']:<9}{row['n']:>5}{row['coverage']:>10.3f}"
                         f"{_fmt(row['noun_coverage']):>7}{right:>13}")
        return lines


def _row(word: str, entries: list[dict]) -> dict:
    right = [e["coverage"] for e in entries if e["count_ok"] is True]
    wrong = [e["coverage"] for e in entries if e["count_ok"] is False]
    return {"numeral": word, "n": len(entries), "coverage": mean(e["coverage"] for e in entries),
            "coverage_stderr": standard_error([e["coverage"] for e in entries]),
            "noun_coverage": mean(e["noun_coverage"] for e in entries),
            "count_accuracy": mean(e["count_ok"] for e in entries),
            "coverage_when_right": mean(right), "coverage_when_wrong": mean(wrong),
            "n_right": len(right), "n_wrong": len(wrong)}


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def numeracy_figure(summary: dict) -> Figure:
    """Left: coverage of each numeral's map and of its noun's. Right: how often the count was right."""
    rows = [row for row in summary["table"] if row["numeral"] != "all"]
    labels = [row["numeral"] for row in rows]
    figure = Figure(figsize=(9.0, 4.2), layout="constrained")
    left, right = figure.subplots(1, 2)
    bars(left, labels, [row["coverage"] for row in rows], errors=[row["coverage_stderr"] for row in rows],
         color=OURS_COLOR, width=0.38, offset=-0.2, label="the numeral's map")
    bars(left, labels, [row["noun_coverage"] for row in rows], color=OTHER_COLOR, width=0.38, offset=0.2,
         label="its noun's map")
    left.axhspan(0.16, 0.19, color="#dddddd", zorder=0, label="DAAM paper: numerals and determiners")
    tallest = max([0.4] + [(row["coverage"] or 0) + (row["coverage_stderr"] or 0) for row in rows]
                  + [row["noun_coverage"] or 0 for row in rows])
    left.set_ylim(0, min(1.3, tallest * 1.35))
    left.set_ylabel("share of the image covered (map >= tau)")
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    left.set_title("Map coverage of numerals", fontsize=9)
    bars(right, labels, [row["count_accuracy"] for row in rows], counts=[row["n"] for row in rows], width=0.5)
    right.set_ylim(0, 1.15)
    right.set_ylabel("share of images with the right count")
    known = any(row["count_accuracy"] is not None for row in rows)
    right.set_title("Count right? (annotator, shapes world)" if known else
                    "Count right?\n(needs the shapes annotator: n/a)", fontsize=9)
    figure.suptitle("Numeracy (DAAM paper: numerals get little map, and counts are often wrong)", fontsize=10)
    return figure
