"""Ordered weakening (HRV paper, sec. 4): weaken heads in order of relevance and watch a concept fade.

For one concept, heads are ranked by its HRV: MoRHF (most relevant first), LeRHF (least relevant
first) and a seeded random order as control. For every k of a grid, the first k heads of each order
have their post-softmax maps multiplied by `factor` (the paper's -2; 0 ablates) at every word token of
the prompt (not start/end/padding), on the conditional rows, at every step. This is a writer hook that
returns value factors, so it runs inside fused attention. On SD3 and Flux the word tokens are those of
every text encoder whose tokens are keys (SD3: CLIP and T5), and only the image queries' maps are
weakened (`headscope.joint`).

If the HRV is right, MoRHF destroys the concept after few heads while LeRHF barely touches it, and
other concepts (the controls) suffer less under MoRHF than the weakened one.

Metrics: on the shapes world, the annotator's accuracy per attribute on one-object scenes with known
ground truth (`ShapesScorer`); on real models, CLIP similarity between the image and the concept word
the prompt contains (`ClipScorer`, a local CLIP folder).
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch

from headscope.errors import HeadscopeError
from headscope.heads import HeadIndex
from headscope.hrv import HRV, generation_defaults
from headscope.processor import Hook, HookContext

ORDERS = ("morhf", "lerhf", "random")
ORDER_LABELS = {"morhf": "MoRHF (most relevant first)", "lerhf": "LeRHF (least relevant first)",
                "random": "random order (control)"}
# shapes concept -> the key of headscope.shapes.annotate.score_scene that measures it
SHAPES_METRICS = {"color": "color", "shape": "shape", "size": "size", "position": "position", "fill": "fill",
                  "count": "count_ok"}


def default_ks(n_heads: int) -> list[int]:
    """0, n/8, n/4, n/2 and n heads (rounded down, duplicates dropped)."""
    return sorted({0, n_heads // 8, n_heads // 4, n_heads // 2, n_heads})


def head_order(hrv: HRV, concept: str, order: str, seed: int = 0) -> torch.Tensor:
    """All flat head ids in weakening order: [n_heads] long.

    "morhf": decreasing relevance to `concept`; "lerhf": increasing; "random": a permutation drawn
    from `seed` alone (the same for every concept). Ties keep id order.
    """
    if order == "morhf":
        return hrv.ranking(concept, most_relevant_first=True)
    if order == "lerhf":
        return hrv.ranking(concept, most_relevant_first=False)
    if order == "random":
        return torch.randperm(hrv.n_heads, generator=torch.Generator().manual_seed(seed))
    raise HeadscopeError(f"unknown order {order!r}; use {', '.join(ORDERS)}")


def word_positions(tokenizer, prompt: str) -> list[int]:
    """Key positions of the prompt's own tokens: everything but start, end and padding tokens."""
    from headscope.tokens import tokenize

    return _own_tokens(tokenizer, tokenize(tokenizer, prompt).input_ids)


def word_key_positions(pipe, prompt: str, **call_options) -> list[int]:
    """Key positions of the prompt's own tokens through every text encoder whose tokens are keys of `pipe`
    (UNet: `word_positions` of its tokenizer; SD3: the CLIP ones, then the T5 ones after the CLIP positions;
    Flux: T5's), tokenized as a call with `call_options` would (its `max_sequence_length`)."""
    from headscope.backbones import backbone_for
    from headscope.prompts import prompt_tokens
    from headscope.steer.scale import key_encoders

    tokenizers = {slot.encoder: slot.tokenizer for slot in backbone_for(pipe).text_slots(pipe, {}) if slot.keys}
    lengths = {key: value for key, value in call_options.items() if key == "max_sequence_length"}
    positions = []
    for encoder in key_encoders(pipe):
        tokens = prompt_tokens(pipe, prompt, encoder, **lengths)
        own = _own_tokens(getattr(pipe, tokenizers[encoder]), tokens.input_ids)
        positions += [tokens.offset + position for position in own]
    return positions


def _own_tokens(tokenizer, input_ids) -> list[int]:
    """Positions of `input_ids` that are neither start, end nor padding tokens."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id} - {None}
    return [position for position, token in enumerate(input_ids) if token not in special]


class HeadWeakening(Hook):
    """Writer: the chosen heads' post-softmax maps times `factor` at each prompt's word tokens, conditional rows.

    Args:
        heads: flat head ids to weaken.
        factor: multiplier of their maps (-2 in the paper; 0 ablates).
        positions: per prompt of the pipeline call, the key positions of its word tokens.
        n_keys: key count of the text conditioning, used when the layer call does not tell
            (`ctx.n_keys`); the pipelines pad prompts to the tokenizer's `model_max_length`.
    """

    def __init__(self, heads, factor: float, positions: list[list[int]], n_keys: int | None = None):
        self.heads = {int(head) for head in heads}
        self.factor = float(factor)
        self.positions = positions
        self.n_keys = n_keys

    def value_factors(self, ctx: HookContext) -> torch.Tensor | None:
        """[rows, heads, keys]: `factor` at (cond row, chosen head, word token), 1 elsewhere; None if no head here."""
        layer = ctx.layer
        chosen = [head for head in range(layer.heads) if layer.offset + head in self.heads]
        if not chosen:
            return None
        factors = torch.ones(ctx.layout.n_rows, layer.heads, ctx.n_keys or self.n_keys)
        chosen_heads = torch.tensor(chosen)[:, None]
        for row in ctx.layout.rows("cond"):
            positions = self.positions[ctx.layout.prompt_index(ctx.layout.image(row))]
            if positions:
                factors[row, chosen_heads, torch.tensor(positions)[None, :]] = self.factor
        return factors


# -- scorers -----------------------------------------------------------------------------------------

class ShapesScorer:
    """Annotator accuracy per concept on shapes-world scenes: 1.0 when the attribute was read back right."""

    def __init__(self, scenes, concepts: list[str]):
        self.scenes = list(scenes)
        self.metrics = {concept: SHAPES_METRICS[concept.lower()] for concept in concepts
                        if concept.lower() in SHAPES_METRICS}
        if not self.metrics:
            raise HeadscopeError(f"none of the concepts {', '.join(concepts)} can be scored on the shapes world "
                                 f"(scorable: {', '.join(SHAPES_METRICS)})")

    def score(self, images, prompt_indices) -> list[dict[str, float]]:
        from headscope.shapes.annotate import annotate, score_scene

        results = []
        for image, index in zip(images, prompt_indices):
            scored = score_scene(self.scenes[index], annotate(image))
            results.append({concept: float(scored[key]) for concept, key in self.metrics.items()
                            if scored.get(key) is not None})
        return results


class ClipScorer:
    """CLIP cosine similarity between an image and each concept word its prompt contains.

    Args:
        path: a local folder with a transformers CLIPModel, its tokenizer and image processor.
        prompts: the prompts that will be scored.
        concept_words: concept -> words (the HRV's concept set).
    """

    def __init__(self, path, prompts: list[str], concept_words: dict[str, list[str]]):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        try:
            self.model = CLIPModel.from_pretrained(str(path)).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.image_processor = AutoImageProcessor.from_pretrained(str(path))
        except (OSError, ValueError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise HeadscopeError(f"cannot load a CLIP model from {path}: {first}") from None
        self.items = [self._items(prompt, concept_words) for prompt in prompts]
        self._text_cache: dict[str, torch.Tensor] = {}

    @staticmethod
    def _items(prompt: str, concept_words: dict[str, list[str]]) -> dict[str, str]:
        """concept -> the first of its words found in the prompt (whole words, case-insensitive)."""
        found = {}
        for concept, words in concept_words.items():
            for word in words:
                if re.search(rf"(?<!\w){re.escape(word)}(?!\w)", prompt, flags=re.IGNORECASE):
                    found[concept] = word
                    break
        return found

    @torch.no_grad()
    def _text(self, word: str) -> torch.Tensor:
        if word not in self._text_cache:
            tokens = self.tokenizer([word], padding=True, return_tensors="pt")
            features = _features(self.model.get_text_features(**tokens))
            self._text_cache[word] = torch.nn.functional.normalize(features, dim=-1)[0]
        return self._text_cache[word]

    @torch.no_grad()
    def score(self, images, prompt_indices) -> list[dict[str, float]]:
        pixels = self.image_processor(images=list(images), return_tensors="pt")["pixel_values"]
        embeds = torch.nn.functional.normalize(_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)
        return [{concept: float(embed @ self._text(word)) for concept, word in self.items[index].items()}
                for embed, index in zip(embeds, prompt_indices)]


def _features(output) -> torch.Tensor:
    """get_*_features returns a tensor (or, in newer transformers, an output with pooler_output)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def weakening_scenes(n: int, seed: int = 0):
    """`n` one-object shapes scenes whose captions name size, fill, colour, shape and position."""
    from headscope.shapes.world import (HELD_OUT, POSITION_PHRASES, POSITIONS, SIZES, Scene, SceneSampler,
                                        noun_phrase)

    sampler = SceneSampler(seed=seed, held_out=HELD_OUT)
    scenes = []
    for number in range(n):
        scene = sampler.single(size=list(SIZES)[number % 2], position=list(POSITIONS)[number % len(POSITIONS)],
                               allow_glyphs=False)
        obj = scene.objects[0]
        caption = noun_phrase(obj, say_size=True, say_color=True, say_fill=True) + " " + POSITION_PHRASES[obj.position]
        scenes.append(Scene([obj], caption, "single", {"size": True, "color": True, "fill": True, "position": True}))
    return scenes


# -- the estimator -----------------------------------------------------------------------------------

class OrderedWeakening:
    """Weaken the top-k heads of each order for a grid of k and score what the images keep.

        sweep = OrderedWeakening("color", hrv, seeds=(0, 1)).fit(pipe, weakening_scenes(16))
        sweep.summary_      # rows: order, k, concept, role, mean, n

    Args:
        concept: the concept to weaken (a concept of `hrv`).
        hrv: the model's HRV.
        ks: numbers of weakened heads (default `default_ks(n_heads)`).
        factor: multiplier of the weakened maps (-2: the paper; 0: ablation).
        orders: any of "morhf", "lerhf", "random".
        seeds: image seeds; each prompt is generated once per seed (and per head set).
        random_seed: seed of the random order.
        clip: folder of a CLIP model, to score plain-text prompts (shapes scenes need none).
        steps, guidance: generation settings (None: the model's defaults).
        call_options: further pipeline-call arguments (e.g. an SD3 / Flux model's `max_sequence_length`).
        batch_size: prompts per pipeline call.
        progress: tqdm bar on stderr.
        cache: a dict of scored generations that sweeps of one pipeline and prompt list share, so that a
            head set another sweep generated (k = 0, the random order) is not generated again.

    `fit(pipe, prompts)` takes shapes `Scene`s (scored by the annotator) or strings (scored by CLIP).
    Fitted: `results_` (one row per order, k, seed, prompt and scored concept), `summary_` (means per
    order, k and concept), `settings_` ("generations": images this fit generated). Identical head sets
    (k = 0, k = n) are generated once; with a shared `cache`, once across sweeps.
    """

    def __init__(self, concept: str, hrv: HRV, *, ks=None, factor: float = -2.0, orders=ORDERS, seeds=(0, 1),
                 random_seed: int = 0, clip=None, steps: int | None = None, guidance: float | None = None,
                 batch_size: int = 8, progress: bool = False, call_options: dict | None = None,
                 cache: dict | None = None):
        self.concept = concept
        self.hrv = hrv
        self.ks = ks
        self.factor = factor
        self.orders = orders
        self.seeds = seeds
        self.random_seed = random_seed
        self.clip = clip
        self.steps = steps
        self.guidance = guidance
        self.batch_size = batch_size
        self.progress = progress
        self.call_options = call_options
        self.cache = cache

    def plan(self) -> dict[tuple[str, int], tuple[int, ...]]:
        """(order, k) -> the weakened head ids (sorted), after validating the parameters."""
        concept = self.hrv.concept(self.concept)
        orders = list(self.orders)
        unknown = [order for order in orders if order not in ORDERS]
        if unknown or not orders:
            raise HeadscopeError(f"unknown order(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                                 f"use {', '.join(ORDERS)}")
        n_heads = self.hrv.n_heads
        ks = default_ks(n_heads) if self.ks is None else sorted({int(k) for k in self.ks})
        if not ks or ks[0] < 0 or ks[-1] > n_heads:
            raise HeadscopeError(f"k values {ks} must lie in 0..{n_heads} (the number of heads)")
        if not list(self.seeds):
            raise HeadscopeError("give at least one seed")
        return {(order, k): tuple(sorted(head_order(self.hrv, concept, order, self.random_seed)[:k].tolist()))
                for order in orders for k in ks}

    def fit(self, pipe, prompts) -> "OrderedWeakening":
        from tqdm.auto import tqdm

        plan = self.plan()
        self.hrv.check_compatible(HeadIndex.from_model(pipe))
        texts, scorer = self._scorer(list(prompts))
        steps, guidance = generation_defaults(pipe)
        steps, guidance = self.steps or steps, self.guidance if self.guidance is not None else guidance
        positions = [word_key_positions(pipe, text, **(self.call_options or {})) for text in texts]
        scores = {} if self.cache is None else self.cache
        setting = (self.factor, steps, guidance, tuple(self.hrv.concepts))  # what else decides a scored image

        def key(heads, seed, index):
            return (*setting, heads, seed, texts[index])

        head_sets = [heads for heads in sorted(set(plan.values()), key=lambda heads: (len(heads), heads))
                     if any(key(heads, seed, index) not in scores for seed in self.seeds for index in range(len(texts)))]
        batches = [list(range(start, min(start + self.batch_size, len(texts))))
                   for start in range(0, len(texts), self.batch_size)]
        total = len(head_sets) * len(self.seeds) * len(texts)
        with tqdm(total=total, desc="weakening", unit="image", disable=not self.progress) as bar:
            for heads in head_sets:
                for seed in self.seeds:
                    for batch in batches:
                        images = self._generate(pipe, heads, [texts[i] for i in batch],
                                                [positions[i] for i in batch], seed, steps, guidance)
                        for index, scored in zip(batch, scorer.score(images, batch)):
                            scores[key(heads, seed, index)] = scored
                        bar.update(len(batch))
        concept = self.hrv.concept(self.concept)
        self.results_ = [{"order": order, "k": k, "seed": seed, "prompt_index": index, "prompt": texts[index],
                          "concept": scored_concept, "role": "weakened" if scored_concept == concept else "control",
                          "score": value}
                         for (order, k), heads in plan.items() for seed in self.seeds for index in range(len(texts))
                         for scored_concept, value in scores[key(heads, seed, index)].items()]
        self.summary_ = summarize(self.results_)
        self.settings_ = {"concept": concept, "factor": self.factor, "orders": list(self.orders),
                          "ks": sorted({k for _, k in plan}), "seeds": list(self.seeds),
                          "random_seed": self.random_seed, "steps": steps, "guidance": guidance,
                          "n_prompts": len(texts), "n_heads": self.hrv.n_heads,
                          "metric": "annotator accuracy" if isinstance(scorer, ShapesScorer) else "CLIP similarity",
                          "hrv_model": (self.hrv.meta.get("model") or {}).get("name_or_path"),
                          "generations": total}
        return self

    def _scorer(self, prompts):
        if not prompts:
            raise HeadscopeError("no prompts to weaken; give at least one")
        from headscope.shapes.world import Scene

        if all(isinstance(prompt, Scene) for prompt in prompts):
            return [scene.caption for scene in prompts], ShapesScorer(prompts, self.hrv.concepts)
        if not all(isinstance(prompt, str) for prompt in prompts):
            raise HeadscopeError("prompts must be all shapes Scenes or all strings")
        if self.clip is None:
            raise HeadscopeError("plain-text prompts are scored with CLIP: pass clip=PATH (--clip) to a local "
                                 "CLIP model folder")
        return prompts, ClipScorer(self.clip, prompts, self.hrv.concept_words)

    @torch.no_grad()
    def _generate(self, pipe, heads, texts, positions, seed, steps, guidance):
        import headscope

        generators = [torch.Generator("cpu").manual_seed(seed) for _ in texts]
        call = dict(num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                    **(self.call_options or {}))
        if not heads:
            return pipe(texts, **call).images
        hook = HeadWeakening(heads, self.factor, positions, pipe.tokenizer.model_max_length)
        with headscope.trace(pipe, hooks=[hook], maps=False):
            return pipe(texts, **call).images


def summarize(results: list[dict]) -> list[dict]:
    """Mean score per (order, k, concept): rows with order, k, concept, role, mean, n."""
    groups = defaultdict(list)
    for row in results:
        groups[(row["order"], row["k"], row["concept"], row["role"])].append(row["score"])
    rows = [{"order": order, "k": k, "concept": concept, "role": role, "mean": sum(values) / len(values),
             "n": len(values)} for (order, k, concept, role), values in groups.items()]
    order_rank = {order: rank for rank, order in enumerate(ORDERS)}
    return sorted(rows, key=lambda row: (row["role"] != "weakened", row["concept"], order_rank[row["order"]], row["k"]))


def curve_figure(summary: list[dict], settings: dict):
    """Metric vs k, one line per order; one panel for the weakened concept, one per control concept."""
    from matplotlib.figure import Figure

    concepts = list(dict.fromkeys(row["concept"] for row in summary))
    columns = min(3, len(concepts))
    rows = -(-len(concepts) // columns)
    figure = Figure(figsize=(4.2 * columns, 3.4 * rows + 0.8), layout="constrained")
    grid = figure.subplots(rows, columns, squeeze=False)
    # distinct line styles and marker sizes keep coinciding curves visible
    styles = {"morhf": ("tab:red", "o", "-", 7), "lerhf": ("tab:blue", "s", "--", 5), "random": ("tab:gray", "^", ":", 4)}
    accuracy = settings.get("metric") == "annotator accuracy"
    for panel, concept in enumerate(concepts):
        axes = grid[panel // columns][panel % columns]
        role = next(row["role"] for row in summary if row["concept"] == concept)
        for order in ORDERS:
            points = sorted((row["k"], row["mean"]) for row in summary
                            if row["concept"] == concept and row["order"] == order)
            if points:
                color, marker, line, size = styles[order]
                axes.plot(*zip(*points), color=color, marker=marker, linestyle=line, markersize=size,
                          label=ORDER_LABELS[order])
        axes.set_title(f"{'weakened' if role == 'weakened' else 'control'}: {concept}",
                       fontsize=11, fontweight="bold" if role == "weakened" else "normal")
        axes.set_xlabel(f"k = number of weakened heads (of {settings.get('n_heads')})")
        axes.set_ylabel(settings.get("metric", "score"))
        if accuracy:
            axes.set_ylim(-0.03, 1.03)
        axes.grid(alpha=0.3)
    for panel in range(len(concepts), rows * columns):
        grid[panel // columns][panel % columns].set_visible(False)
    grid[0][0].legend(fontsize=8)
    figure.suptitle(f"Ordered weakening of \"{settings.get('concept')}\": heads' maps x {settings.get('factor')} "
                    f"at the prompt's word tokens ({settings.get('n_prompts')} prompts x "
                    f"{len(settings.get('seeds', []))} seed(s))", fontsize=11)
    return figure
