"""The shapes world: a seeded scene sampler, a caption grammar and a renderer with ground truth.

Scenes hold 1-3 flat objects on a black canvas. Every rendered image comes with one mask and one set
of attribute labels per object, so any experiment on the embedded model can score itself.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 240),
    "yellow": (240, 220, 50),
    "purple": (150, 60, 210),
    "orange": (250, 140, 30),
    "rose": (250, 110, 180),
    "white": (235, 235, 235),
}
# Geometric shapes take any colour; the two glyphs are the object senses of polysemous colour words.
GEOMETRIC = ("circle", "oval", "square", "rectangle", "triangle", "star")
GLYPHS = ("rose", "orange")
SHAPES = GEOMETRIC + GLYPHS
ROSE_COLORS = ("red", "white", "yellow")
PLURALS = {s: s + "s" for s in SHAPES}
SIZES = {"small": 8.0, "large": 13.0}  # half-extent in pixels at IMAGE_SIZE
POSITIONS = {"left": (16, 32), "right": (48, 32), "top": (32, 16), "bottom": (32, 48), "center": (32, 32)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
COUNTS = {1: "one", 2: "two", 3: "three"}
FILLS = ("solid", "hollow")
POLYSEMOUS = ("rose", "orange")
# Colour x shape combinations that never appear in training: held out to test composition.
HELD_OUT = frozenset({("purple", "star"), ("green", "triangle"), ("white", "square"), ("yellow", "oval")})

WORDS = sorted(set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(SIZES) | set(POSITIONS)
               | set(COUNTS.values()) | {"hollow", "a", "an", "and", "on", "at", "in", "the"})


@dataclass
class ObjectSpec:
    """One object of a scene: what it is and where it is drawn."""

    shape: str
    color: str
    size: str
    position: str
    fill: str = "solid"
    center: tuple[float, float] = (32.0, 32.0)

    @property
    def sense(self) -> str | None:
        """For polysemous words: 'object' when drawn as the glyph, 'color' when used as the colour."""
        if self.shape in GLYPHS:
            return "object"
        if self.color in POLYSEMOUS:
            return "color"
        return None


@dataclass
class Scene:
    """A scene: its objects, the caption that describes them and how it was built."""

    objects: list[ObjectSpec]
    caption: str
    kind: str  # "single", "pair" or "count"
    mentioned: dict = field(default_factory=dict)  # attribute -> whether the caption names it

    def to_json(self) -> dict:
        return {"caption": self.caption, "kind": self.kind, "mentioned": self.mentioned,
                "objects": [asdict(o) for o in self.objects]}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(obj: ObjectSpec, *, say_size: bool, say_color: bool, say_fill: bool, count: int = 1,
                use_one: bool = False) -> str:
    """'a small hollow red circle', 'two blue stars', 'an orange' (the fruit), 'a white rose'."""
    words = []
    if say_size:
        words.append(obj.size)
    if say_fill and obj.fill == "hollow":
        words.append("hollow")
    if say_color and obj.shape != "orange":
        words.append(obj.color)
    words.append(PLURALS[obj.shape] if count > 1 else obj.shape)
    if count > 1:
        return " ".join([COUNTS[count]] + words)
    return " ".join(["one" if use_one else article(words[0])] + words)


class SceneSampler:
    """Seeded sampler of training and evaluation scenes.

    Args:
        seed: RNG seed; the same seed yields the same scene sequence.
        held_out: colour x shape pairs never sampled (None: the world's HELD_OUT).
        p_single, p_pair: shares of one-object and two-object scenes; the rest are counted groups.
    """

    def __init__(self, seed: int = 0, held_out=HELD_OUT, p_single: float = 0.55, p_pair: float = 0.30):
        self.rng = np.random.default_rng(seed)
        self.held_out = frozenset(held_out or ())
        self.p_single, self.p_pair = p_single, p_pair

    def _choice(self, items, p=None):
        return items[self.rng.choice(len(items), p=p)]

    def sample_object(self, *, shape=None, color=None, size=None, fill=None, allow_glyphs=True) -> ObjectSpec:
        shapes = SHAPES if allow_glyphs else GEOMETRIC
        weights = np.array([1.0] * len(GEOMETRIC) + [0.8] * (len(shapes) - len(GEOMETRIC)))
        while True:
            sh = shape or self._choice(shapes, weights / weights.sum())
            if sh == "rose":
                co = color or self._choice(ROSE_COLORS, [0.6, 0.2, 0.2])
            elif sh == "orange":
                co = "orange"
            else:
                names = list(COLORS)
                cw = np.array([0.5 if c in POLYSEMOUS else 1.0 for c in names])
                co = color or self._choice(names, cw / cw.sum())
            if (co, sh) not in self.held_out or (shape and color):
                break
        fi = fill or ("hollow" if sh in GEOMETRIC and self.rng.random() < 0.12 else "solid")
        return ObjectSpec(shape=sh, color=co, size=size or self._choice(list(SIZES)), position="center", fill=fi)

    def place(self, obj: ObjectSpec, position: str, anchor: tuple[float, float] | None = None,
              jitter: float = 2.0) -> ObjectSpec:
        cx, cy = anchor or POSITIONS[position]
        jitter = self.rng.uniform(-jitter, jitter, size=2)
        obj.position, obj.center = position, (cx + float(jitter[0]), cy + float(jitter[1]))
        return obj

    def sample(self) -> Scene:
        u = self.rng.random()
        if u < self.p_single:
            return self.single()
        if u < self.p_single + self.p_pair:
            return self.pair()
        return self.count()

    def single(self, **attrs) -> Scene:
        position = attrs.pop("position", None) or self._choice(list(POSITIONS))
        obj = self.place(self.sample_object(**attrs), position)
        say = {"size": self.rng.random() < 0.8, "color": obj.shape != "rose" or self.rng.random() < 0.6,
               "fill": True, "position": self.rng.random() < 0.9}
        if obj.shape == "rose" and obj.color != "red":
            say["color"] = True
        phrase = noun_phrase(obj, say_size=say["size"], say_color=say["color"], say_fill=True,
                             use_one=self.rng.random() < 0.1)
        if say["position"]:
            phrase += " " + POSITION_PHRASES[position]
        return Scene([obj], phrase, "single", say)

    def pair(self, first: ObjectSpec | None = None, second: ObjectSpec | None = None,
             say_position: bool | None = None) -> Scene:
        a = first or self.sample_object()
        b = second or self.sample_object()
        while (a.shape, a.color) == (b.shape, b.color):
            if second is not None:
                raise ValueError(f"a pair needs two different objects, got two {a.color} {a.shape}s")
            b = self.sample_object()
        axis = (("left", "right"), ("top", "bottom"))[int(self.rng.integers(2))]
        if self.rng.random() < 0.5:
            axis = axis[::-1]
        self.place(a, axis[0]), self.place(b, axis[1])
        say_pos = self.rng.random() < 0.6 if say_position is None else say_position
        say_size = self.rng.random() < 0.4
        parts = []
        for obj in (a, b):
            p = noun_phrase(obj, say_size=say_size, say_color=obj.shape != "rose" or obj.color != "red",
                            say_fill=True)
            parts.append(p + (" " + POSITION_PHRASES[obj.position] if say_pos else ""))
        return Scene([a, b], " and ".join(parts), "pair",
                     {"size": say_size, "color": True, "fill": True, "position": say_pos})

    def count(self, n: int | None = None, **attrs) -> Scene:
        n = n or int(self.rng.integers(2, 4))
        proto = self.sample_object(size="small" if n == 3 else attrs.pop("size", None), **attrs)
        # Groups sit in a row or a column, spaced so that neighbours never touch.
        spots = {2: (("left", 16), ("right", 48)), 3: (("left", 11), ("center", 32), ("right", 53))}[n]
        vertical = self.rng.random() < 0.5
        objs = []
        for name, coord in spots:
            if vertical:
                name = {"left": "top", "right": "bottom"}.get(name, name)
            anchor = (32.0, float(coord)) if vertical else (float(coord), 32.0)
            objs.append(self.place(ObjectSpec(proto.shape, proto.color, proto.size, "center", proto.fill),
                                   name, anchor, jitter=1.0))
        say_size = self.rng.random() < 0.5
        phrase = noun_phrase(proto, say_size=say_size, say_color=True, say_fill=True, count=n)
        return Scene(objs, phrase, "count", {"size": say_size, "color": True, "fill": True, "position": False})


def _star(cx, cy, r, points=5, inner=0.42):
    pts = []
    for k in range(2 * points):
        rad = r if k % 2 == 0 else r * inner
        ang = -math.pi / 2 + k * math.pi / points
        pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
    return pts


def _draw(draw: ImageDraw.ImageDraw, obj: ObjectSpec, fill, s: float, *, mask: bool = False) -> None:
    """Draw one object at supersampled scale s; with mask=True every part is drawn in `fill`."""
    cx, cy = obj.center[0] * s, obj.center[1] * s
    r = SIZES[obj.size] * s
    hollow = obj.fill == "hollow" and not mask
    width = int(round(2.5 * s))
    kw = {"outline": fill, "width": width} if hollow else {"fill": fill}
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), **kw)
    elif obj.shape == "oval":
        draw.ellipse((cx - r, cy - 0.55 * r, cx + r, cy + 0.55 * r), **kw)
    elif obj.shape == "square":
        q = 0.9 * r
        draw.rectangle((cx - q, cy - q, cx + q, cy + q), **kw)
    elif obj.shape == "rectangle":
        draw.rectangle((cx - r, cy - 0.5 * r, cx + r, cy + 0.5 * r), **kw)
    elif obj.shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)], **kw)
    elif obj.shape == "star":
        draw.polygon(_star(cx, cy, r), **kw)
    elif obj.shape == "rose":
        for k in range(5):
            ang = -math.pi / 2 + k * 2 * math.pi / 5
            px, py = cx + 0.55 * r * math.cos(ang), cy + 0.55 * r * math.sin(ang)
            pr = 0.45 * r
            draw.ellipse((px - pr, py - pr, px + pr, py + pr), fill=fill)
        cr = 0.28 * r
        draw.ellipse((cx - cr, cy - cr, cx + cr, cy + cr), fill=fill if mask else (120, 20, 40))
    elif obj.shape == "orange":
        dr, dy = 0.82 * r, cy + 0.15 * r
        draw.ellipse((cx - dr, dy - dr, cx + dr, dy + dr), fill=fill)
        leaf = [(cx + 0.05 * r, cy - 0.62 * r), (cx + 0.45 * r, cy - 1.0 * r), (cx + 0.75 * r, cy - 0.95 * r),
                (cx + 0.45 * r, cy - 0.62 * r)]
        draw.polygon(leaf, fill=fill if mask else COLORS["green"])
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known: {', '.join(SHAPES)}")


def render(scene: Scene, *, size: int = IMAGE_SIZE, color_jitter: float = 0.0,
           rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render a scene.

    Returns:
        image: uint8 `[size, size, 3]`.
        masks: bool `[n_objects, size, size]`, one per object in scene order.
    """
    s = SUPERSAMPLE * size / IMAGE_SIZE
    big = size * SUPERSAMPLE
    canvas = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    masks = []
    for obj in scene.objects:
        base = np.array(COLORS[obj.color], dtype=np.float64)
        if color_jitter and rng is not None:
            base = np.clip(base + rng.uniform(-color_jitter, color_jitter, 3), 0, 255)
        _draw(draw, obj, tuple(int(c) for c in base), s)
        layer = Image.new("L", (big, big), 0)
        _draw(ImageDraw.Draw(layer), obj, 255, s, mask=True)
        masks.append(np.asarray(layer.resize((size, size), Image.BOX)) >= 128)
    image = np.asarray(canvas.resize((size, size), Image.BOX))
    return image, np.stack(masks) if masks else np.zeros((0, size, size), bool)
