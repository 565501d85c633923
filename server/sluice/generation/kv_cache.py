"""The key/value cache behind continuous batching: one pool of rows, one row per sequence.

Layout: ``keys`` and ``values`` are each one tensor
``[layers, rows, kv_heads, capacity, head_dim]``. A sequence owns one row (its
``SequenceCache`` handle) from its prefill until it is released; the first ``length``
positions of the row hold its keys and values.

Why this layout: live rows stay packed at the front of the pool (releasing a row moves the
last live row into the hole: one copy of that row's filled part), so a decode step over every
live sequence, the common case, reads ``keys[layer, :n, :, :T]``: a view, no copy. A step
over only some of the sequences gathers their rows (a copy): still exact, just slower.
Sequences of different lengths share one step: each new token attends to the positions up to
its own, so the unfilled tail of a shorter row (zeros, or finite values a released sequence
left) is masked out and adds exactly nothing.

Growth: rows and capacity double when needed (capacity in steps of ``CAPACITY_STEP``, at most
the model's context), copying the live part once. Memory is rows x the longest live sequence,
not the sum of the lengths: sequences of very different lengths waste the difference. The
storage is freed when no sequence is live, and cut to twice what the live sequences need
once it holds four times that.

Not thread-safe: one thread drives a model and its pool.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sluice.errors import InvalidInputError

CAPACITY_STEP = 64
"""Capacity grows in multiples of this many positions."""

SHRINK_FACTOR = 4
"""Storage this many times larger than the live sequences need is halved."""

HALF_DECODE_PRODUCTS_MIN = 1 << 16
"""Sequences x positions x heads x head_dim from which a half-type decode step's attention
on a CPU takes two matrix products rather than ``scaled_dot_product_attention``
(``attention``): below it, the products' fixed cost is more than what they save (one
thread: 8 heads of 64, 1 sequence of 40 positions: 32 us against 58; of 160: 114 against
68)."""


class SequenceCache:
    """One sequence's place in a ``KVCachePool``: valid from its prefill until released."""

    __slots__ = ("_length", "_pool", "_row")

    def __init__(self, pool: KVCachePool, row: int) -> None:
        self._pool: KVCachePool | None = pool
        self._row = row
        self._length = 0

    @property
    def length(self) -> int:
        """Tokens cached: the position the next token will take."""
        return self._length

    @property
    def released(self) -> bool:
        return self._pool is None

    def release(self) -> None:
        """Give the row back to the pool; releasing twice is harmless."""
        if self._pool is not None:
            self._pool.release(self)


@dataclass(frozen=True, slots=True)
class CacheStep:
    """One forward pass over some sequences of a pool, each adding the same number of tokens.

    Entry ``i`` of ``caches``, ``positions`` and ``mask`` is the ``i``-th sequence in row
    order; ``order[i]`` is that sequence's index in the caller's list.
    """

    keys: torch.Tensor
    values: torch.Tensor
    caches: tuple[SequenceCache, ...]
    order: tuple[int, ...]
    rows: torch.Tensor
    """Row of each sequence, ascending."""
    write_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    """Row, head and position of every new key, broadcast to ``[batch, kv_heads, new_tokens]``
    (indices that address one layer's storage without reordering it)."""
    row_slice: slice | None
    """The same rows as a slice when they are consecutive (then reads are views)."""
    positions: torch.Tensor
    """``[batch, new_tokens]``: the position each new token takes."""
    mask: torch.Tensor
    """``[batch, 1, new_tokens, total]`` booleans: which positions each new token sees."""
    bias: torch.Tensor
    """``mask`` as the attention adds it (0 where seen, -inf elsewhere), made once per
    step rather than by every layer's attention."""

    @property
    def total(self) -> int:
        """Positions the attention reads: the longest sequence after this step."""
        return int(self.mask.shape[-1])

    def update(
        self, layer: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new tokens' keys and values (``[batch, kv_heads, new_tokens,
        head_dim]``) for ``layer``; return every position's (``[batch, kv_heads, total,
        head_dim]``)."""
        layer_keys, layer_values = self.keys[layer], self.values[layer]
        layer_keys[self.write_index] = keys
        layer_values[self.write_index] = values
        rows = self.rows if self.row_slice is None else self.row_slice
        return layer_keys[rows, :, : self.total], layer_values[rows, :, : self.total]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Store ``layer``'s new keys and values and attend the new queries (``[batch,
        heads, new_tokens, head_dim]``) over every position each may see."""
        keys, values = self.update(layer, k, v)
        return attention(q, keys, values, self.bias)


def attention(q: Tensor, keys: Tensor, values: Tensor, bias: Tensor) -> Tensor:
    """Scaled dot-product attention of ``[batch, heads, new_tokens, head_dim]`` queries over
    ``[batch, kv_heads, total, head_dim]`` keys and values, ``bias`` (``[batch, 1,
    new_tokens, total]``) added to the scores; query heads share key/value heads in
    consecutive groups (head ``h`` reads key/value head ``h // (heads // kv_heads)``).

    A decode step on a CPU in a half type (one new token per sequence, ``bfloat16`` or
    ``float16``) takes two matrix products instead, each key/value head's queries side by
    side, the softmax in float32: PyTorch's CPU ``scaled_dot_product_attention`` is slow
    for half-type decoding (bench/README.md, "Token generation": 2 to 7 times slower on
    the cache's rows). Float32, prompts, small steps (``HALF_DECODE_PRODUCTS_MIN``) and
    every step on a GPU (where it has fused half-type kernels) keep it. A row with every
    position masked would give NaN here (zeros there); a decode token always sees its own
    position.
    """
    batch, heads, new_tokens, head_dim = q.shape
    total = keys.shape[2]
    half = q.dtype in (torch.bfloat16, torch.float16)
    small = batch * total * heads * head_dim < HALF_DECODE_PRODUCTS_MIN
    if not half or new_tokens != 1 or q.device.type != "cpu" or small:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, enable_gqa=True)
    kv_heads = keys.shape[1]
    share = heads // kv_heads
    # Scaled before the product (a float16 dot product could pass 65504 unscaled); keys
    # times queries, not queries times keys transposed: the keys are rows of the cache,
    # not contiguous, and this order reads them as they lie (2 to 3 times faster).
    grouped = q.reshape(batch, kv_heads, share, head_dim) * head_dim**-0.5
    scores = torch.matmul(keys, grouped.transpose(-1, -2)).transpose(-1, -2)
    weights = torch.softmax(scores + bias, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, values).view(batch, heads, new_tokens, head_dim)


@dataclass(frozen=True, slots=True)
class MixedStep:
    """One forward pass over groups of sequences that add different numbers of tokens (the
    running sequences' next token and the joining ones' prompts), packed one after another
    on the token axis of a batch of one: ``[1, sum(batch_g * new_tokens_g)]``.

    Every layer but attention runs once over all the tokens; attention runs per group, in
    that group's ``[batch, heads, new_tokens, head_dim]`` layout.
    """

    groups: tuple[CacheStep, ...]

    @property
    def positions(self) -> Tensor:
        """``[1, tokens]``: each packed token's position."""
        return torch.cat([group.positions.reshape(-1) for group in self.groups])[None]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """``CacheStep.attend`` for packed ``[1, heads, tokens, head_dim]`` tensors."""
        outputs, start = [], 0
        for group in self.groups:
            batch, new_tokens = group.positions.shape
            end = start + batch * new_tokens
            parts = (_unpack(x[0, :, start:end], batch) for x in (q, k, v))
            out = group.attend(layer, *parts)
            outputs.append(out.transpose(0, 1).flatten(1, 2))
            start = end
        return torch.cat(outputs, dim=1)[None]


KVStep = CacheStep | MixedStep
"""What a forward pass reads and writes the cache through."""


def _unpack(x: Tensor, batch: int) -> Tensor:
    """``[heads, batch * new_tokens, head_dim]`` -> ``[batch, heads, new_tokens, head_dim]``."""
    heads, tokens, head_dim = x.shape
    return x.reshape(heads, batch, tokens // batch, head_dim).transpose(0, 1)


class KVCachePool:
    """Rows of keys and values for the live sequences of one model (see the module doc)."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        max_context: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self._layers = num_layers
        self._kv_heads = num_kv_heads
        self._head_dim = head_dim
        self._max_context = max_context
        self._dtype = dtype
        self._device = device
        self._live: list[SequenceCache] = []
        self._keys, self._values = self._allocate(0, 0)

    @property
    def live_sequences(self) -> int:
        return len(self._live)

    @property
    def storage_bytes(self) -> int:
        """Memory the pool holds now, keys and values together."""
        return 2 * self._keys.numel() * self._keys.element_size()

    def open(self) -> SequenceCache:
        """A new, empty sequence; its storage is reserved by its first step."""
        cache = SequenceCache(self, len(self._live))
        self._live.append(cache)
        return cache

    def plan(self, caches: Sequence[SequenceCache], new_tokens: int) -> CacheStep:
        """Prepare a forward pass that adds ``new_tokens`` tokens to each of ``caches``."""
        (step,) = self.plan_groups([(caches, new_tokens)])
        return step

    def plan_groups(
        self, groups: Sequence[tuple[Sequence[SequenceCache], int]]
    ) -> tuple[CacheStep, ...]:
        """``plan`` for several groups of distinct sequences that share one forward pass
        (each group adds its own number of tokens)."""
        if not groups or any(not caches for caches, _ in groups):
            raise ValueError("a step needs at least one sequence in each group")
        self._check_members([cache for caches, _ in groups for cache in caches])
        totals = []
        for caches, new_tokens in groups:
            for cache in caches:
                if cache._length + new_tokens > self._max_context:
                    raise InvalidInputError(
                        f"the sequence would reach {cache._length + new_tokens} tokens; "
                        f"the model's context is {self._max_context}"
                    )
            totals.append(max(cache._length for cache in caches) + new_tokens)
        self._reserve(len(self._live), max(totals))
        return tuple(
            self._group(caches, new_tokens, total)
            for (caches, new_tokens), total in zip(groups, totals, strict=True)
        )

    def _group(self, caches: Sequence[SequenceCache], new_tokens: int, total: int) -> CacheStep:
        order = tuple(sorted(range(len(caches)), key=lambda i: caches[i]._row))
        ordered = tuple(caches[i] for i in order)
        rows = [cache._row for cache in ordered]
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        steps = torch.arange(new_tokens, device=self._device)
        starts = torch.tensor([cache._length for cache in ordered], device=self._device)
        positions = starts[:, None] + steps
        seen = torch.arange(total, device=self._device)
        row_index = torch.tensor(rows, device=self._device)
        heads = torch.arange(self._kv_heads, device=self._device)
        mask = (seen <= positions[:, :, None])[:, None]
        bias = torch.zeros(mask.shape, dtype=self._dtype, device=self._device)
        return CacheStep(
            keys=self._keys,
            values=self._values,
            caches=ordered,
            order=order,
            rows=row_index,
            write_index=(row_index[:, None, None], heads[None, :, None], positions[:, None, :]),
            row_slice=slice(rows[0], rows[0] + len(rows)) if consecutive else None,
            positions=positions,
            mask=mask,
            bias=bias.masked_fill_(mask.logical_not(), -math.inf),
        )

    def commit(self, step: CacheStep, *, lengths: Sequence[int] | None = None) -> None:
        """Count a finished forward pass's tokens as cached (``lengths``: how many of each
        sequence's new tokens, in the step's row order, are real rather than padding)."""
        added = int(step.positions.shape[1])
        for index, cache in enumerate(step.caches):
            cache._length += added if lengths is None else lengths[index]

    def release(self, cache: SequenceCache) -> None:
        self._check_members([cache])
        row = cache._row
        last = self._live.pop()
        if last is not cache:
            if last._length:  # a sequence opened since the last step has no storage yet
                filled = slice(0, last._length)
                self._keys[:, row, :, filled] = self._keys[:, last._row, :, filled]
                self._values[:, row, :, filled] = self._values[:, last._row, :, filled]
            last._row = row
            self._live[row] = last
        cache._pool = None
        self._shrink()

    def _check_members(self, caches: Sequence[SequenceCache]) -> None:
        if not caches:
            raise ValueError("a step needs at least one sequence")
        if len({id(cache) for cache in caches}) != len(caches):
            raise ValueError("a sequence appears twice in one step")
        for cache in caches:
            if cache._pool is not self:
                raise ValueError("the sequence was released or belongs to another model")

    def _reserve(self, rows: int, positions: int) -> None:
        have_rows, have_positions = self._keys.shape[1], self._keys.shape[3]
        if rows <= have_rows and positions <= have_positions:
            return
        if rows > have_rows:
            have_rows = max(rows, 2 * have_rows)
        if positions > have_positions:
            have_positions = self._round(max(positions, 2 * have_positions))
        self._resize(have_rows, have_positions)

    def _shrink(self) -> None:
        if not self._live:
            self._resize(0, 0)
            return
        rows = len(self._live)
        positions = self._round(max(cache._length for cache in self._live))
        if self._keys[0].numel() >= SHRINK_FACTOR * rows * positions * self._row_width:
            have_rows, have_positions = self._keys.shape[1], self._keys.shape[3]
            self._resize(min(have_rows, 2 * rows), min(have_positions, self._round(2 * positions)))

    def _resize(self, rows: int, positions: int) -> None:
        keys, values = self._allocate(rows, positions)
        # A sequence opened since the last step has no row in the old storage yet.
        live = min(len(self._live), self._keys.shape[1])
        filled = max((cache._length for cache in self._live), default=0)
        keys[:, :live, :, :filled] = self._keys[:, :live, :, :filled]
        values[:, :live, :, :filled] = self._values[:, :live, :, :filled]
        self._keys, self._values = keys, values

    @property
    def _row_width(self) -> int:
        return self._kv_heads * self._head_dim

    def _round(self, positions: int) -> int:
        steps = -(-positions // CAPACITY_STEP)
        return min(steps * CAPACITY_STEP, self._max_context)

    def _allocate(self, rows: int, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self._layers, rows, self._kv_heads, positions, self._head_dim)
        return (
            torch.zeros(shape, dtype=self._dtype, device=self._device),
            torch.zeros(shape, dtype=self._dtype, device=self._device),
        )
