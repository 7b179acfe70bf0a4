"""The prompt sets of the steering benchmark (benchmarks/steering.py): shapes-world scenes and captions.

Every function takes the benchmark's context, of which it reads `fits(prompt)` (whether every model of
the run takes a caption) and `args.n_prompts`, and returns a fixed choice of those captions, so models
run side by side get the same prompts.
"""
from __future__ import annotations

import random

PLAIN_COLORS = ("red", "green", "blue", "yellow", "purple", "white")


def single_scene(shape: str, color: str, size: str, position: str):
    """A one-object scene whose caption names size, colour, shape and position."""
    from headscope.shapes.world import POSITION_PHRASES, POSITIONS, ObjectSpec, Scene, noun_phrase

    center = tuple(float(coordinate) for coordinate in POSITIONS[position])
    obj = ObjectSpec(shape=shape, color=color, size=size, position=position, center=center)
    caption = noun_phrase(obj, say_size=True, say_color=True, say_fill=True) + " " + POSITION_PHRASES[position]
    return Scene([obj], caption, "single", {"size": True, "color": True, "fill": True, "position": True})


def pair_scene(first: tuple[str, str], second: tuple[str, str]):
    """'a red circle and a blue square' (no sizes or positions said)."""
    from headscope.shapes.world import ObjectSpec, Scene, article

    objects = [ObjectSpec(shape=shape, color=color, size="large", position="center")
               for color, shape in (first, second)]
    caption = " and ".join(f"{article(color)} {color} {shape}" for color, shape in (first, second))
    return Scene(objects, caption, "pair", {"size": False, "color": True, "fill": True, "position": False})


def pick(context, candidates: list, salt: int) -> list:
    """n_prompts of the candidates (a fixed shuffle), skipping captions the text encoder cannot take."""
    shuffled = list(candidates)
    random.Random(salt).shuffle(shuffled)
    fitting = [item for item in shuffled if context.fits(_caption(item))]
    return fitting[:context.args.n_prompts]


def _caption(item) -> str:
    return item.caption if hasattr(item, "caption") else item[0].caption


def polysemy_scenes(context) -> list:
    from headscope.shapes.world import GEOMETRIC, POLYSEMOUS, POSITIONS, SIZES

    candidates = [single_scene(shape, word, size, position) for word in POLYSEMOUS for shape in GEOMETRIC
                  for size in SIZES for position in POSITIONS]
    return pick(context, candidates, 1)


END_WORD_TEMPLATES = ("{a} {shape} in rose", "{a} {shape} colored rose", "{a} {shape} painted rose", "one {shape} in rose")


def end_word_scenes(context) -> list:
    """'a square in rose', 'a star painted rose': the colour word 'rose' ends the prompt.

    The set was chosen on a pilot with other seeds (7000-7003): with the colour word last the model drew
    the rose glyph in 0.33 of the images for 'rose' but 0.02 for 'orange', and 0.00-0.11 with 'in the
    color rose', 'that is rose' or 'the ... in rose' (a size word before the shape also lowers it).
    There are 24 captions; each comes back with another seed until the set has n_prompts prompts.
    """
    from headscope.shapes.world import GEOMETRIC, ObjectSpec, Scene, article

    captions = [template.format(a=article(shape), shape=shape) for template in END_WORD_TEMPLATES
                for shape in GEOMETRIC]
    scenes = [Scene([ObjectSpec(shape=caption.split()[1], color="rose", size="large", position="center")], caption,
                    "single", {"size": False, "color": True, "fill": True, "position": False}) for caption in captions]
    fitting, chosen = [scene for scene in scenes if context.fits(scene.caption)], []
    for repeat in range(-(-context.args.n_prompts // max(1, len(fitting)))):  # every caption once per round
        block = list(fitting)
        random.Random(7 + repeat).shuffle(block)
        chosen += block
    return chosen[:context.args.n_prompts]


def pair_scenes(context) -> list:
    from headscope.shapes.world import GEOMETRIC

    candidates = [pair_scene((c1, s1), (c2, s2)) for c1 in PLAIN_COLORS for s1 in GEOMETRIC for c2 in PLAIN_COLORS
                  for s2 in GEOMETRIC if s1 != s2 and c1 != c2]
    return pick(context, candidates, 2)


def single_scenes(context, salt: int) -> list:
    from headscope.shapes.world import GEOMETRIC, HELD_OUT, POSITIONS, SIZES

    candidates = [single_scene(shape, color, size, position) for color in PLAIN_COLORS for shape in GEOMETRIC
                  for size in SIZES for position in POSITIONS if (color, shape) not in HELD_OUT]
    return pick(context, candidates, salt)


def edit_pairs(context) -> list:
    """(source scene, target scene, kind): colour edits and shape edits, half each."""
    from headscope.shapes.world import GEOMETRIC

    rng = random.Random(3)
    pairs = []
    for source in single_scenes(context, 3):
        obj = source.objects[0]
        if len(pairs) % 2 == 0:
            kind, color, shape = "color", rng.choice([c for c in PLAIN_COLORS if c != obj.color]), obj.shape
        else:
            kind, color, shape = "shape", obj.color, rng.choice([s for s in GEOMETRIC if s != obj.shape])
        target = single_scene(shape, color, obj.size, obj.position)
        if context.fits(target.caption):
            pairs.append((source, target, kind))
    return pairs

def object_sense_scenes(context) -> list:
    """'a large rose on the left': the drawn object (glyph) sense of each polysemous word."""
    from headscope.shapes.world import POLYSEMOUS, POSITION_PHRASES, POSITIONS, SIZES, ObjectSpec, Scene, article

    candidates = []
    for word in POLYSEMOUS:
        for size in SIZES:
            for position in POSITIONS:
                obj = ObjectSpec(shape=word, color="orange" if word == "orange" else "red", size=size,
                                 position=position, center=tuple(float(c) for c in POSITIONS[position]))
                caption = f"{article(size)} {size} {word} {POSITION_PHRASES[position]}"
                candidates.append(Scene([obj], caption, "single",
                                        {"size": True, "color": False, "fill": True, "position": True}))
    return pick(context, candidates, 6)


def crowded_prompts(context) -> list[tuple[str, list[str]]]:
    """(caption, its three shapes): three different colours and shapes, a fixed shuffle."""
    from headscope.shapes.world import GEOMETRIC, article

    rng = random.Random(5)
    prompts = []
    for _ in range(50 * context.args.n_prompts):
        colors, shapes = rng.sample(PLAIN_COLORS, 3), rng.sample(GEOMETRIC, 3)
        caption = " and ".join(f"{article(color)} {color} {shape}" for color, shape in zip(colors, shapes))
        if context.fits(caption):
            prompts.append((caption, shapes))
        if len(prompts) == context.args.n_prompts:
            break
    return prompts
