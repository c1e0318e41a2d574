"""What every encoder-decoder family shares: two stacks of blocks numbered in execution order, and decoder sessions.

Blocks 0..E-1 are the encoder's, blocks E..E+D-1 the decoder's; the two stacks are the family's stages, so a
server may host a span that crosses from the encoder into the decoder, and every request stays within one stage.

Encoder request (no session):  hidden_states (B, S, width), attention_mask (B, S) optional, output_layers optional.
Decoder request:               hidden_states (B, T, width), attention_mask (B, T) optional,
                               encoder_hidden_states (B, S, width) and encoder_attention_mask (B, S) optional:
                               with every forward, and with the first step of a session, which keeps them;
                               hypo_ids (B,) optional in a session (beam search), output_layers optional.

A decoder session keeps its self- and cross-attention caches (`EncoderDecoderCache`) and the encoder output.
The decoder steps of different sessions batch once their first steps have filled their cross-attention caches.
A family says how many blocks each stack has and how a run of its blocks is called (`run_encoder`, `run_decoder`).
"""

from __future__ import annotations

import itertools
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import DynamicCache, EncoderDecoderCache
from transformers.cache_utils import DynamicLayer

from swarm.models.base import LAYER_OUTPUT, LoadedSpan, ModelFamily, Tensors
from swarm.models.checks import check_hidden_states, check_mask, check_names, check_output_layers, require
from swarm.models.stacking import StackedRows, unstack_layer
from swarm.models.state import SequenceState
from swarm.spans import BlockSpan

ENCODER, DECODER = "encoder", "decoder"
KEPT = ("encoder_hidden_states", "encoder_attention_mask")  # what a decoder session keeps from its first step

# A batch copies each row's cross-attention keys and values into one tensor per block, and reads each block's
# weights once for all its rows instead of once per session: a batch that copies pays while a row's keys and values
# times this stay under a block's weights. Measured on 2 cores, 2/4/8 sessions batched against alone: a
# t5-small-shaped decoder over 40 encoder positions 1.4/2.0/2.9x as fast (0.04 of the bound), over 400
# 1.0/1.3/1.55x (0.39); Whisper tiny.en's over 1500 positions (1.95 times it) 0.74/0.86/1.02x. Sessions over encoder
# outputs of one length share their stacked keys and values once they have batched, and their next batches copy
# nothing (Whisper tiny.en: 1.24/1.67/2.29x); sessions past the bound batch only with such sessions.
CROSS_COPY_FACTOR = 4

Keep = Callable[[int, torch.Tensor], None]  # keep(block index, its output): records what the request asked for


@dataclass
class DecoderStep:
    """What a run of decoder blocks works with: the session's (or the request's) encoder output and masks."""

    kept: Tensors  # encoder_hidden_states, and encoder_attention_mask if any
    mask: torch.Tensor | None  # the attention mask of every position so far (None: all ones)
    past: int  # positions before this step
    cache: EncoderDecoderCache | None  # the session's caches (None without a session)


class EncoderDecoderFamily(ModelFamily):
    client_kind = "seq2seq_lm"

    @abstractmethod
    def encoder_blocks(self, config) -> int:
        """How many blocks the encoder has (the decoder's follow)."""

    @abstractmethod
    def width(self, config) -> int:
        """The hidden size of the hidden states both stacks take."""

    def encoder_takes_mask(self, config) -> bool:
        """Whether the model's encoder gives its layers an attention mask."""
        return True

    @abstractmethod
    def run_encoder(self, loaded: LoadedSpan, sub_span: BlockSpan, hidden: torch.Tensor, mask, keep: Keep) -> torch.Tensor:
        """Runs encoder blocks `sub_span` on `hidden` with the 2-D `mask` (or None)."""

    @abstractmethod
    def run_decoder(self, loaded: LoadedSpan, sub_span: BlockSpan, hidden: torch.Tensor, step: DecoderStep, keep: Keep) -> torch.Tensor:
        """Runs decoder blocks `sub_span` on `hidden` for `step`."""

    def stages(self, config) -> list[BlockSpan]:
        count = self.encoder_blocks(config)
        return [BlockSpan(0, count), BlockSpan(count, self.num_blocks(config))]

    def stack_of(self, config, index: int) -> tuple[str, int]:
        """("encoder", i) or ("decoder", j) for global block `index`."""
        count = self.encoder_blocks(config)
        return (ENCODER, index) if index < count else (DECODER, index - count)

    def example_inputs(self, loaded: LoadedSpan) -> Tensors:
        dtype = self.input_dtype(loaded, BlockSpan(loaded.span.start, loaded.span.start + 1))
        hidden = torch.zeros(1, 1, self.width(loaded.config), dtype=dtype, device=loaded.device)
        inputs = {"hidden_states": hidden}
        if self.stack_of(loaded.config, loaded.span.start)[0] == DECODER:
            inputs["encoder_hidden_states"] = hidden.to(loaded.dtype, copy=True)
        return inputs

    def new_session_state(self, loaded: LoadedSpan, sub_span: BlockSpan, max_length: int) -> SequenceState:
        require(
            self.stack_of(loaded.config, sub_span.start)[0] == DECODER,
            "sessions run decoder blocks; encoder blocks take plain forward requests",
        )
        return SequenceState(cache=EncoderDecoderCache(DynamicCache(), DynamicCache()))

    def check_inputs(self, loaded: LoadedSpan, inputs: Tensors, state, max_length, sub_span: BlockSpan, phase):
        width, stack = self.width(loaded.config), self.stack_of(loaded.config, sub_span.start)[0]
        batch, tokens = check_hidden_states(inputs, "hidden_states", width, self.input_dtype(loaded, sub_span))
        if stack == ENCODER:
            allowed = {"hidden_states", "output_layers"} | ({"attention_mask"} if self.encoder_takes_mask(loaded.config) else set())
        else:
            allowed = {"hidden_states", "attention_mask", "output_layers", *KEPT, "hypo_ids"}
        check_names(inputs, allowed, f"{loaded.config.model_type} {stack} blocks")
        check_mask(inputs.get("attention_mask"), "attention_mask", batch, tokens)
        check_output_layers(inputs.get("output_layers"), self.num_blocks(loaded.config))
        if stack == ENCODER:
            return
        encoder = inputs.get("encoder_hidden_states")
        if state is None or "encoder_hidden_states" not in state.kept:
            require(encoder is not None, "decoder blocks need 'encoder_hidden_states' (in a session: with its first step)")
        if encoder is not None:
            require(
                encoder.ndim == 3 and encoder.shape[0] == batch and encoder.shape[2] == width and encoder.shape[1] > 0,
                f"encoder_hidden_states must have shape ({batch}, source_length, {width}), got {tuple(encoder.shape)}",
            )
            require(encoder.dtype == loaded.dtype, f"encoder_hidden_states must be {loaded.dtype}")
            check_mask(inputs.get("encoder_attention_mask"), "encoder_attention_mask", batch, encoder.shape[1])
        else:
            require("encoder_attention_mask" not in inputs, "encoder_attention_mask comes with encoder_hidden_states")
        if state is not None:
            state.check_step(inputs.get("hypo_ids"), batch, tokens, max_length)

    def forward(self, loaded: LoadedSpan, sub_span: BlockSpan, inputs: Tensors, state, phase) -> Tensors:
        hidden = inputs["hidden_states"].to(loaded.device)
        wanted = set(inputs["output_layers"].tolist()) if "output_layers" in inputs else set()
        outputs = {}  # the outputs of the blocks in `wanted`, by their reply names

        def keep(index: int, output: torch.Tensor):
            if index in wanted:
                outputs[LAYER_OUTPUT.format(index)] = output

        if self.stack_of(loaded.config, sub_span.start)[0] == ENCODER:
            hidden = self.run_encoder(loaded, sub_span, hidden, to_device(inputs.get("attention_mask"), hidden), keep)
        else:
            batch, tokens = hidden.shape[:2]
            step = begin_decoder_step(loaded, inputs, state, batch, tokens)
            hidden = self.run_decoder(loaded, sub_span, hidden, step, keep)
            if state is not None:
                state.advance(step.mask, batch, tokens)
        return {"hidden_states": hidden, **outputs}

    def batch_key(self, loaded: LoadedSpan, sub_span: BlockSpan, inputs: Tensors, state, phase):
        """Decoder steps of one span and one number of new tokens batch once their sessions' cross-attention caches
        hold the encoder's keys and values; a session's first step, which computes them, runs alone. Sessions whose
        keys and values are large beside a block's weights (`CROSS_COPY_FACTOR`) batch only over encoder outputs of
        their own length."""
        if self.stack_of(loaded.config, sub_span.start)[0] != DECODER or "encoder_hidden_states" in inputs:
            return None
        cache, positions = state.cache, self._positions(loaded.config, sub_span)
        if type(cache) is not EncoderDecoderCache or not all(cache.is_updated.get(position) for position in positions):
            return None
        caches = (cache.self_attention_cache, cache.cross_attention_cache)
        if any(type(layer) is not DynamicLayer for stack in caches for layer in stack.layers[positions[0] :]):
            return None
        cross = cache.cross_attention_cache.layers[positions[0]]
        block = loaded.blocks_of(BlockSpan(sub_span.start, sub_span.start + 1))[0]
        weights = sum(parameter.numel() for parameter in block.parameters())
        if CROSS_COPY_FACTOR * (cross.keys[0].numel() + cross.values[0].numel()) > weights:
            return sub_span, inputs["hidden_states"].shape[1], cross.keys.shape[-2]  # batches that share, not copy
        return sub_span, inputs["hidden_states"].shape[1]

    def forward_batch(self, loaded: LoadedSpan, sub_span: BlockSpan, steps: list[tuple[Tensors, SequenceState]]) -> list[Tensors]:
        """Stacks the sessions' rows, their self-attention caches aligned on their last position and their
        cross-attention caches on their first, each padded with masked zeros (`swarm.models.stacking`). The encoder
        outputs are not stacked: every block takes its cross-attention keys and values from the caches, which
        sessions over encoder outputs of one length then share (`_share_cross_layer`), so that their next batch
        together copies none."""
        device, stacked = loaded.device, StackedRows.of(steps, loaded.device)
        hidden = torch.cat([inputs["hidden_states"].to(device) for inputs, _ in steps])
        positions = self._positions(loaded.config, sub_span)
        self_cache, cross_cache = DynamicCache(), DynamicCache()
        for cache in (self_cache, cross_cache):
            cache.layers = [DynamicLayer() for _ in range(positions[-1] + 1)]
        sources = [state.cache.cross_attention_cache.layers[positions[0]].keys.shape[-2] for _, state in steps]
        for position in positions:
            own_self = [state.cache.self_attention_cache.layers[position] for _, state in steps]
            stacked.stack(self_cache.layers[position], own_self)
            cross = [state.cache.cross_attention_cache.layers[position] for _, state in steps]
            _stack_cross_layers(cross_cache.layers[position], cross, stacked.orders)
        width = self.width(loaded.config)
        kept = {"encoder_hidden_states": hidden.new_zeros(()).expand(len(hidden), max(sources), width)}
        if (encoder_mask := _cross_mask(steps, stacked, sources)) is not None:
            kept["encoder_attention_mask"] = encoder_mask.to(device)
        step = DecoderStep(kept, stacked.mask(device), stacked.past, EncoderDecoderCache(self_cache, cross_cache))
        outputs = {}  # every block's output, by its index
        hidden = self.run_decoder(loaded, sub_span, hidden, step, outputs.__setitem__)
        results, share = [], len(set(sources)) == 1  # not padded ones, whose padding the sessions would keep
        for (inputs, state), own_rows, order, own_mask in zip(steps, stacked.slices(), stacked.orders, stacked.masks):
            for position in positions:
                own = state.cache.self_attention_cache.layers[position]
                unstack_layer(self_cache.layers[position], own, own_rows, state.length, stacked.tokens, stacked.past)
                if share:
                    _share_cross_layer(state.cache.cross_attention_cache.layers[position], cross_cache.layers[position], own_rows)
            if order is not None:
                if not share:
                    state.cache.cross_attention_cache.reorder_cache(order)
                state.kept = {name: tensor[order.to(tensor.device)] for name, tensor in state.kept.items()}
            state.advance(own_mask, own_rows.stop - own_rows.start, stacked.tokens)
            wanted = inputs["output_layers"].tolist() if "output_layers" in inputs else []
            layers = {LAYER_OUTPUT.format(index): outputs[index][own_rows] for index in wanted if index in outputs}
            results.append({"hidden_states": hidden[own_rows], **layers})
        return results

    def _positions(self, config, sub_span: BlockSpan) -> list[int]:
        """The decoder positions (cache layer indices) of decoder blocks `sub_span`."""
        return [self.stack_of(config, index)[1] for index in sub_span]


def begin_decoder_step(loaded: LoadedSpan, inputs: Tensors, state: SequenceState | None, batch: int, tokens: int) -> DecoderStep:
    """The encoder output and masks a decoder step runs with: the request's, or in a session the ones kept from its
    first step (its beams reordered first, if asked)."""
    kept = {name: inputs[name] for name in KEPT if inputs.get(name) is not None}
    mask = inputs.get("attention_mask")
    if state is None:
        return DecoderStep({name: tensor.to(loaded.device) for name, tensor in kept.items()}, to_device(mask, loaded), 0, None)
    if (hypo_ids := inputs.get("hypo_ids")) is not None:
        state.reorder(hypo_ids.to(loaded.device))
    _own_cross_layers(state.cache)
    if "encoder_hidden_states" in kept:
        state.kept = {name: tensor.to(loaded.device) for name, tensor in kept.items()}
    mask = state.mask_with(mask, batch, tokens)
    return DecoderStep(state.kept, to_device(mask, loaded), state.length, state.cache)


def to_device(mask: torch.Tensor | None, like) -> torch.Tensor | None:
    """`mask` on the device of `like` (a tensor or a `LoadedSpan`)."""
    return mask.to(like.device) if mask is not None else None


def _stack_cross_layers(merged: DynamicLayer, layers: list[DynamicLayer], orders: list):
    """Fills `merged` with the cross-attention keys and values of `layers` (one per session, each reordered by its
    beam order or None), stacked by rows and right-padded with zeros to the longest encoder output. Sessions that
    a batch left holding views of its stacked tensors (`_share_cross_layer`), one after the other, need no copy
    unless beams reorder them."""
    keys, values = _stacked_views(layers, "keys"), _stacked_views(layers, "values")
    rows = [layer.keys.shape[0] for layer in layers]
    if keys is not None and values is not None:
        if any(order is not None for order in orders):
            starts = itertools.accumulate(rows, initial=0)
            index = [start + (torch.arange(batch) if order is None else order.cpu()) for start, batch, order in zip(starts, rows, orders)]
            index = torch.cat(index).to(keys.device)
            keys, values = keys[index], values[index]
    else:
        reference = layers[0]
        source = max(layer.keys.shape[-2] for layer in layers)
        keys = reference.keys.new_zeros(sum(rows), reference.keys.shape[1], source, reference.keys.shape[3])
        values = reference.values.new_zeros(sum(rows), reference.values.shape[1], source, reference.values.shape[3])
        start = 0
        for layer, batch, order in zip(layers, rows, orders):
            own, length = slice(start, start + batch), layer.keys.shape[-2]
            keys[own, :, :length] = layer.keys if order is None else layer.keys[order]
            values[own, :, :length] = layer.values if order is None else layer.values[order]
            start += batch
    merged.lazy_initialization(keys, values)
    merged.keys, merged.values = keys, values


def _share_cross_layer(own: DynamicLayer, merged: DynamicLayer, rows: slice):
    """Once a batch has run: the session's cross-attention keys and values (`own`, its rows `rows` of the batch,
    over encoder outputs of one length) become views of the batch's, which hold them in its new beam order."""
    own.keys, own.values = merged.keys[rows], merged.values[rows]


def _own_cross_layers(cache: EncoderDecoderCache):
    """Gives a session that runs a step alone cross-attention keys and values of its own, if they are views of a
    batch's (`_share_cross_layer`), so that it no longer holds the memory of the other sessions' rows."""
    for layer in cache.cross_attention_cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name)
            if tensor is not None and tensor.untyped_storage().nbytes() > tensor.numel() * tensor.element_size():
                setattr(layer, name, tensor.clone())


def _stacked_views(layers: list[DynamicLayer], name: str) -> torch.Tensor | None:
    """The stacked tensor whose rows the `name` tensors of `layers` are, one after the other (as
    `_share_cross_layer` leaves them), if they are: they share its memory at consecutive offsets, and fill it."""
    tensors = [getattr(layer, name) for layer in layers]
    first, rows = tensors[0], 0
    memory = first.untyped_storage()
    for tensor in tensors:
        if not tensor.is_contiguous() or tensor.shape[1:] != first.shape[1:]:
            return None
        if tensor.untyped_storage().data_ptr() != memory.data_ptr() or tensor.storage_offset() != rows * first.stride(0):
            return None
        rows += tensor.shape[0]
    if rows * first.stride(0) * first.element_size() != memory.nbytes():
        return None
    return first.as_strided((rows, *first.shape[1:]), first.stride(), 0)


def _cross_mask(steps: list[tuple[Tensors, SequenceState]], stacked: StackedRows, sources: list[int]) -> torch.Tensor | None:
    """The batch's encoder attention mask: each session's (reordered by its beams), right-padded with zeros to the
    longest encoder output; None while every session has an unmasked output of the same length."""
    masks = [state.kept.get("encoder_attention_mask") for _, state in steps]
    if all(mask is None for mask in masks) and len(set(sources)) == 1:
        return None
    padded = []
    for mask, batch, order, source in zip(masks, stacked.rows, stacked.orders, sources):
        mask = torch.ones(batch, source, dtype=torch.long) if mask is None else mask.long()
        mask = mask[order.to(mask.device)] if order is not None else mask
        padded.append(torch.nn.functional.pad(mask.cpu(), (0, max(sources) - source)))
    return torch.cat(padded)
