"""Parts of speech (DAAM, sec. 5): how much of the image each POS tag's thresholded word map covers.

For every spaCy token of a prompt, the DAAM map of the prompt word it lies in is min-max normalised
and thresholded at tau (0.4); its coverage is the share of image pixels at or above tau. The summary
is the mean coverage per coarse tag (Universal POS), drawn in the paper's order beside the paper's
figures for Stable Diffusion on 500 COCO captions: numerals and determiners 16-19 %, coordinating
conjunctions and punctuation 37-44 %, every other tag 28-32 %.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
from matplotlib.figure import Figure

from headscope.studies.plots import OURS_COLOR, PAPER_COLOR, bars, example_figure, standard_error
from headscope.studies.runner import Sample, Study, coverage, mean

# The paper's order: least covering first (numerals, determiners), then the content tags, then the most
# covering (conjunctions, punctuation). Tags seen in a run but not listed here go before CCONJ.
PAPER_ORDER = ("NUM", "DET", "ADJ", "NOUN", "PROPN", "VERB", "AUX", "ADP", "ADV", "PRON", "PART", "SCONJ",
               "CCONJ", "PUNCT")
PAPER_RANGES = {"NUM": (0.16, 0.19), "DET": (0.16, 0.19), "CCONJ": (0.37, 0.44), "PUNCT": (0.37, 0.44)}
OTHER_RANGE = (0.28, 0.32)
PAPER_SOURCE = "DAAM paper: Stable Diffusion, 500 COCO captions, spaCy tags, tau = 0.4"


def paper_range(pos: str) -> tuple[float, float]:
    """The paper's coverage range (low, high) for a coarse POS tag."""
    return PAPER_RANGES.get(pos, OTHER_RANGE)


class PosStudy(Study):
    """Mean coverage of thresholded word maps per part of speech."""

    name = "pos"
    title = "How much of the image does each part of speech cover?"
    captions = {"pos.png": "mean share of the image that each part of speech's word map covers (map min-max "
                           "normalised, >= tau), with the DAAM paper's range for Stable Diffusion beside it",
                "pos-examples.png": "example prompts: the image, then every word's map with its tag and coverage"}

    def measure(self, sample: Sample) -> tuple[dict, dict]:
        maps = {}
        words = []
        for token in sample.parse:
            key = (token.word.lower(), token.occurrence)
            if key not in maps:
                maps[key] = sample.word_map(token.word, token.occurrence)
            words.append({"text": token.text, "word": token.word, "pos": token.pos, "tag": token.tag,
                          "coverage": coverage(maps[key], sample.tau)})
        arrays = {}
        if sample.example:
            arrays = {"maps": np.stack([maps[(t.word.lower(), t.occurrence)].numpy() for t in sample.parse])
                      .astype(np.float16)} if sample.parse else {}
        return {"words": words}, arrays

    def summarize(self, records: list[dict]) -> dict:
        by_pos, by_tag = defaultdict(list), defaultdict(list)
        for record in records:
            for word in record["words"]:
                by_pos[word["pos"]].append(word["coverage"])
                by_tag[word["tag"]].append(word["coverage"])
        table = []
        for pos in ordered_tags(by_pos):
            low, high = paper_range(pos)
            value = mean(by_pos[pos])
            table.append({"pos": pos, "mean_coverage": value, "stderr": standard_error(by_pos[pos]),
                          "n": len(by_pos[pos]), "paper_low": low, "paper_high": high,
                          "within_paper_range": low <= value <= high})
        groups = {"numerals and determiners (NUM, DET)": ("NUM", "DET"),
                  "conjunctions and punctuation (CCONJ, PUNCT)": ("CCONJ", "PUNCT")}
        grouped = {label: mean(value for pos in tags for value in by_pos.get(pos, [])) for label, tags in groups.items()}
        grouped["other parts of speech"] = mean(value for pos, values in by_pos.items()
                                                if pos not in ("NUM", "DET", "CCONJ", "PUNCT") for value in values)
        return {"table": table, "groups": grouped, "paper_groups": {label: list(r) for label, r in zip(
                    grouped, ((0.16, 0.19), (0.37, 0.44), OTHER_RANGE))},
                "by_fine_tag": {tag: {"mean_coverage": mean(values), "n": len(values)}
                                for tag, values in sorted(by_tag.items())}}

    def figures(self, summary: dict, records: list[dict], store) -> dict:
        files = {"pos.png": pos_figure(summary)}
        rows = []
        for record in records:
            maps = store.arrays(record["key"]).get("maps")
            image = store.image(record["key"])
            if maps is None or image is None:
                continue
            panels = [(f'"{word["text"]}" {word["pos"]}\n{word["coverage"]:.0%}', heat)
                      for word, heat in zip(record["words"], maps)]
            rows.append({"image": image, "prompt": record["prompt"], "panels": panels, "tau": summary["tau"]})
        if rows:
            files["pos-examples.png"] = example_figure(
                rows, "Word maps of example prompts: part of speech and coverage (share of pixels >= tau)",
                "white line: the tau contour; colour: map normalised to [0, 1]")
        return files

    def headline(self, summary: dict) -> list[str]:
        lines = [f"{'POS':<7}{'coverage':>9}{'n':>6}   paper"]
        for row in summary["table"]:
            lines.append(f"{row['pos']:<7}{row['mean_coverage']:>9.3f}{row['n']:>6}   "
                         f"{row['paper_low']:.2f}-{row['paper_high']:.2f}")
        return lines


def ordered_tags(tags) -> list[str]:
    """Tags in the paper's order; unknown tags before CCONJ, alphabetically."""
    tags = set(tags)
    known = [tag for tag in PAPER_ORDER if tag in tags]
    extra = sorted(tags - set(PAPER_ORDER))
    cut = next((i for i, tag in enumerate(known) if tag in ("CCONJ", "PUNCT")), len(known))
    return known[:cut] + extra + known[cut:]


def pos_figure(summary: dict) -> Figure:
    """Mean coverage per POS tag (bars, with standard errors) over the paper's range (grey bands)."""
    table = summary["table"]
    labels = [row["pos"] for row in table]
    figure = Figure(figsize=(max(5.5, 0.9 * len(labels) + 2.5), 4.4), layout="constrained")
    axes = figure.add_subplot()
    bars(axes, labels, [row["mean_coverage"] for row in table], errors=[row["stderr"] for row in table],
         counts=[row["n"] for row in table], color=OURS_COLOR, width=0.38, offset=-0.2,
         label="this model (mean ± standard error)")
    for x, row in enumerate(table):
        axes.bar(x + 0.2, row["paper_high"] - row["paper_low"], bottom=row["paper_low"], width=0.38,
                 color=PAPER_COLOR, label=PAPER_SOURCE if x == 0 else None)
        axes.text(x + 0.2, row["paper_high"] + 0.01, f'{row["paper_low"]:.2f}-\n{row["paper_high"]:.2f}',
                  ha="center", va="bottom", fontsize=6.5, color="#666666")
    top = max([row["mean_coverage"] or 0 for row in table] + [0.45])
    axes.set_ylim(0, min(1.0, top * 1.25 + 0.05))
    axes.set_ylabel("share of the image covered\n(map normalised, >= tau)")
    axes.set_xlabel("part of speech (spaCy, Universal tags), in the paper's order")
    axes.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    axes.set_title("How much of the image does each part of speech's word map cover?\n"
                   "(grey: the range the DAAM paper reports for the tag)", fontsize=10)
    return figure
