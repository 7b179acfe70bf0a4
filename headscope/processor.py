"""The headscope attention processor and its hook protocol.

One `HeadProcessor` sits on each cross-attention module of a UNet (joint-attention layers of SD3 and
Flux get the processors of `headscope.joint`, which speak the same protocol, see there). It computes attention exactly as diffusers'
`AttnProcessor2_0` does (same ops, same order: outputs are bitwise identical while no hook edits
anything) and lets hooks look and steer:

Readers — `Hook.wants_probs(ctx)` returns True and `Hook.read(ctx, probs)` receives
    probs `[rows, heads, query, key]` (float32, post-softmax, the batch rows named by `hook.rows`,
    listed in `ctx.rows`). They are computed next to the fused attention only when some reader
    asks, and only for the rows asked for.
Writers, cheap — `Hook.value_factors(ctx)` returns factors `[batch or 1, heads, key]` (or None).
    The processor multiplies each head's value vector of each key token by its factor inside fused
    `F.scaled_dot_product_attention`: sum_k p[q,k] * (w[k] * v[k]) == sum_k (w[k] * p[q,k]) * v[k],
    i.e. exactly scaling post-softmax maps (no renormalisation), without materialising them.
    Factors of several hooks multiply.
Writers, pixel-dependent — `Hook.edits_probs(ctx)` returns True and `Hook.edit_probs(ctx, probs)`
    returns new probs `[batch, heads, query, key]`; then probabilities are materialised for this
    call and the output is `edited_probs @ (factors * values)`.

Query readers — `Hook.wants_query(ctx)` returns True and `Hook.read_query(ctx, query)` receives the
    layer's projected queries `[rows, heads, query, head_dim]` (the rows named by `hook.rows`, after
    `attn.norm_q`, the dtype the layer computes in), before attention. Cheap: nothing is computed for
    them; HRV concept votes score their own keys against these queries.

Joint attention (SD3, Flux): readers receive the image-query x text-key block `[rows, heads, L_img,
    L_txt]`, normalised over all keys (image and text) as the model normalises it; value factors
    `[batch or 1, heads, L_txt]` scale the text keys' values for image queries; query readers get the
    image queries; `ctx.text_keys` says where the text keys sit in the joint sequence. Joint readers
    (`Hook.wants_joint` / `Hook.read_joint`) get the call's image queries, keys, values and attention
    outputs (`headscope.joint.JointTensors`), which the concept stream (`headscope.stream`) needs.

Readers see the weights the layer actually applied: after edits, times value factors.
Hooks run in the order given. `ctx` is a `HookContext`: layer, pipeline call, denoising step,
batch layout (which rows are conditional and which image they belong to), latent, query and key size.

Self-attention (opt-in) — self-attention modules keep diffusers' processor unless a caller installs
`headscope.backbones.unet.SelfAttentionProcessor`s with `self_attention_processors(unet, hooks)` (prompt-to-prompt editing
does). Their hooks are the same `Hooks`; `Hook.self_attention(ctx, query, key)` sees the layer's
queries and keys `[batch, heads, tokens, head_dim]` and may return replacements: the layer then
attends with softmax(q' k'^T) over its own values, in fused SDPA (no map materialised). Readers and
writers of cross-attention are never called from self-attention layers.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

from headscope.heads import LayerInfo, query_grid

ROW_KINDS = ("cond", "uncond", "all")


@dataclass(frozen=True)
class BatchLayout:
    """Which denoiser batch row belongs to which image, and which rows are conditional.

    diffusers' SD / SDXL / SD3 pipelines with classifier-free guidance run `torch.cat([uncond, cond])`:
    rows 0..n-1 are the unconditional (negative-prompt) rows of images 0..n-1 and rows n..2n-1 their
    conditional rows. Without guidance all n rows are conditional. Images are prompt-major: image i
    belongs to prompt i // images_per_prompt.

    `part` is set when guidance runs the denoiser once per kind instead (Flux with `true_cfg_scale`:
    a conditional call, then a negative-prompt call, each of n rows): every row of this forward is of
    kind `part`, and `cfg` still says that the run has unconditional rows.
    """

    n_images: int
    cfg: bool
    images_per_prompt: int = 1
    part: str | None = None

    @property
    def n_rows(self) -> int:
        return 2 * self.n_images if self.cfg and self.part is None else self.n_images

    def rows(self, kind: str) -> tuple[int, ...]:
        """Batch rows of one kind ("cond", "uncond" or "all"), ordered by image."""
        if self.part is not None:
            return tuple(range(self.n_images)) if kind in (self.part, "all") else ()
        offset = self.n_images if self.cfg else 0
        if kind == "cond":
            return tuple(range(offset, offset + self.n_images))
        if kind == "uncond":
            return tuple(range(self.n_images)) if self.cfg else ()
        return tuple(range(self.n_rows))

    def kind(self, row: int) -> str:
        """"cond" or "uncond"."""
        if self.part is not None:
            return self.part
        return "uncond" if self.cfg and row < self.n_images else "cond"

    def image(self, row: int) -> int:
        """Index of the image a batch row belongs to."""
        return row % self.n_images

    def prompt_index(self, image: int) -> int:
        return image // self.images_per_prompt


@dataclass
class RunState:
    """What the trace knows about the current denoiser forward; updated by a forward pre-hook.

    `n_text` is the text length of a joint sequence (Flux's single-stream blocks get no separate
    text input); `recording` is False during a pass that is no step (SD3 skip-layer guidance).
    """

    call: int = -1
    step: int = -1
    n_steps: int | None = None
    layout: BatchLayout | None = None
    latent_hw: tuple[int, int] | None = None
    n_text: int | None = None
    recording: bool = True


@dataclass(frozen=True)
class HookContext:
    """What a hook is told about one attention call.

    Attributes:
        layer: the layer (execution index, name, heads, level...).
        call: index of the pipeline call within the trace.
        step: denoising step (UNet forward) within the call, from 0.
        n_steps: number of denoising steps of the call, when the pipeline says.
        layout: batch row layout.
        latent_hw: latent (h, w) of the UNet input.
        query_hw: (h, w) of this layer's query grid; query index = y * w + x.
        rows: batch rows covered by the tensor handed over with this context.
        n_keys: number of text keys (all keys of cross-attention; the text part of a joint sequence).
        text_keys: joint layers: where the text keys sit in the joint sequence (SD3 [image; text],
            Flux [text; image]); probs and value factors cover exactly these. None for cross-attention.
    """

    layer: LayerInfo
    call: int
    step: int
    n_steps: int | None
    layout: BatchLayout
    latent_hw: tuple[int, int]
    query_hw: tuple[int, int]
    rows: tuple[int, ...]
    n_keys: int | None = None
    text_keys: slice | None = None


class Hook:
    """Base class of readers and writers; override what you need (see the module docstring).

    Attributes:
        rows: which batch rows `read` receives: "cond" (default), "uncond" or "all".
    """

    rows: str = "cond"

    def start_call(self, state: RunState) -> None:
        """A new pipeline call begins (before its first UNet forward)."""

    def wants_probs(self, ctx: HookContext) -> bool:
        return False

    def read(self, ctx: HookContext, probs: torch.Tensor) -> None:
        """probs: [len(ctx.rows), heads, query, key], float32."""

    def wants_query(self, ctx: HookContext) -> bool:
        return False

    def read_query(self, ctx: HookContext, query: torch.Tensor) -> None:
        """query: [len(ctx.rows), heads, n_query, head_dim], the layer's projected queries."""

    def wants_joint(self, ctx: HookContext) -> bool:
        return False

    def read_joint(self, ctx: HookContext, tensors) -> None:
        """Joint-attention layers only: the call's image side, `headscope.joint.JointTensors` (all rows)."""

    def value_factors(self, ctx: HookContext) -> torch.Tensor | None:
        """Per-head, per-key factors on post-softmax maps: [batch or 1, heads, key], or None."""
        return None

    def edits_probs(self, ctx: HookContext) -> bool:
        return False

    def edit_probs(self, ctx: HookContext, probs: torch.Tensor) -> torch.Tensor:
        """probs: [batch, heads, query, key] float32 -> edited probs, same shape."""
        return probs

    def self_attention(self, ctx: HookContext, query: torch.Tensor,
                       key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Self-attention layers only: query, key [batch, heads, tokens, head_dim] -> replacements or None."""
        return None


@dataclass
class Hooks:
    """The hooks of one trace, in order, and the run state they share with every processor."""

    items: list[Hook] = field(default_factory=list)
    state: RunState = field(default_factory=RunState)


class HeadProcessor:
    """Attention processor for one cross-attention layer: AttnProcessor2_0's maths plus hooks.

    Its state is the layer it serves and the trace's `Hooks` (hook list + shared run state).
    """

    is_cross = True  # cross-attention readers and writers are called; False on SelfAttentionProcessor

    def __init__(self, layer: LayerInfo, hooks: Hooks):
        self.layer = layer
        self.hooks = hooks
        self._grids: dict[tuple, tuple[int, int]] = {}  # (latent hw, n_query) -> query hw
        self._at: dict[tuple[int, int], LayerInfo] = {}  # query hw -> the layer at that resolution

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        grid_hw = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            grid_hw = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        query, key, value, attention_mask = _project(attn, hidden_states, encoder_hidden_states, attention_mask)
        batch_size, heads, n_query, head_dim = query.shape
        ctx = self._context(grid_hw or self._query_hw(n_query), batch_size, key.shape[2])
        if self.is_cross:
            _hand_out_queries(self.hooks.items, ctx, query)

        attended = self._attend(attn, query, key, value, attention_mask, ctx)  # [batch, heads, query, head_dim]
        hidden_states = attended.transpose(1, 2).reshape(batch_size, -1, heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _attend(self, attn, query, key, value, attention_mask, ctx: HookContext) -> torch.Tensor:
        """Attention output [batch, heads, query, head_dim] with the hooks applied."""
        hooks = self.hooks.items
        factors = _combined_factors((hook.value_factors(ctx) for hook in hooks), value.device)  # [batch|1, heads, key]
        if factors is not None:
            # Elementwise ops keep the input's memory layout, so SDPA sees the strides it sees without
            # steering (the projection's [batch, key, heads, dim] layout; a contiguous value can take
            # another kernel). tests/test_steer.py checks the strides.
            value = value * factors.to(value.dtype)[..., None]
        readers = [hook for hook in hooks if hook.wants_probs(ctx)]
        editors = [hook for hook in hooks if hook.edits_probs(ctx)]
        if editors:
            probs = attention_probs(attn, query, key, attention_mask)  # [batch, heads, query, key]
            for hook in editors:
                probs = hook.edit_probs(ctx, probs)
            attended = torch.matmul(probs.to(value.dtype), value)
            applied = probs if factors is None else probs * factors[:, :, None, :]
            _hand_out(readers, ctx, lambda rows: applied[list(rows)])
            return attended
        extra = {} if attn.scale_qk else {"scale": attn.scale}
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                                  dropout_p=0.0, is_causal=False, **extra)
        if readers:
            _hand_out(readers, ctx, lambda rows: _probs_for_rows(attn, query, key, attention_mask, factors, rows))
        return attended

    def _context(self, query_hw: tuple[int, int], batch_size: int, n_keys: int | None = None,
                 text_keys: slice | None = None) -> HookContext:
        state = self.hooks.state
        layout = state.layout or BatchLayout(n_images=batch_size, cfg=False)
        layer = self._at.get(query_hw)
        if layer is None:  # made once per resolution: a layer call costs no dataclass copy
            layer = self.layer if self.layer.resolution == query_hw else replace(self.layer, resolution=query_hw)
            self._at[query_hw] = layer
        return HookContext(layer=layer, call=state.call, step=state.step, n_steps=state.n_steps,
                           layout=layout, latent_hw=state.latent_hw or query_hw, query_hw=query_hw,
                           rows=tuple(range(batch_size)), n_keys=n_keys, text_keys=text_keys)

    def _query_hw(self, n_query: int) -> tuple[int, int]:
        """(h, w) of a flattened query grid of `n_query` positions (worked out once per latent size)."""
        key = (self.hooks.state.latent_hw, n_query)
        if key not in self._grids:
            self._grids[key] = query_grid(n_query, self.layer.level, self.hooks.state.latent_hw)
        return self._grids[key]


def attention_probs(attn, query: torch.Tensor, key: torch.Tensor,
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(query key^T * attn.scale + mask) in float32.

    query: [batch, heads, query, head_dim]; key: [batch, heads, key, head_dim];
    attention_mask: additive float or boolean (True = keep), broadcastable to the scores.
    Returns probs [batch, heads, query, key].
    """
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * attn.scale
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, float("-inf"))
        else:
            scores = scores + attention_mask.float()
    return scores.softmax(dim=-1)


def _project(attn, hidden_states, encoder_hidden_states, attention_mask):
    """q, k, v [batch, heads, tokens, head_dim] and the SDPA-shaped mask, as AttnProcessor2_0 makes them."""
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    head_dim = key.shape[-1] // attn.heads
    # [batch, tokens, heads * head_dim] -> [batch, heads, tokens, head_dim]
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, attention_mask


def _combined_factors(factor_list, device: torch.device) -> torch.Tensor | None:
    """Product of the writers' factors [batch|1, heads, key] in float32, or None when no writer returned any."""
    combined = None
    for factors in factor_list:
        if factors is not None:
            if factors.device != device or factors.dtype != torch.float32:
                factors = factors.to(device=device, dtype=torch.float32)
            combined = factors if combined is None else combined * factors
    return combined


def _pick_rows(tensor: torch.Tensor | None, rows: tuple[int, ...]) -> torch.Tensor | None:
    if tensor is None or tensor.shape[0] == 1:
        return tensor
    return tensor[list(rows)]


def _probs_for_rows(attn, query, key, attention_mask, factors, rows) -> torch.Tensor:
    """Applied attention weights [len(rows), heads, query, key] for some batch rows only."""
    probs = attention_probs(attn, query[list(rows)], key[list(rows)], _pick_rows(attention_mask, rows))
    if factors is not None:
        probs = probs * _pick_rows(factors, rows)[:, :, None, :]
    return probs


def _hand_out(readers: list[Hook], ctx: HookContext, probs_for) -> None:
    """Compute probabilities once for the union of the rows the readers want; give each its rows."""
    wanted = sorted({row for hook in readers for row in ctx.layout.rows(hook.rows)})
    if not wanted:
        return
    probs = probs_for(tuple(wanted))  # [len(wanted), heads, query, key]
    for hook in readers:
        rows = ctx.layout.rows(hook.rows)
        if rows:
            picked = probs if list(rows) == wanted else probs[[wanted.index(row) for row in rows]]
            hook.read(replace(ctx, rows=rows), picked)


def _hand_out_queries(hooks: list[Hook], ctx: HookContext, query: torch.Tensor) -> None:
    """Give each query reader the queries [rows, heads, query, head_dim] of the rows it asked for."""
    for hook in hooks:
        if hook.wants_query(ctx):
            rows = ctx.layout.rows(hook.rows)
            if rows:
                hook.read_query(replace(ctx, rows=rows), query[row_index(rows)])


def row_index(rows) -> slice | list[int]:
    """A slice (a view, no copy) when the rows are consecutive, as the conditional rows are; else a list."""
    rows = list(rows)
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return rows
