"""Several sessions' caches as one batch, and back: what a family's `forward_batch` shares.

Sessions of different lengths are stacked by rows and aligned on their last position: with `past` the longest
session's positions, a session of `length` positions sits in the last `length` positions of its rows and the ones
before are zeros, masked out by its rows of the batch's 2-D mask (left padding, as in a padded batch of one
session). Relative positions are the same in the batch as in each session, so causal and sliding-window masks,
rotary embeddings (each row keeps its own positions) and relative or alibi biases computed from that mask give each
row what it gets alone.

A full-attention layer holds `past` positions; a sliding-window layer holds the last `min(past, window - 1)` (as
transformers' `DynamicSlidingWindowLayer` keeps them), with `cumulative_length = past`, so its mask starts where
the batch's window does. After the forward each session takes back its own rows and positions (`unstack_layer`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicLayer

from swarm.models.base import Tensors
from swarm.models.state import SequenceState, extend_mask


@dataclass
class StackedRows:
    """How the steps of several sessions sit in one batch."""

    rows: list[int]  # each session's rows, in order
    orders: list[torch.Tensor | None]  # each session's beam order (its step's `hypo_ids`), or None
    masks: list[torch.Tensor | None]  # each session's mask of every position after the step (None: all ones)
    lengths: list[int]  # each session's positions before the step
    past: int  # the longest session's positions before the step
    tokens: int  # the step's new positions, the same for every session

    @classmethod
    def of(cls, steps: list[tuple[Tensors, SequenceState]], device) -> StackedRows:
        rows, orders, masks, lengths = [], [], [], []
        tokens = steps[0][0]["hidden_states"].shape[1]
        for inputs, state in steps:
            batch = inputs["hidden_states"].shape[0]
            order = inputs["hypo_ids"].to(device) if "hypo_ids" in inputs else None
            own_mask = state.attention_mask if order is None or state.attention_mask is None else state.attention_mask[order]
            rows.append(batch)
            orders.append(order)
            masks.append(extend_mask(own_mask, inputs.get("attention_mask"), batch, state.length, tokens))
            lengths.append(state.length)
        return cls(rows, orders, masks, lengths, max(lengths), tokens)

    def slices(self) -> list[slice]:
        """Each session's rows of the batch."""
        return [slice(end - batch, end) for end, batch in zip(itertools.accumulate(self.rows), self.rows)]

    def mask(self, device) -> torch.Tensor | None:
        """The batch's 2-D mask of every position (None while every session has all of them, unmasked)."""
        if all(mask is None for mask in self.masks) and all(length == self.past for length in self.lengths):
            return None
        width = self.past + self.tokens
        padded = [padded_mask(mask, batch, length + self.tokens, width)
                  for mask, batch, length in zip(self.masks, self.rows, self.lengths)]  # fmt: skip
        return torch.cat(padded).to(device)

    def stack(self, merged: DynamicLayer, layers: list[DynamicLayer]):
        """`stack_layers` for these sessions."""
        stack_layers(merged, layers, self.lengths, self.rows, self.orders, self.past)


def kept_positions(layer: DynamicLayer, length: int) -> int:
    """How many of a session's `length` positions a layer attends to in its next step: all of them, or for a
    sliding-window layer the last `window - 1`."""
    return min(length, layer.sliding_window - 1) if layer.is_sliding else length


def stack_layers(
    merged: DynamicLayer, layers: list[DynamicLayer], lengths: list[int], rows: list[int], orders: list, past: int
):
    """Fills `merged` with the keys and values of `layers` (one per session of `lengths[i]` positions and `rows[i]`
    rows, each reordered by its beam order or None), aligned on their last position; leaves it empty when all are."""
    if merged.is_sliding:
        merged.cumulative_length = past
        merged.record_past = True  # the step's positions stay whole, as they do in each session (for a `crop`)
    reference = next((layer for layer in layers if layer.is_initialized and layer.keys.shape[-2]), None)
    if reference is None:
        return
    width = kept_positions(merged, past)
    heads = reference.keys.shape[1]
    keys = reference.keys.new_zeros(sum(rows), heads, width, reference.keys.shape[3])
    values = reference.values.new_zeros(sum(rows), heads, width, reference.values.shape[3])
    start = 0
    for layer, length, batch, order in zip(layers, lengths, rows, orders):
        if kept := kept_positions(layer, length):
            # a sliding layer may still hold the last step's positions past its window, kept for a `crop`
            own_keys, own_values = layer.keys[:, :, -kept:], layer.values[:, :, -kept:]
            if order is not None:
                own_keys, own_values = own_keys[order], own_values[order]
            keys[start : start + batch, :, width - kept :] = own_keys
            values[start : start + batch, :, width - kept :] = own_values
        start += batch
    merged.lazy_initialization(keys, values)
    merged.keys, merged.values = keys, values


def unstack_layer(merged: DynamicLayer, own: DynamicLayer, own_rows: slice, length: int, tokens: int, past: int):
    """Gives a session of `length` positions its rows of `merged` after a step of `tokens`: the positions it had
    kept and the step's, as copies (a view would keep every session's rows alive while this one idles)."""
    if not own.is_initialized:
        own.lazy_initialization(merged.keys, merged.values)
    start = kept_positions(merged, past) - kept_positions(own, length)
    own.keys, own.values = merged.keys[own_rows, :, start:].clone(), merged.values[own_rows, :, start:].clone()
    if own.is_sliding:
        own.cumulative_length = length + tokens


def padded_mask(mask: torch.Tensor | None, batch: int, length: int, width: int) -> torch.Tensor:
    """A session's mask of `length` positions (None: all ones), left-padded with zeros to `width`."""
    mask = mask if mask is not None else torch.ones(batch, length, dtype=torch.long)
    return torch.nn.functional.pad(mask.long(), (width - length, 0))
