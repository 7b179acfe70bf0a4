"""Syntax in pixel space (DAAM, sec. 5.2): do a word's map and its syntactic head's map overlap?

For every spaCy dependency (head, dependent) of a prompt whose two words are different prompt words,
both DAAM maps are thresholded at tau and compared: IoU, the share of the dependent's map inside the
head's, and the share of the head's inside the dependent's. The summary is their mean per relation.
The paper finds that for some relations the head's map consistently encloses the dependent's (a verb
encloses its subject, nsubj), and for others the opposite.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
from matplotlib.figure import Figure

from headscope.maps.daam import threshold
from headscope.studies.plots import OTHER_COLOR, OURS_COLOR, PAPER_COLOR, example_figure
from headscope.studies.runner import Sample, Study, mean, overlap

MAX_RELATIONS = 12  # the most frequent relations drawn; the CSV has all


class SyntaxStudy(Study):
    """Map overlap of dependency pairs, per relation type."""

    name = "syntax"
    title = "Do a word's map and its syntactic head's map overlap?"
    captions = {"syntax.png": "per dependency relation: how much of the dependent's thresholded map lies inside "
                              "its head's, the reverse, and their IoU",
                "syntax-examples.png": "example prompts: every word's map with its relation and head"}

    def measure(self, sample: Sample) -> tuple[dict, dict]:
        masks, maps = {}, {}
        for token in sample.parse:
            key = (token.word.lower(), token.occurrence)
            if key not in maps:
                maps[key] = sample.word_map(token.word, token.occurrence)
                masks[key] = threshold(maps[key], sample.tau)
        pairs = []
        for token in sample.parse:
            head = sample.parse[token.head]
            if token.dep == "ROOT" or token.word_index == head.word_index:
                continue
            measured = overlap(masks[(token.word.lower(), token.occurrence)], masks[(head.word.lower(), head.occurrence)])
            pairs.append({"relation": token.dep, "dependent": token.text, "head": head.text,
                          "dependent_pos": token.pos, "head_pos": head.pos, "iou": measured["iou"],
                          "dependent_in_head": measured["first_in_second"],
                          "head_in_dependent": measured["second_in_first"]})
        arrays = {}
        if sample.example and sample.parse:
            arrays = {"maps": np.stack([maps[(t.word.lower(), t.occurrence)].numpy() for t in sample.parse])
                      .astype(np.float16)}
        words = [{"text": t.text, "dep": t.dep, "head": sample.parse[t.head].text} for t in sample.parse]
        return {"pairs": pairs, "words": words}, arrays

    def summarize(self, records: list[dict]) -> dict:
        by_relation = defaultdict(list)
        for record in records:
            for pair in record["pairs"]:
                by_relation[pair["relation"]].append(pair)
        table = []
        for relation, pairs in sorted(by_relation.items(), key=lambda item: (-len(item[1]), item[0])):
            dependent_in_head = mean(p["dependent_in_head"] for p in pairs)
            head_in_dependent = mean(p["head_in_dependent"] for p in pairs)
            table.append({"relation": relation, "n": len(pairs), "iou": mean(p["iou"] for p in pairs),
                          "dependent_in_head": dependent_in_head, "head_in_dependent": head_in_dependent,
                          "encloses": _encloser(dependent_in_head, head_in_dependent),
                          "example": f'{pairs[0]["dependent"]} -> {pairs[0]["head"]}'})
        return {"table": table}

    def figures(self, summary: dict, records: list[dict], store) -> dict:
        files = {"syntax.png": syntax_figure(summary)}
        rows = []
        for record in records:
            maps = store.arrays(record["key"]).get("maps")
            image = store.image(record["key"])
            if maps is None or image is None:
                continue
            panels = [(f'"{w["text"]}"\n' + ("root" if w["dep"] == "ROOT" else f'{w["dep"]} -> {w["head"]}'), heat)
                      for w, heat in zip(record["words"], maps)]
            rows.append({"image": image, "prompt": record["prompt"], "panels": panels, "tau": summary["tau"]})
        if rows:
            files["syntax-examples.png"] = example_figure(
                rows, "Word maps with each word's dependency (relation -> head)", "white line: the tau contour")
        return files

    def headline(self, summary: dict) -> list[str]:
        lines = [f"{'relation':<10}{'n':>5}{'IoU':>7}{'dep in head':>13}{'head in dep':>13}  encloses"]
        for row in summary["table"][:MAX_RELATIONS]:
            lines.append(f"{row['relation']:<10}{row['n']:>5}{_fmt(row['iou']):>7}{_fmt(row['dependent_in_head']):>13}"
                         f"{_fmt(row['head_in_dependent']):>13}  {row['encloses']}")
        return lines


def _encloser(dependent_in_head, head_in_dependent) -> str:
    """Which map encloses the other, by a margin of 0.1 in shares."""
    if dependent_in_head is None or head_in_dependent is None:
        return "n/a"
    if dependent_in_head - head_in_dependent > 0.1:
        return "head"
    if head_in_dependent - dependent_in_head > 0.1:
        return "dependent"
    return "neither"


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def syntax_figure(summary: dict) -> Figure:
    """Per relation: IoU and the share of each map inside the other (grouped horizontal bars)."""
    table = summary["table"][:MAX_RELATIONS]
    figure = Figure(figsize=(7.2, 0.55 * max(len(table), 1) + 1.8), layout="constrained")
    axes = figure.add_subplot()
    ys = np.arange(len(table))
    series = (("dependent_in_head", "share of the dependent's map inside the head's", OURS_COLOR),
              ("head_in_dependent", "share of the head's map inside the dependent's", OTHER_COLOR),
              ("iou", "IoU of the two maps", PAPER_COLOR))
    for number, (key, label, color) in enumerate(series):
        values = [row[key] if row[key] is not None else 0.0 for row in table]
        axes.barh(ys + (number - 1) * 0.27, values, height=0.26, color=color, label=label)
    axes.set_yticks(ys)
    axes.set_yticklabels([f'{row["relation"]} (n={row["n"]})\ne.g. {row["example"]}' for row in table], fontsize=7)
    axes.invert_yaxis()
    axes.set_xlim(0, 1.0)
    axes.set_xlabel("share (maps thresholded at tau)")
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    axes.set_title("Dependency pairs: does the head's map enclose the dependent's?\n"
                   "(DAAM paper: for some relations the head encloses the dependent, e.g. a verb its subject)",
                   fontsize=9)
    return figure
