"""HeadIndex: every text-conditioned attention head of a diffusion backbone, in execution order.

A backbone adapter (`headscope.backbones`) says which attention modules see the text and in which order
they run: a UNet2DConditionModel's cross-attention modules (down blocks, mid block, up blocks; note that
`unet.attn_processors` iterates down -> up -> mid, which is not execution order), SD3's joint blocks,
Flux's double- then single-stream blocks. Every head gets a flat id: `offset(layer) + head`, so SD 1.x
has ids 0..127, SDXL base 0..1299 (the layout the HRV paper's arrays use), SD3-medium 0..575 and
Flux.1-dev 0..1367.

Nothing here hard-codes a layer list or a resolution: a layer's token grid follows from its
downsampling depth (`level`; a transformer's patchify counts as log2(patch) stride-2 steps) and the
latent size.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Iterator, NamedTuple

import torch

from headscope.errors import HeadscopeError

# The fields that define which heads exist and where; the fingerprint hashes these, not resolutions.
_STRUCTURE_FIELDS = ("name", "block", "block_index", "level", "heads", "head_dim", "offset")


@dataclass(frozen=True)
class LayerInfo:
    """One text-conditioned attention layer (an attention module) of the backbone.

    Attributes:
        index: position in execution order, 0-based.
        name: module name in the denoiser, e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn2",
            "transformer_blocks.3.attn", "single_transformer_blocks.7.attn".
        block: "down", "mid" or "up" (UNet); "joint" (SD3); "double" or "single" (Flux).
        block_index: index in its block list (`unet.down_blocks`, `transformer.transformer_blocks`, ...;
            0 for the mid block).
        level: downsampling depth: how many stride-2 downsamplers ran before this layer (0 = full latent
            size; SD3's and Flux's 2x2 patches count as 1).
        heads: number of attention heads (`attn.heads`).
        head_dim: channels per head.
        offset: flat id of this layer's head 0.
        resolution: (h, w) of the layer's image-query grid at the index's latent size.
        kind: "cross" (UNet cross-attention: every key is a text token), "joint" (SD3 / Flux double-stream:
            image and text tokens attend jointly, text has its own projections) or "single" (Flux
            single-stream: one projection over the concatenated [text; image] sequence).
    """

    index: int
    name: str
    block: str
    block_index: int
    level: int
    heads: int
    head_dim: int
    offset: int
    resolution: tuple[int, int]
    kind: str = "cross"  # last and defaulted: layouts stored before joint attention still load

    @property
    def head_ids(self) -> range:
        """Flat ids of this layer's heads."""
        return range(self.offset, self.offset + self.heads)

    @property
    def label(self) -> str:
        """Short human label, e.g. "down block 0 · attention 1 · 64×64" ("· sublayer t" when t > 0),
        "joint block 3 · 64×64", "single block 12 · 64×64"."""
        height, width = self.resolution
        if self.kind != "cross":
            return f"{self.block} block {self.block_index} · {height}×{width}"
        parts = self.name.split(".")
        attention = parts[parts.index("attentions") + 1] if "attentions" in parts else "?"
        sublayer = int(parts[parts.index("transformer_blocks") + 1]) if "transformer_blocks" in parts else 0
        block = "mid block" if self.block == "mid" else f"{self.block} block {self.block_index}"
        within = f"attention {attention}" + (f" · sublayer {sublayer}" if sublayer else "")
        return f"{block} · {within} · {height}×{width}"


class HeadRef(NamedTuple):
    """One head: its flat id, its layer's execution index and its index inside the layer."""

    id: int
    layer: int
    head: int


def resolution_at(level: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """Spatial (h, w) after `level` stride-2 downsamplers applied to a latent of size `latent_hw`.

    diffusers' Downsample2D (3x3 conv, stride 2, padding 1) maps a side n to ceil(n / 2); the up path
    upsamples back to the skip connection's size, so the same formula holds there.
    """
    height, width = latent_hw
    for _ in range(level):
        height, width = -(-height // 2), -(-width // 2)
    return height, width


def query_grid(n_query: int, level: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(h, w) of a flattened query grid of `n_query` positions at `level` of a latent of `latent_hw` (None:
    unknown): the level's resolution when it has that many positions, else the latent's aspect at that count,
    else a square, else one row."""
    if latent_hw is not None:
        height, width = resolution_at(level, latent_hw)
        if height * width == n_query:
            return height, width
        factor = math.sqrt(latent_hw[0] * latent_hw[1] / n_query)
        height, width = round(latent_hw[0] / factor), round(latent_hw[1] / factor)
        if height * width == n_query:
            return height, width
    side = math.isqrt(n_query)
    return (side, side) if side * side == n_query else (1, n_query)


class HeadIndex:
    """Every text-conditioned attention head of a backbone, in execution order, at one latent size.

    `len(index)` is the number of heads; iterating yields `HeadRef(id, layer, head)` for each head in
    flat-id order; `index.layers` lists the `LayerInfo`s. Build it with `HeadIndex.from_model(model)`
    (a UNet2DConditionModel, SD3Transformer2DModel or FluxTransformer2DModel, also on `meta`) or,
    without weights, `HeadIndex.from_config(config_dict)`.
    """

    def __init__(self, layers: list[LayerInfo], latent_hw: tuple[int, int]):
        self.layers: tuple[LayerInfo, ...] = tuple(layers)
        self.latent_hw = tuple(latent_hw)
        self._by_name = {layer.name: layer for layer in self.layers}

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def from_model(cls, model, latent_hw: tuple[int, int] | int | None = None) -> "HeadIndex":
        """Index the text-conditioned attention heads of a denoiser (any device, also `meta`).

        Args:
            model: a `UNet2DConditionModel`, `SD3Transformer2DModel` or `FluxTransformer2DModel` (or a
                pipeline holding one); anything else raises HeadscopeError naming the supported families.
            latent_hw: latent (h, w) or side for `resolution`; default the model's configured sample size.
        """
        from headscope.backbones import backbone_for

        backbone = backbone_for(model)
        latent_hw = _latent_hw(latent_hw if latent_hw is not None else backbone.default_latent_hw())
        layers = backbone.layers(latent_hw)
        if not layers:
            raise HeadscopeError(f"this {type(backbone.model).__name__} has no text-conditioned attention "
                                 "layers; headscope needs a text-to-image model")
        return cls(layers, latent_hw)

    @classmethod
    def from_unet(cls, unet, latent_hw: tuple[int, int] | int | None = None) -> "HeadIndex":
        """Index the cross-attention heads of a `UNet2DConditionModel` (`from_model` for any backbone)."""
        return cls.from_model(unet, latent_hw)

    @classmethod
    def from_config(cls, config: dict, latent_hw: tuple[int, int] | int | None = None) -> "HeadIndex":
        """Index a denoiser described by its config dict (`_class_name` picks the family; UNet when
        absent), built on the `meta` device (no weights, no memory)."""
        from headscope.backbones import model_class_for_config

        with torch.device("meta"):
            model = model_class_for_config(config).from_config(dict(config))
        return cls.from_model(model, latent_hw)

    @property
    def noun(self) -> str:
        """"cross-attention" for a UNet's layers, "joint-attention" for a transformer's."""
        return "cross-attention" if all(layer.kind == "cross" for layer in self.layers) else "joint-attention"

    def at_latent(self, latent_hw: tuple[int, int] | int) -> "HeadIndex":
        """The same index with resolutions for another latent size (h, w)."""
        latent_hw = _latent_hw(latent_hw)
        layers = [replace(layer, resolution=resolution_at(layer.level, latent_hw)) for layer in self.layers]
        return HeadIndex(layers, latent_hw)

    def at_image(self, height: int, width: int, vae_scale_factor: int = 8) -> "HeadIndex":
        """The same index with resolutions for an image of `height` x `width` pixels."""
        if height % vae_scale_factor or width % vae_scale_factor:
            raise HeadscopeError(f"image size {height}x{width} is not a multiple of the VAE scale "
                                 f"factor {vae_scale_factor}")
        return self.at_latent((height // vae_scale_factor, width // vae_scale_factor))

    # -- lookup -------------------------------------------------------------------------------

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def n_heads(self) -> int:
        last = self.layers[-1]
        return last.offset + last.heads

    def __len__(self) -> int:
        return self.n_heads

    def __iter__(self) -> Iterator[HeadRef]:
        for layer in self.layers:
            for head in range(layer.heads):
                yield HeadRef(layer.offset + head, layer.index, head)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, layer: int | str) -> LayerInfo:
        return self.layer(layer)

    def layer(self, layer: int | str) -> LayerInfo:
        """A layer by execution index or by module name."""
        if isinstance(layer, str):
            if layer not in self._by_name:
                raise HeadscopeError(f"no {self.noun} layer named {layer!r}; "
                                     f"names look like {self.layers[0].name!r}")
            return self._by_name[layer]
        if not 0 <= layer < self.n_layers:
            raise HeadscopeError(f"layer {layer} out of range; this model has {self.n_layers} "
                                 f"{self.noun} layers")
        return self.layers[layer]

    def flat(self, layer: int | str, head: int) -> int:
        """Flat head id of `head` in `layer` (execution index or module name)."""
        info = self.layer(layer)
        if not 0 <= head < info.heads:
            raise HeadscopeError(f"head {head} out of range; layer {info.name} has {info.heads} heads")
        return info.offset + head

    def unflat(self, head_id: int) -> tuple[int, int]:
        """(layer execution index, head within layer) of a flat head id."""
        if not 0 <= head_id < self.n_heads:
            raise HeadscopeError(f"head id {head_id} out of range; this model has {self.n_heads} heads")
        for layer in self.layers:
            if head_id < layer.offset + layer.heads:
                return layer.index, head_id - layer.offset
        raise AssertionError("unreachable: offsets cover every head id")

    # -- description --------------------------------------------------------------------------

    def layout(self) -> list[dict]:
        """JSON-able list, one dict per layer: the LayerInfo fields (resolution as [h, w])."""
        return [{**asdict(layer), "resolution": list(layer.resolution)} for layer in self.layers]

    def fingerprint(self) -> str:
        """12 hex digits hashing the head layout (names, blocks, levels, heads, head dims, offsets, and
        the kind of joint-attention layers).

        Resolutions are left out: a file made at one image size applies at any other. A cross-attention
        layer hashes exactly the fields it did before layers had a kind, so UNet fingerprints (and the
        HRV files keyed by them) are unchanged.
        """
        structure = [{field: entry[field] for field in _structure_fields(entry["kind"])} for entry in self.layout()]
        text = json.dumps(structure, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return (f"HeadIndex({self.n_layers} layers, {self.n_heads} heads, latent {self.latent_hw}, "
                f"fingerprint {self.fingerprint()})")


def _structure_fields(kind: str) -> tuple[str, ...]:
    return _STRUCTURE_FIELDS if kind == "cross" else (*_STRUCTURE_FIELDS, "kind")


def _latent_hw(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)
