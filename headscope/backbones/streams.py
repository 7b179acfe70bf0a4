"""Extra text tokens through a joint block: each family's text-stream maths, for the concept stream.

The concept stream (`headscope.stream`) carries tokens beside the prompt through every block of an SD3
or Flux transformer, with the block's own text-stream weights, and one-way attention: the concept
queries attend to [image keys; concept keys], and no image or prompt token attends to them, so the
image is untouched. One function per kind of block; each takes

    block        the diffusers block module (`JointTransformerBlock`, `FluxTransformerBlock`,
                 `FluxSingleTransformerBlock`)
    states       [rows, tokens, dim] the concept tokens' hidden states entering the block
    temb         [rows, dim] the block's conditioning embedding (timestep, pooled text; Flux: guidance)
    image        the block's image keys and values for the same rows (`ImageSide`; rows may come from
                 several denoiser forwards carried side by side, each attending to its own image)

and returns a `BlockStep`: the concept keys, the concept attention output before the output
projection (both [rows, heads, tokens, head_dim]) and the states leaving the block (None after SD3's
last, `context_pre_only` block, whose text outputs the model drops). With `carry=False` (the last
block, when no reader wants the outputs) only the keys are computed: output and states are None.
`key_mask` ([rows, tokens] bool, False on padding) hides concept tokens from every concept query,
for rows that carry fewer real tokens than the stream holds; None (the default) hides none and
leaves the attention call exactly as without it. `modulation` ([rows, k * dim]) is the output of the
block's adaptive norm's own `linear` for these rows, captured while the block ran on the prompt
(`MODULATED` names that norm): given it, the concept tokens reuse it instead of computing the same
linear of temb again, which at Flux width is a third of the weights the concept path reads.

Flux applies RoPE after joining text and image; its text ids are all zeros (`FluxPipeline` builds
`txt_ids` as zeros), and at position 0 the rotation is the identity (cos 0 = 1, sin 0 = 0), so concept
tokens, at position 0 like the prompt's, get none: their queries and keys are the projections after
the k / q norms, exactly what RoPE would hand back.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode


@dataclass(frozen=True)
class BlockStep:
    """concept_key, concept_output: [rows, heads, tokens, head_dim]; states: [rows, tokens, dim] or None."""

    concept_key: torch.Tensor
    concept_output: torch.Tensor | None
    states: torch.Tensor | None


MODULATED = {("sd3", "joint"): "norm1_context", ("flux", "joint"): "norm1_context", ("flux", "single"): "norm"}
"""The adaptive norm, per kind of block, whose modulation (`norm.linear`'s output) the concept tokens share."""


class FewRowsLinear(TorchFunctionMode):
    """`F.linear(x, W, b)` of few rows and a wide weight computed as (W @ x^T + b)^T, on a CPU in float32.

    The concept tokens are a few dozen rows against the model's weights (Flux-dev: 3072 x 12288). On this
    project's CPU (torch's MKL sgemm, AVX2, 2 threads) W @ x^T takes 0.45-0.80 of x @ W^T's time from 34
    to 136 rows at SD3-medium's and Flux-dev's widths (0.97 for two of SD3's at 136), 0.97-1.08 of it at
    340 rows and 1.02-1.64 at the shapes world's width of 128 (`benchmarks/few_rows_linear.py`, whose
    table sets MAX_ROWS and MIN_WEIGHT). From 34 rows on the two results were equal bit for bit there.
    The result is a view of its transpose, which the MLP's next linear then reads as a contiguous
    right-hand side. The mode is entered around a block's concept-stream step (`few_rows_matmuls`),
    which is off the image's path.
    """

    MAX_ROWS = 256
    MIN_WEIGHT = 2**20  # elements: 1024 x 1024

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if (weight.numel() >= self.MIN_WEIGHT and x.dim() >= 2 and x.numel() <= self.MAX_ROWS * x.shape[-1]
                    and x.dtype == weight.dtype == torch.float32 and x.device.type == weight.device.type == "cpu"):
                flat = x.reshape(-1, x.shape[-1]).t()  # [in, rows]
                out = torch.mm(weight, flat) if bias is None else torch.addmm(bias[:, None], weight, flat)
                return out.t().reshape(*x.shape[:-1], weight.shape[0])
        return func(*args, **kwargs)


def few_rows_matmuls(step):
    """A block step whose linears run as `FewRowsLinear` when its states (the concept tokens) are few rows of a
    wide model on a CPU in float32; the plain calls otherwise (no mode entered: nothing added per op)."""
    @functools.wraps(step)
    def run(block, states, *args, **kwargs):
        wide = states.shape[-1] ** 2 >= FewRowsLinear.MIN_WEIGHT and states.dtype == torch.float32
        few = states.numel() <= FewRowsLinear.MAX_ROWS * states.shape[-1] and states.device.type == "cpu"
        with FewRowsLinear() if wide and few else contextlib.nullcontext():
            return step(block, states, *args, **kwargs)
    return run


def step_for(family: str, kind: str):
    """The block function of a layer: SD3 joint, Flux double-stream ("joint") or single-stream ("single")."""
    return {("sd3", "joint"): sd3_joint_step, ("flux", "joint"): flux_double_step,
            ("flux", "single"): flux_single_step}[(family, kind)]


def _heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """[rows, tokens, heads * head_dim] -> [rows, heads, tokens, head_dim]."""
    return tensor.unflatten(-1, (heads, -1)).transpose(1, 2)


@dataclass(frozen=True)
class ImageSide:
    """The image keys and values a block's concept queries attend to beside their own (same rows).

    key, value: [rows, heads, L_img, head_dim] (`length` None: views of the block's own tensors, attended to
    beside the concept keys in two parts, with no copy; `_two_part_attention`), or
    buffers [rows, heads, length + room, head_dim] whose first `length` tokens are the image: the concept
    keys and values are then written into the room after them and the attention reads the buffers in
    place (the concept stream's arena, `headscope.stream`, which copied the image there while it was hot).
    """

    key: torch.Tensor
    value: torch.Tensor
    length: int | None = None

    def joined(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[image; concept] keys and values: [rows, heads, L_img + tokens, head_dim]."""
        if self.length is None:
            return torch.cat([self.key, key], dim=2), torch.cat([self.value, value], dim=2)
        stop = self.length + key.shape[2]
        if stop > self.key.shape[2]:
            raise ValueError(f"{key.shape[2]} concept tokens do not fit the room of {self.key.shape[2] - self.length}")
        self.key[:, :, self.length:stop] = key
        self.value[:, :, self.length:stop] = value
        return self.key[:, :, :stop], self.value[:, :, :stop]


def _one_way_attention(query, key, value, image: ImageSide, key_mask=None) -> torch.Tensor:
    """Concept queries over [image keys; concept keys] and their values: [rows, heads, tokens, head_dim].

    Softmax attention written out (scaled scores, softmax over keys, weighted values), which is what the
    blocks' SDPA computes: with a handful of concept queries against hundreds of keys, two batched matmuls
    cost less than SDPA's blocked kernel on a CPU (this attention is off the image's path, so a user's
    flash / sage backend has nothing to do here). key_mask: [rows, tokens] bool, False on concept keys no
    query may see; image keys stay visible, so a padded query still has keys to attend to.
    """
    if image.length is None:
        return _two_part_attention(query, key, value, image, key_mask)
    keys, values = image.joined(key, value)
    scores = torch.matmul(query * query.shape[-1] ** -0.5, keys.transpose(-1, -2))  # [rows, heads, tokens, keys]
    if key_mask is not None:  # the concept part of the scores, [rows, heads, tokens, tokens]
        scores[..., keys.shape[2] - key.shape[2]:].masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    return torch.matmul(scores.softmax(dim=-1, dtype=torch.float32).to(values.dtype), values)  # half: softmax in fp32


def _two_part_attention(query, key, value, image: ImageSide, key_mask=None) -> torch.Tensor:
    """`_one_way_attention` over image keys that are views of the block's own tensors (carried block by block, at
    real width): the image part and the concept part of the scores each exponentiated against their common
    maximum, one normaliser, and the two weighted sums of values added, in place of joining the keys and values
    by a copy (SD3-medium at 1024 px: 50 MB a block, faulted in fresh, which took most of the attention's time)."""
    query = query * query.shape[-1] ** -0.5
    image_scores = torch.matmul(query, image.key.transpose(-1, -2)).float()  # [rows, heads, tokens, L_img]
    concept_scores = torch.matmul(query, key.transpose(-1, -2)).float()  # [rows, heads, tokens, tokens]
    if key_mask is not None:
        concept_scores.masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    top = torch.maximum(image_scores.amax(dim=-1, keepdim=True), concept_scores.amax(dim=-1, keepdim=True))
    image_weights, concept_weights = image_scores.sub_(top).exp_(), concept_scores.sub_(top).exp_()
    total = image_weights.sum(dim=-1, keepdim=True) + concept_weights.sum(dim=-1, keepdim=True)
    if value.dtype == torch.float32:
        return torch.matmul(image_weights, image.value).add_(torch.matmul(concept_weights, value)).div_(total)
    image_weights, concept_weights = (image_weights / total).to(value.dtype), (concept_weights / total).to(value.dtype)
    return torch.matmul(image_weights, image.value) + torch.matmul(concept_weights, value)  # half: weights in fp32


def adaptive_norm(norm, states, temb, modulation=None):
    """`norm(states, temb)` for diffusers' AdaLayerNormZero (-> normed, gate_msa, shift_mlp, scale_mlp,
    gate_mlp), AdaLayerNormZeroSingle (-> normed, gate) and AdaLayerNormContinuous (-> normed); with
    `modulation` [rows, k * dim], the module's own `linear(silu(temb))` already computed, the same maths
    on it (any other norm, or one with its own embedding, is called as it is)."""
    kind = type(norm).__name__
    if modulation is None or getattr(norm, "emb", None) is not None or kind not in _CHUNKS:
        return norm(states, temb) if kind == "AdaLayerNormContinuous" else norm(states, emb=temb)
    parts = modulation.chunk(_CHUNKS[kind], dim=1)
    if kind == "AdaLayerNormContinuous":
        scale, shift = parts
        return norm.norm(states) * (1 + scale)[:, None, :] + shift[:, None, :]
    shift, scale, *rest = parts
    return (norm.norm(states) * (1 + scale[:, None]) + shift[:, None], *rest)


_CHUNKS = {"AdaLayerNormZero": 6, "AdaLayerNormZeroSingle": 3, "AdaLayerNormContinuous": 2}


@few_rows_matmuls
def sd3_joint_step(block, states, temb, image: ImageSide, carry: bool = True, key_mask=None,
                   modulation=None) -> BlockStep:
    """JointTransformerBlock's context path (norm1_context, add_q/k/v_proj + added norms, to_add_out, gates,
    norm2_context, ff_context), with the concept tokens as the context."""
    attn = block.attn
    if block.context_pre_only:
        normed = adaptive_norm(block.norm1_context, states, temb, modulation)
    else:
        normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaptive_norm(block.norm1_context, states, temb,
                                                                          modulation)
    key = _heads(attn.add_k_proj(normed), attn.heads)
    if attn.norm_added_k is not None:
        key = attn.norm_added_k(key)
    if not carry:
        return BlockStep(key, None, None)
    query = _heads(attn.add_q_proj(normed), attn.heads)
    value = _heads(attn.add_v_proj(normed), attn.heads)
    if attn.norm_added_q is not None:
        query = attn.norm_added_q(query)
    output = _one_way_attention(query, key, value, image, key_mask).to(query.dtype)
    if block.context_pre_only:
        return BlockStep(key, output, None)
    states = states + gate_msa.unsqueeze(1) * attn.to_add_out(output.transpose(1, 2).flatten(2))
    normed = block.norm2_context(states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    states = states + gate_mlp.unsqueeze(1) * block.ff_context(normed)
    return BlockStep(key, output, states)


def _added_projections(attn, normed):
    """Flux's text-stream q, k, v of `normed` [rows, tokens, dim] (fused or not), each [rows, tokens, inner]."""
    if getattr(attn, "fused_projections", False) and hasattr(attn, "to_added_qkv"):
        return attn.to_added_qkv(normed).chunk(3, dim=-1)
    return attn.add_q_proj(normed), attn.add_k_proj(normed), attn.add_v_proj(normed)


def _shared_projections(attn, normed):
    """A single-stream block's q, k, v (one projection for text and image), each [rows, tokens, inner]."""
    if getattr(attn, "fused_projections", False):
        return attn.to_qkv(normed).chunk(3, dim=-1)
    return attn.to_q(normed), attn.to_k(normed), attn.to_v(normed)


@few_rows_matmuls
def flux_double_step(block, states, temb, image: ImageSide, carry: bool = True, key_mask=None,
                     modulation=None) -> BlockStep:
    """FluxTransformerBlock's text path (norm1_context, added projections + norms, to_add_out, gates,
    norm2_context, ff_context) with the concept tokens as the text."""
    attn = block.attn
    normed, gate_msa, shift_mlp, scale_mlp, gate_mlp = adaptive_norm(block.norm1_context, states, temb, modulation)
    if not carry and not getattr(attn, "fused_projections", False):
        return BlockStep(attn.norm_added_k(_heads(attn.add_k_proj(normed), attn.heads)), None, None)
    query, key, value = (_heads(part, attn.heads) for part in _added_projections(attn, normed))
    # The norms act on the last dimension, so the heads-first layout gives what [rows, tokens, heads, d] gives.
    query, key = attn.norm_added_q(query), attn.norm_added_k(key)
    if not carry:
        return BlockStep(key, None, None)
    output = _one_way_attention(query, key, value, image, key_mask).to(query.dtype)
    states = states + gate_msa.unsqueeze(1) * attn.to_add_out(output.transpose(1, 2).flatten(2))
    normed = block.norm2_context(states) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    states = states + gate_mlp.unsqueeze(1) * block.ff_context(normed)
    if states.dtype == torch.float16:
        states = states.clip(-65504, 65504)
    return BlockStep(key, output, states)


@few_rows_matmuls
def flux_single_step(block, states, temb, image: ImageSide, carry: bool = True, key_mask=None,
                     modulation=None) -> BlockStep:
    """FluxSingleTransformerBlock on the concept tokens: adaptive norm, the shared projections + norms and
    the MLP branch side by side, proj_out of both, gate, residual."""
    attn = block.attn
    normed, gate = adaptive_norm(block.norm, states, temb, modulation)
    if not carry and not getattr(attn, "fused_projections", False):
        return BlockStep(attn.norm_k(_heads(attn.to_k(normed), attn.heads)), None, None)
    query, key, value = (_heads(part, attn.heads) for part in _shared_projections(attn, normed))
    query, key = attn.norm_q(query), attn.norm_k(key)
    if not carry:
        return BlockStep(key, None, None)
    mlp = block.act_mlp(block.proj_mlp(normed))
    output = _one_way_attention(query, key, value, image, key_mask).to(query.dtype)
    joined = torch.cat([output.transpose(1, 2).flatten(2), mlp], dim=2)
    states = states + gate.unsqueeze(1) * block.proj_out(joined)
    if states.dtype == torch.float16:
        states = states.clip(-65504, 65504)
    return BlockStep(key, output, states)
