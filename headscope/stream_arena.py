"""What the concept stream (`headscope.stream`) hands its readers (`ConceptBlock`, with the forward's
`TokenSelection`) and what it keeps between a block's run and its carry: each forward's place and states
(`Forward`), its blocks not carried yet (`Kept`), and the arena that holds their image side for carrying
a call's forwards side by side (`Arena`)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from headscope.backbones.streams import ImageSide
from headscope.joint import JointTensors
from headscope.processor import HookContext


@dataclass(frozen=True)
class TokenSelection:
    """The stream's tokens each row carries through one denoiser forward (a selecting reader's choice).

    index: [rows, T_sel] long, positions among the stream's tokens (see `ConceptStream.spans`).
    valid: [rows, T_sel] bool, False on padding slots (hidden from every concept query).
    """

    index: torch.Tensor
    valid: torch.Tensor


@dataclass(frozen=True)
class ConceptBlock:
    """What one joint block says about the carried concept tokens (conditional rows, heads first).

    image_query: [rows, heads, L_img, head_dim], the block's image queries (after q-norm; RoPE on Flux);
        None when no reader of the stream has `needs_queries`.
    image_output: [rows, heads, L_img, head_dim], their attention output before the output projection;
        None when no reader has `needs_outputs`.
    concept_key: [rows, heads, tokens, head_dim], the carried tokens' keys (text-stream projection, k-norm);
        tokens = every token of the stream, or T_sel, in `selection` order, when a reader selects.
    concept_output: [rows, heads, tokens, head_dim], their attention output before the output projection
        (None in the last block when no reader has `needs_outputs`: nothing comes after it).
    selection: which tokens each row carries in this forward; None when the stream carries all of them.
    The tensors are views, valid until the readers' `records_done()`: clone what you keep longer.
    """

    image_query: torch.Tensor | None
    image_output: torch.Tensor | None
    concept_key: torch.Tensor
    concept_output: torch.Tensor
    selection: TokenSelection | None = None


@dataclass(eq=False)
class Kept:
    """One block of one forward, not carried yet: its image side (views; None when copied into the arena)
    and the block's conditioning."""

    layer: int
    ctx: HookContext
    image: JointTensors | None
    temb: torch.Tensor  # [rows, dim]
    modulation: torch.Tensor | None  # [rows, k * dim], the block's text norm's own linear(silu(temb))


@dataclass(eq=False)
class Forward:
    """One denoiser forward of the stream: its conditional rows, its tokens, where its states stand."""

    rows: tuple[int, ...]
    selection: TokenSelection | None = None
    key_mask: torch.Tensor | None = None  # [rows, width] bool; None when nothing is padded
    width: int = 0  # tokens carried per row
    # The states of the batch it was last carried in and its rows there (first, stop); None before the first block.
    carried: tuple | None = None
    next_layer: int | None = None  # the next block to carry (None: no block has run yet)
    slot: int | None = None  # its place in the arena; None: carried block by block as it runs
    kept: list = field(default_factory=list)  # Kept, in block order

    def part(self, tensor: torch.Tensor | None, start: int, stop: int) -> torch.Tensor | None:
        """Its rows (start:stop) and tokens of a block's [rows, heads, tokens, head_dim] carried side by side:
        the tensor itself when that is all of it (no view to make)."""
        if tensor is None:
            return None
        if start != 0 or stop != tensor.shape[0]:
            tensor = tensor[start:stop]
        return tensor if self.width == tensor.shape[2] else tensor[:, :, :self.width]

    @property
    def states(self) -> torch.Tensor | None:
        """[rows, width, dim], its tokens' states entering `next_layer` (None before the first block)."""
        if self.carried is None or self.carried[0] is None:
            return None
        states, start, stop = self.carried
        return states[start:stop, :self.width]


class Arena:
    """Room for `slots` forwards' image side of every block, copied in while hot and reused call after call.

    key, value: per block whose concept tokens are carried on ([slots, rows, heads, L_img + room, head_dim];
    the concept keys and values go in the room after the image when the block is carried,
    `headscope.backbones.streams.ImageSide`), none for a last block that only gives keys; query, output:
    per block [slots, rows, heads, L_img, head_dim], only when a reader reads them (else None). When every
    block has the same heads, a block's queries are a view of one tensor [blocks, slots, ...], so the
    queries of many records lie evenly apart in memory and `stacked` joins them without a copy.
    """

    def __init__(self, spec: tuple):
        self.spec = spec
        shapes, kv_layers, self.slots, rows, self.length, room, dtype, device, queries, outputs = spec

        def room_for(extra, layers):
            if len({shapes[layer] for layer in layers}) == 1:  # one tensor, a view per block
                heads, head_dim = shapes[layers[0]]
                whole = torch.empty(len(layers), self.slots, rows, heads, self.length + extra, head_dim, dtype=dtype,
                                    device=device)
                return {layer: whole[number] for number, layer in enumerate(layers)}
            return {layer: torch.empty(self.slots, rows, shapes[layer][0], self.length + extra, shapes[layer][1],
                                       dtype=dtype, device=device) for layer in layers}
        self.key, self.value = room_for(room, kv_layers), room_for(room, kv_layers)
        self.query = room_for(0, list(shapes)) if queries else None
        self.output = room_for(0, list(shapes)) if outputs else None
        # Per block and slot, where each field of a JointTensors goes: views made once, so a put only copies.
        self._into = {layer: [[] for _ in range(self.slots)] for layer in shapes}
        for name in ("key", "value", "query", "output"):
            for layer, whole in (getattr(self, name) or {}).items():
                for slot, views in enumerate(self._into[layer]):
                    views.append((name, whole[slot, :, :, :self.length] if name in ("key", "value") else whole[slot]))

    @classmethod
    def plan(cls, shapes: dict, n_steps: int, rows: int, key: torch.Tensor, room: int, *, queries: bool,
             outputs: bool, budget: int) -> tuple[int, tuple | None]:
        """(slots, spec) of a call's arena: as many of its forwards side by side as `budget` bytes hold, spread
        (`spread`); (0, None) when fewer than two fit. `key` is a block's image keys [rows, heads, L_img,
        head_dim] (size, dtype, device); without outputs the last block's image keys and values are left out
        (they serve only to carry the concept tokens on)."""
        kv_layers = tuple(shapes) if outputs else tuple(shapes)[:-1]
        length = key.shape[2]
        per_slot = cls.bytes_per_slot(shapes, kv_layers, rows, length, room, key.element_size(), queries, outputs)
        slots = cls.spread(n_steps, budget // per_slot)
        if not slots:
            return 0, None
        return slots, (shapes, kv_layers, slots, rows, length, room, key.dtype, key.device, queries, outputs)

    @staticmethod
    def spread(n_steps: int, most: int) -> int:
        """Forwards side by side: as few batches as `most` per batch allows, the call's steps spread evenly over
        them (10 steps, room for 6: two batches of 5, not 6 and 4, so the arena is no larger than it need be);
        0 when fewer than two fit."""
        if most < 2 or n_steps < 2:
            return 0
        batches = -(-n_steps // most)
        return -(-n_steps // batches)

    @staticmethod
    def bytes_per_slot(shapes: dict, kv_layers, rows: int, length: int, room: int, element: int, queries: bool,
                       outputs: bool) -> int:
        def per_token(layers):
            return sum(heads * head_dim for heads, head_dim in (shapes[layer] for layer in layers)) * rows * element
        return (per_token(kv_layers) * 2 * (length + room) +
                per_token(shapes) * length * (int(queries) + int(outputs)))

    def put(self, layer: int, slot: int, image: JointTensors) -> None:
        for name, room in self._into[layer][slot]:
            room.copy_(getattr(image, name))

    def side(self, layer: int, n: int) -> ImageSide | None:
        """The first n slots' image keys and values of a block, rows one after another, room included (None for
        a block whose concept tokens are not carried on)."""
        if layer not in self.key:
            return None
        return ImageSide(self.key[layer][:n].flatten(0, 1), self.value[layer][:n].flatten(0, 1), self.length)


def joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """`torch.stack(parts)`, as a view when the parts are alike views lying evenly apart in one storage (records
    of consecutive arena slots, in slot order), else a copy."""
    first = parts[0]
    if len(parts) > 1:
        gap = parts[1].data_ptr() - first.data_ptr()
        alike = all(part.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() and
                    part.shape == first.shape and part.stride() == first.stride() and
                    part.data_ptr() - first.data_ptr() == number * gap for number, part in enumerate(parts))
        if alike and gap > 0 and gap % first.element_size() == 0:
            return first.as_strided((len(parts), *first.shape), (gap // first.element_size(), *first.stride()))
    return torch.stack(parts)


def side_by_side(group: list[Forward], encoded) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The states of these forwards side by side, [sum of rows, widest, dim], and the key mask: False
    on padding, for rows of forwards that carry fewer tokens (None when nothing is padded). `encoded(forward)`
    gives the states of a forward no block has carried yet."""
    states = [forward.states if forward.states is not None else encoded(forward) for forward in group]
    if len(group) == 1:
        return states[0], group[0].key_mask
    width = max(forward.width for forward in group)
    if all(forward.width == width for forward in group):
        masks = [forward.key_mask for forward in group]
        if all(mask is None for mask in masks):
            return torch.cat(states), None
        return torch.cat(states), torch.cat([mask if mask is not None else
                                             torch.ones(len(forward.rows), width, dtype=torch.bool,
                                                        device=states[0].device)
                                             for forward, mask in zip(group, masks)])
    padded = states[0].new_zeros(sum(len(forward.rows) for forward in group), width, states[0].shape[-1])
    mask = torch.zeros(padded.shape[:2], dtype=torch.bool, device=padded.device)
    start = 0
    for forward, part in zip(group, states):
        stop = start + len(forward.rows)
        padded[start:stop, :forward.width] = part
        mask[start:stop, :forward.width] = True if forward.key_mask is None else forward.key_mask
        start = stop
    return padded, mask
