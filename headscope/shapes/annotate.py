"""The annotator: reads any shapes-world image (rendered or generated) back into objects.

Foreground pixels are split into connected components; each component gets a colour (nearest
palette colour of its median pixel), a shape (best-matching template stretched to its bounding box,
then aspect ratio for circle/oval and square/rectangle), a fill, a size and a position.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from scipy import ndimage

from headscope.shapes.world import COLORS, IMAGE_SIZE, POSITIONS, SIZES, ObjectSpec, Scene, _draw

FOREGROUND = 60        # a pixel whose brightest channel exceeds this belongs to an object
MIN_AREA = 12          # pixels, at 64x64; smaller specks are noise
TEMPLATES = ("circle", "square", "triangle", "star", "rose", "orange")
ROUND_ASPECT = 1.35    # bounding-box aspect above which an ellipse is an oval, a box a rectangle
HOLLOW_RATIO = 0.93    # area / filled area below this: an outline, not a solid shape


@dataclass
class DetectedObject:
    """One object read off an image. `mask` is bool `[H, W]`."""

    shape: str
    color: str
    size: str
    position: str
    fill: str
    area: int
    centroid: tuple[float, float]
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive)
    shape_score: float
    mask: np.ndarray

    @property
    def sense(self) -> str:
        return "object" if self.shape in ("rose", "orange") else "color"

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("mask")
        return data


@lru_cache(maxsize=None)
def _template(shape: str) -> np.ndarray:
    """Canonical filled mask of a shape cropped to its bounding box, float `[h, w]` at 4x resolution."""
    from PIL import ImageDraw

    obj = ObjectSpec(shape=shape, color="white", size="large", position="center", center=(32.0, 32.0))
    layer = Image.new("L", (256, 256), 0)
    _draw(ImageDraw.Draw(layer), obj, 255, 4.0, mask=True)
    arr = np.asarray(layer) >= 128
    ys, xs = np.nonzero(arr)
    return arr[ys.min(): ys.max() + 1, xs.min(): xs.max() + 1].astype(np.float32)


def _template_iou(filled: np.ndarray, shape: str) -> float:
    h, w = filled.shape
    tpl = Image.fromarray((_template(shape) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
    tpl = np.asarray(tpl) >= 128
    inter = np.logical_and(tpl, filled).sum()
    union = np.logical_or(tpl, filled).sum()
    return float(inter) / max(1, union)


def classify_shape(filled: np.ndarray) -> tuple[str, float]:
    """Shape of a filled object mask cropped to its bounding box `[h, w]`: (name, template IoU)."""
    scores = {name: _template_iou(filled, name) for name in TEMPLATES}
    best = max(scores, key=scores.get)
    h, w = filled.shape
    elongated = max(w / h, h / w) > ROUND_ASPECT
    if best == "circle" and elongated:
        best = "oval"
    elif best == "square" and elongated:
        best = "rectangle"
    return best, scores[max(scores, key=scores.get)]


_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[c] for c in _PALETTE_NAMES], dtype=np.float32)


def classify_color(pixels: np.ndarray) -> str:
    """Nearest palette colour of the median of `[n, 3]` RGB pixels."""
    median = np.median(pixels.astype(np.float32), axis=0)
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - median) ** 2).sum(axis=1)))]


def classify_size(bbox: tuple[int, int, int, int], image_size: int) -> str:
    extent = max(bbox[2] - bbox[0], bbox[3] - bbox[1]) * IMAGE_SIZE / image_size
    cut = SIZES["small"] + SIZES["large"]  # the midpoint of the two diameters
    return "small" if extent < cut else "large"


def classify_position(centroid: tuple[float, float], image_size: int) -> str:
    x, y = (c * IMAGE_SIZE / image_size for c in centroid)
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)


def annotate(image) -> list[DetectedObject]:
    """Objects of an image (PIL image or uint8 `[H, W, 3]`), largest first."""
    rgb = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    size = rgb.shape[0]
    min_area = MIN_AREA * (size / IMAGE_SIZE) ** 2
    foreground = rgb.max(axis=2) > FOREGROUND
    labels, n = ndimage.label(foreground, structure=np.ones((3, 3)))
    objects = []
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels == index
        area = int(mask.sum())
        if area < min_area:
            continue
        filled = ndimage.binary_fill_holes(mask)
        ys, xs = np.nonzero(filled)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        crop = filled[bbox[1]: bbox[3], bbox[0]: bbox[2]]
        shape, score = classify_shape(crop)
        core = ndimage.binary_erosion(mask) if area > 40 else mask
        pixels = rgb[core if core.any() else mask]
        centroid = (float(xs.mean()), float(ys.mean()))
        fill = "hollow" if area / filled.sum() < HOLLOW_RATIO else "solid"
        objects.append(DetectedObject(shape=shape, color=classify_color(pixels), size=classify_size(bbox, size),
                                      position=classify_position(centroid, size), fill=fill, area=area,
                                      centroid=centroid, bbox=bbox, shape_score=score, mask=mask))
    return sorted(objects, key=lambda o: -o.area)


# ------------------------------------------------------------------------------------------- scoring
def _matches(obj: DetectedObject, want: ObjectSpec, attrs) -> bool:
    return all(getattr(obj, a) == getattr(want, a) for a in attrs)


def score_scene(scene: Scene, objects: list[DetectedObject]) -> dict:
    """Score the annotator's reading of a generated image against the scene its prompt describes.

    Returns a dict of booleans (None where the attribute was not asked for):
      single: color, shape, size, position, fill of the largest object; count_ok
      pair:   each requested (shape) present, each (color, shape) present, both_present, both_correct
      count:  count_ok (objects of the requested shape == n), color
      polysemy: wanted_sense, unwanted_sense for polysemous words
    """
    said = scene.mentioned
    result: dict = {"kind": scene.kind, "n_detected": len(objects)}
    if scene.kind == "single":
        want = scene.objects[0]
        top = objects[0] if objects else None
        for attr in ("color", "shape", "size", "position", "fill"):
            asked = said.get(attr, True)
            if attr == "color" and want.shape == "orange":
                asked = False
            result[attr] = (top is not None and getattr(top, attr) == getattr(want, attr)) if asked else None
        result["count_ok"] = len(objects) == 1
    elif scene.kind == "pair":
        shape_hits = [any(_matches(o, w, ("shape",)) for o in objects) for w in scene.objects]
        full_hits = [any(_matches(o, w, ("shape", "color")) for o in objects) for w in scene.objects]
        result.update(shape_present=shape_hits, both_present=all(shape_hits), both_correct=all(full_hits),
                      color=None, shape=None)
    else:
        want = scene.objects[0]
        same = [o for o in objects if o.shape == want.shape]
        result["count_ok"] = len(same) == len(scene.objects)
        result["color"] = bool(objects) and objects[0].color == want.color
    senses = [w.sense for w in scene.objects if w.sense is not None]
    if senses:
        result.update(polysemy_scoring(scene, objects))
    return result


def polysemy_scoring(scene: Scene, objects: list[DetectedObject]) -> dict:
    """Which sense of a polysemous word ('rose', 'orange') was drawn.

    Colour sense asked ('a rose square'): the unwanted sense is drawn when the glyph appears.
    Object sense asked ('a rose'): the unwanted sense is drawn when the glyph is missing.
    """
    out = {}
    for want in scene.objects:
        if want.sense is None:
            continue
        word = want.shape if want.sense == "object" else want.color
        glyph_drawn = any(o.shape == word for o in objects)
        if want.sense == "color":
            wanted = any(o.shape == want.shape and o.color == want.color for o in objects)
            unwanted = glyph_drawn
        else:
            wanted, unwanted = glyph_drawn, not glyph_drawn
        out["polysemy"] = {"word": word, "asked": want.sense, "wanted_sense": wanted, "unwanted_sense": unwanted}
    return out
