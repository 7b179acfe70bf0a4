"""The joint-attention side of daam_segmentation.py: the SD3-style model, its concept maps, the side-by-side table.

On a joint model every image is generated in its own trace, which also carries the caption's content
words and BACKGROUND through the text stream (`headscope.trace(pipe, concepts=...)`): its word maps
and its output-space concept maps (ConceptAttention, `tc.concept_maps`) come from one generation.

The concept map of a word of role r follows ConceptAttention's segmentation protocol, a class against
background: per block and step a softmax over the caption's words of role r and BACKGROUND only, of
the same block outputs (one `ConceptMapReducer` per role in the trace's stream), averaged over the
library's default blocks (the later half of the joint blocks) and the view's steps, as
`tc.concept_maps` averages. One trace carries one concept list, so every role's words ride the stream
together, and a concept token attends to every carried concept's key. That is not the same as carrying
the role's concepts alone: "circle" against BACKGROUND in "a small red circle on the left" (provisional
model, seed 0) moved by 0.055 on average over its 16x16 tokens with the caption's 5 words carried, and
by 0.24 with 15 words, which is why a joint model gets one image per trace (a trace's concepts are
shared by its images, so a batch would carry their union).

BACKGROUND is no shapes-world word: the shapes tokenizer gives it its unknown token, so the stream is
built with allow_unknown, a competitor that names nothing this world's models learnt.
"""
from __future__ import annotations

import torch

import harness
import map_fit
from headscope.maps.concepts import ConceptMapReducer, _chosen_steps, default_layers

BACKGROUND = "background"
TINY_JOINT = "tiny random pipeline of the shapes-mmdit architecture (headscope.shapes.mmdit.random_mmdit_pipeline)"
COLUMNS = (("ptg", "pointing"), ("mIoU*", "miou@fit"), ("CA", "mean_threshold_miou"))  # (header, held-out key)


def is_joint(pipe) -> bool:
    """Whether `pipe`'s denoiser is a joint-attention transformer (SD3 / Flux), which has a text stream."""
    from headscope.backbones import backbone_for

    return backbone_for(pipe).family != "unet"


def load(args, name: str):
    """(pipeline, what it is) of the embedded model `name`; with --tiny the tiny random shapes-mmdit pipeline."""
    if args.tiny:
        from headscope.shapes.mmdit import random_mmdit_pipeline

        return random_mmdit_pipeline(), TINY_JOINT
    from headscope import load_pipeline

    return load_pipeline(name, args.device), f"embedded {name} model"


def call_options(pipe, tiny: bool) -> dict:
    """Pipeline-call arguments a model needs besides steps and guidance: its shipped call defaults (the
    SD3-style model's max_sequence_length); the untrained tiny one is built for the same length."""
    from headscope.models import call_defaults

    options = call_defaults(pipe)
    if tiny and is_joint(pipe):
        from headscope.shapes.mmdit import TINY_MMDIT

        options.setdefault("max_sequence_length", TINY_MMDIT.max_sequence_length)
    return options


def concept_stream(pipe, targets):
    """(the stream a trace carries for one caption, role -> (that role's concepts, the reader of their maps))
    for the caption's word targets (`daam_segmentation.word_targets`). The stream carries the caption's
    distinct content words, then BACKGROUND; its first reader is the library's, over every carried word
    (`tc.concept_maps`), then one `ConceptMapReducer` per role over the role's words and BACKGROUND: the
    softmax over those concepts of the same block outputs."""
    from headscope.stream import ConceptStream

    by_role: dict[str, list[str]] = {}
    for word, role, _, _ in targets:
        if word not in by_role.setdefault(role, []):
            by_role[role].append(word)
    carried = list(dict.fromkeys(word for words in by_role.values() for word in words)) + [BACKGROUND]
    stream = ConceptStream(pipe, carried, allow_unknown=True, feature="concept maps")
    stream.readers.append(ConceptMapReducer(stream.spans, keep_steps=True))
    roles = {}
    for role, words in by_role.items():
        concepts = words + [BACKGROUND]  # last, as a reducer's spans must end at the stream's last token
        reducer = ConceptMapReducer([stream.spans[carried.index(concept)] for concept in concepts], keep_steps=True)
        stream.readers.append(reducer)
        roles[role] = (concepts, reducer)
    return stream, roles


def concept_native(tc, reducer: ConceptMapReducer, concepts: list[str], word: str, image: int, steps) -> torch.Tensor:
    """[h, w] at the token grid: `word`'s saliency from `reducer` (a reader of `tc`'s concept stream over
    `concepts`), averaged over the default blocks and `steps` (None: every recorded step), as
    `tc.concept_maps` averages before upsampling."""
    chosen, row = _chosen_steps(tc, reducer, steps), concepts.index(word)
    per_layer = []
    for layer in default_layers(tc.index):
        if chosen is None:
            per_layer.append(reducer.sums[layer][image, row] / len(reducer.steps))
        else:
            per_layer.append(torch.stack([reducer.per_step[layer][step][image, row] for step in chosen]).mean(dim=0))
    return torch.stack(per_layer).mean(dim=0)


def add_concept_maps(record: dict, tc, image: int, windows: dict, roles: dict) -> None:
    """The record's concept map per step window, as a stack of one map (`concept_maps`: {view: [[1, h, w]]})."""
    concepts, reducer = roles[record["role"]]
    record["concept_maps"] = {name: [concept_native(tc, reducer, concepts, record["word"], image, spec)[None]]
                              for name, spec in windows.items()}


def concept_fit(views: list[str], size, upsample: str) -> map_fit.Fit:
    """The fit a concept map is scored with: a stack of one map, no HRV."""
    return map_fit.Fit(None, 1, views, size, upsample)


def score_concepts(calibration, heldout, views: list[str], size, upsample: str) -> dict:
    """{role: {"concept": entry}}, entries as `map_fit.fit_and_score` gives them: the step window and tau*
    fit on the calibration records, scored on the held-out ones. A concept map is scored as a stack of one
    map, whose plain sum ("daam" in `map_fit`) is the map itself."""
    def as_maps(record: dict) -> dict:  # the word maps' per-head IoU cache stays behind
        return {**{key: value for key, value in record.items() if key != "_head_iou"}, "maps": record["concept_maps"]}

    fit = concept_fit(views, size, upsample)
    table = map_fit.fit_and_score(fit, [as_maps(r) for r in calibration], [as_maps(r) for r in heldout],
                                  methods=("daam",))
    return {role: {"concept": methods["daam"]} for role, methods in table.items()}


def protocol(index, windows: dict) -> dict:
    """How the concept maps were made, for the JSON; index: the joint model's head index."""
    return {"concepts": f"per role: the caption's words of that role and {BACKGROUND!r}, a softmax over them per "
                        "block and step",
            "carried": f"every content word of the caption and {BACKGROUND!r}, one image per trace",
            "background": f"{BACKGROUND!r}: the shapes tokenizer's unknown token (allow_unknown)",
            "layers": [index.layers[layer].name for layer in default_layers(index)],
            "views": list(windows), "fit": "view with the best calibration mIoU@0.4, then tau*, as map_fit fits"}


def side_by_side(results: dict) -> str:
    """One row per model and method: per role, its held-out pointing, DAAM mIoU at the calibrated tau* and
    ConceptAttention's mean-threshold mIoU. results: {model name: the model's result dict}."""
    roles = [role for role in map_fit.ROLES if any(role in result["methods"] for result in results.values())]
    rows = []
    for name, result in results.items():
        methods = list(dict.fromkeys(m for role in roles for m in result["methods"].get(role, {})))
        for method in methods:
            cells = []
            for role in roles:
                held = result["methods"].get(role, {}).get(method, {}).get("heldout", {})
                cells += [held.get(key) if held.get("n") else None for _, key in COLUMNS]
            rows.append([name, method, *cells])
    columns = ["model", "method", *(f"{role} {label}" for role in roles for label, _ in COLUMNS)]
    return ("side by side on held-out prompts and seeds (choices fit on calibration; oracle: on held-out). ptg: "
            "pointing game; mIoU*: DAAM's mIoU at the calibrated tau*; CA: ConceptAttention's mIoU, mask = map > "
            "its mean\n" + harness.table(rows, columns, digits=2, left=2))
