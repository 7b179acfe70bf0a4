"""Joint attention (SD3, Flux): the hook protocol on a joint sequence, and memory-bounded word maps.

A joint-attention layer attends over one sequence of image and text tokens (SD3 [image; text],
Flux [text; image]). What a head's word map means there is the image-query x text-key block of that
attention, normalised as the model normalises it: a softmax over *all* keys, image and text. The
processors of `headscope.backbones.sd3` / `.flux` reproduce diffusers' own maths op for op (outputs
bitwise identical while no hook edits) and hand the hooks of `headscope.processor` what they expect:

  readers        probs `[rows, heads, L_img, L_txt]` (float32), computed by `text_key_probs`
  value factors  `[batch or 1, heads, L_txt]`: the text keys' values are scaled for the image queries
                 only (text queries keep the plain values), so the image-query maps are scaled
                 exactly as on a UNet, inside the model's own fused attention call. That call is
                 split by queries (image rows with scaled values, text rows with plain ones): the
                 same products as one call, plus a copy of the values and of the output. All-ones
                 factors skip the split (the plain call, bitwise).
  query readers  the image queries `[rows, heads, L_img, head_dim]` (after q-norm, and RoPE on Flux)
  joint readers  the image side of the call as a `JointTensors` (queries, keys, values and attention
                 outputs before the output projection, all batch rows, views): what a stream of extra
                 tokens beside the image needs (`headscope.stream`, concept tokens)
  probability editors: not on joint layers yet (HeadscopeError).

Memory: the full joint matrix is heads x (L_img + L_txt)^2 per call (Flux-dev at 1024^2: 24 x 4608^2
floats, about 2 GB). `text_key_probs` never builds it: it walks the image queries in chunks so that
at most `budget` bytes of logits and their softmax (default `MAP_BUDGET_BYTES`, read at call time, so
setting `headscope.joint.MAP_BUDGET_BYTES` changes it) exist at once, and keeps of each chunk only the
text columns: exp(logit - logsumexp over all keys of the row), which is what a softmax over the chunk's
rows computes in one fused pass. Its output is rows x heads x L_img x L_txt floats.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from headscope.errors import HeadscopeError
from headscope.processor import HeadProcessor, HookContext, _combined_factors, _hand_out, _hand_out_queries

MAP_BUDGET_BYTES = 64 * 2**20


@dataclass(frozen=True)
class JointSequence:
    """Where image and text tokens sit in one joint-attention call."""

    n_image: int
    n_text: int
    text_first: bool

    @property
    def image(self) -> slice:
        start = self.n_text if self.text_first else 0
        return slice(start, start + self.n_image)

    @property
    def text(self) -> slice:
        start = 0 if self.text_first else self.n_image
        return slice(start, start + self.n_text)


@dataclass(frozen=True)
class JointTensors:
    """The image side of one joint-attention call, every batch row, heads first (views, never copies).

    query, key, value: [batch, heads, L_img, head_dim] after the q / k norms (and RoPE on Flux).
    output: [batch, heads, L_img, head_dim], the image queries' attention output before the output
        projection (after any value-factor steering: what the layer passes on).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    output: torch.Tensor


def text_key_probs(query: torch.Tensor, key: torch.Tensor, text: slice, scale: float,
                   budget: int | None = None) -> torch.Tensor:
    """Softmax over all keys of each image query, text columns only, in chunks of image queries.

    Args:
        query: image queries [rows, heads, L_img, head_dim].
        key: every key of the joint sequence [rows, heads, L_img + L_txt, head_dim].
        text: where the text keys sit among the keys.
        scale: the attention's logit scale (1 / sqrt(head_dim) for SD3 and Flux).
        budget: bytes of float32 logits and softmax allowed at once; default `MAP_BUDGET_BYTES`.
    Returns:
        probs [rows, heads, L_img, L_txt], float32: exp(q.k_txt * scale - logsumexp_all_keys(q.k * scale)).
    """
    budget = MAP_BUDGET_BYTES if budget is None else budget
    rows, heads, n_query, _ = query.shape
    keys_t = key.float().transpose(-1, -2)  # [rows, heads, head_dim, keys]
    # A chunk holds its logits and their softmax: two floats per (row, head, query, key).
    chunk = max(1, min(n_query, budget // (2 * rows * heads * key.shape[2] * 4)))
    probs = torch.empty((rows, heads, n_query, text.stop - text.start), dtype=torch.float32, device=query.device)
    for start in range(0, n_query, chunk):
        # Scaling the queries costs head_dim, not L_img + L_txt, multiplies per row.
        logits = torch.matmul(query[:, :, start:start + chunk].float() * scale, keys_t)  # [rows, heads, chunk, keys]
        probs[:, :, start:start + chunk] = torch.softmax(logits, dim=-1)[..., text]
    return probs


def renormalised_over_text(probs: torch.Tensor) -> torch.Tensor:
    """The text-key block [..., L_txt] divided by its row sums: each image query's text attention sums to 1."""
    return probs / probs.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)


class JointProcessor(HeadProcessor):
    """Base of the joint-attention processors: the family's maths lives in the subclass's `__call__`,
    which calls `_attend_joint` where diffusers calls its attention function."""

    def _attend_joint(self, query, key, value, sequence: JointSequence, seq_dim: int, attention) -> torch.Tensor:
        """Attention output in the model's layout, hooks applied.

        query, key, value: the joint sequence along `seq_dim` (SD3 [batch, heads, tokens, head_dim],
        seq_dim 2; Flux [batch, tokens, heads, head_dim], seq_dim 1). `attention(q, k, v)` is the
        model's own attention call, used unchanged (so no hook means bitwise diffusers' output).
        """
        hooks = self.hooks.items
        if not hooks or not self.hooks.state.recording:
            return attention(query, key, value)
        ctx = self._context(self._query_hw(sequence.n_image), query.shape[0], sequence.n_text, sequence.text)
        image_queries = _heads_first(query.narrow(seq_dim, sequence.image.start, sequence.n_image), seq_dim)
        _hand_out_queries(hooks, ctx, image_queries)
        if any(hook.edits_probs(ctx) for hook in hooks):
            raise HeadscopeError(f"{ctx.layer.name}: probability editors do not run on joint-attention layers yet; "
                                 "value factors (Hook.value_factors) do")
        factors = _combined_factors((hook.value_factors(ctx) for hook in hooks), value.device)  # [b|1, heads, L_txt]
        if factors is not None and bool((factors == 1).all()):
            factors = None  # nothing to scale: the plain call, so all-ones steering is bitwise a no-op
        if factors is None:
            attended = attention(query, key, value)
        else:
            attended = _steered(query, key, value, sequence, seq_dim, attention, factors)
        joint_readers = [hook for hook in hooks if hook.wants_joint(ctx)]
        if joint_readers:
            image = (sequence.image.start, sequence.n_image)
            tensors = JointTensors(query=image_queries, key=_heads_first(key.narrow(seq_dim, *image), seq_dim),
                                   value=_heads_first(value.narrow(seq_dim, *image), seq_dim),
                                   output=_heads_first(attended.narrow(seq_dim, *image), seq_dim))
            for hook in joint_readers:
                hook.read_joint(ctx, tensors)
        readers = [hook for hook in hooks if hook.wants_probs(ctx)]
        if readers:
            keys = _heads_first(key, seq_dim)
            _hand_out(readers, ctx, lambda rows: self._probs(ctx, image_queries, keys, factors, rows))
        return attended

    def _probs(self, ctx: HookContext, image_queries, keys, factors, rows) -> torch.Tensor:
        """Applied weights of the image-query x text-key block for some rows: [len(rows), heads, L_img, L_txt]."""
        picked = _row_index(rows)
        probs = text_key_probs(image_queries[picked], keys[picked], ctx.text_keys, image_queries.shape[-1] ** -0.5)
        if factors is not None:
            probs = probs * (factors if factors.shape[0] == 1 else factors[picked])[:, :, None, :]
        return probs


def _row_index(rows) -> slice | list[int]:
    """A slice (a view, no copy) when the rows are consecutive, as the conditional rows are; else a list."""
    rows = list(rows)
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return rows


def _heads_first(tensor: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """A view [batch, heads, tokens, head_dim] of a tensor whose tokens lie along `seq_dim` (1 or 2)."""
    return tensor if seq_dim == 2 else tensor.transpose(1, 2)


def _steered(query, key, value, sequence: JointSequence, seq_dim: int, attention, factors) -> torch.Tensor:
    """Image queries attend over values whose text part is scaled by `factors` [b|1, heads, L_txt]; text
    queries over the plain values. Two calls of the model's attention, joined back in sequence order."""
    factors = factors.to(value.dtype)
    factors = factors[..., None] if seq_dim == 2 else factors.transpose(1, 2)[..., None]  # broadcast over head_dim
    text_values = value.narrow(seq_dim, sequence.text.start, sequence.n_text) * factors
    image_values = value.narrow(seq_dim, sequence.image.start, sequence.n_image)
    parts = (text_values, image_values) if sequence.text_first else (image_values, text_values)
    image_out = attention(query.narrow(seq_dim, sequence.image.start, sequence.n_image), key,
                          torch.cat(parts, dim=seq_dim))
    text_out = attention(query.narrow(seq_dim, sequence.text.start, sequence.n_text), key, value)
    return torch.cat((text_out, image_out) if sequence.text_first else (image_out, text_out), dim=seq_dim)
