"""Backbone adapters: where each model family keeps its text-conditioned attention modules.

`backbone_for(pipe_or_model)` returns the adapter (`headscope.backbones.base.Backbone`) of a
pipeline's denoiser (`pipe.unet` or `pipe.transformer`) or of a denoiser itself:
  unet  UNet2DConditionModel (SD 1.x / 2.x / XL)   cross-attention modules     backbones/unet.py
  sd3   SD3Transformer2DModel (SD3 / SD3.5)         joint blocks [image; text]  backbones/sd3.py
  flux  FluxTransformer2DModel (Flux.1)             double + single [text; image]  backbones/flux.py
Anything else raises one HeadscopeError naming the supported families.
"""
from __future__ import annotations

from headscope.backbones.base import Backbone, DenoiserCall, TextSlot
from headscope.errors import HeadscopeError

__all__ = ["Backbone", "DenoiserCall", "TextSlot", "backbone_for", "families", "model_class_for_config", "require_unet"]


def _adapters() -> list[type[Backbone]]:
    from headscope.backbones.flux import FluxBackbone
    from headscope.backbones.sd3 import SD3Backbone
    from headscope.backbones.unet import UNetBackbone

    return [UNetBackbone, SD3Backbone, FluxBackbone]


def families() -> str:
    """The supported families in words, for messages."""
    return "; ".join(adapter.description for adapter in _adapters())


def denoiser_of(pipe_or_model):
    """The denoiser module: `pipe.unet`, `pipe.transformer`, or the object itself when it is neither a pipeline."""
    for attribute in ("unet", "transformer"):
        module = getattr(pipe_or_model, attribute, None)
        if module is not None:
            return module
    return pipe_or_model


def backbone_for(pipe_or_model) -> Backbone:
    """The adapter of a pipeline's (or a bare) denoiser; HeadscopeError naming the supported families otherwise."""
    model = denoiser_of(pipe_or_model)
    for adapter in _adapters():
        if adapter.accepts(model):
            return adapter(model)
    what = type(pipe_or_model).__name__
    inner = f" (its denoiser is a {type(model).__name__})" if model is not pipe_or_model else ""
    raise HeadscopeError(f"headscope does not know the model family of {what}{inner}; supported: {families()}")


def model_class_for_config(config: dict):
    """The diffusers model class a denoiser config names in `_class_name` (UNet2DConditionModel when absent)."""
    import diffusers

    name = dict(config).get("_class_name", "UNet2DConditionModel")
    known = {"UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel"}
    if name not in known:
        raise HeadscopeError(f"headscope does not know the model family of a {name} config; supported: {families()}")
    return getattr(diffusers, name)


def require_unet(pipe, feature: str) -> None:
    """HeadscopeError unless `pipe` is a UNet pipeline: `feature` (e.g. prompt-to-prompt editing, which
    edits cross- and self-attention maps) is built on cross-attention for now; joint-attention models
    (SD3, Flux) trace, map words and steer by heads already."""
    backbone = backbone_for(pipe)
    if backbone.family != "unet":
        raise HeadscopeError(f"{feature} run on UNet models (SD 1.x / 2.x / XL) for now; this model is a "
                             f"{backbone.description}: trace it and draw word maps with `headscope daam`")
