"""What a model family tells `swarm`: how to cut the model into blocks and how to run a span of them.

The generic server and client never test a family's name; they only call this interface.
A family is stateless: everything a server keeps between steps lives in the session state
object the family creates (a KV cache, a growing attention mask, an encoder output, skip tensors).

Inputs and outputs of a span are dicts of named tensors, so a family chooses what travels between
peers (hidden states and position ids for a decoder; sample and time embedding for a UNet).

Most models make one pass over a route per step. A U-shaped model (a UNet) declares two `phases`: a
step then goes down the route in order and comes back up in reverse, each server keeping what the way
back needs (skip tensors) in its session state; `check_inputs` and `forward` get the `phase` keyword.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from swarm.checkpoint import CheckpointIndex
from swarm.errors import BadRequestError, ConfigurationError
from swarm.spans import BlockSpan

Tensors = dict[str, torch.Tensor]


@dataclass
class LoadedSpan:
    """The blocks a server hosts, with whatever a family needs beside them to run a span."""

    config: Any  # the model's configuration, as prepared by the family for serving
    span: BlockSpan  # the hosted blocks, half-open
    blocks: nn.ModuleList  # blocks[i] is block span.start + i
    dtype: torch.dtype  # dtype of the weights and of every floating-point tensor exchanged
    device: torch.device
    helpers: dict[str, nn.Module] = field(default_factory=dict)  # weightless modules shared by blocks
    fast_path: bool = False  # blocks run through the family's fast path, found identical when loaded

    def blocks_of(self, sub_span: BlockSpan) -> list[nn.Module]:
        return list(self.blocks[sub_span.start - self.span.start : sub_span.end - self.span.start])


class ModelFamily:
    """The interface each file in `swarm.models` implements once."""

    model_types: tuple[str, ...] = ()  # values of `config.model_type` this family serves
    architectures: tuple[str, ...] = ()  # class names in `config.architectures`, for messages

    def num_blocks(self, config) -> int:
        raise NotImplementedError

    def prepare_config(self, config):
        """Returns the configuration that servers and clients run the model with."""
        return config

    def block_prefix(self, config, index: int) -> str:
        """The prefix of block `index`'s tensor names in the checkpoint."""
        raise NotImplementedError

    def build_block(self, config, index: int, local_index: int) -> nn.Module:
        """Builds block `index` with empty weights; `local_index` is its position on this server."""
        raise NotImplementedError

    def block_tensor_names(self, config, index: int, checkpoint_names: Iterable[str]) -> dict[str, str]:
        """Checkpoint name -> name in block `index`'s state dict, for every tensor that block holds.
        By default, the tensors under `block_prefix`, without it."""
        prefix = self.block_prefix(config, index)
        return {name: name[len(prefix) :] for name in checkpoint_names if name.startswith(prefix)}

    def convert_block_tensors(self, config, tensors: Tensors) -> Tensors:
        """Renames or fuses one block's checkpoint tensors into the layout `build_block` expects."""
        return tensors

    def stages(self, config) -> list[BlockSpan]:
        """Consecutive groups of blocks that run one after the other (an encoder, then a decoder).
        A request never crosses a stage boundary."""
        return [BlockSpan(0, self.num_blocks(config))]

    def phases(self, config) -> tuple[str, ...]:
        """The passes a step makes over a route. `()` (the default): one pass, hops in route order. Two names
        make a round trip: the first pass visits the hops in route order, the second in reverse order; the
        last hop runs both in one request, and each request of the second pass receives only what the
        previous one returned (the servers keep the rest)."""
        return ()

    def build_helpers(self, config, device: torch.device, checkpoint: CheckpointIndex, span: BlockSpan) -> dict[str, nn.Module]:
        """Small modules a server needs besides its blocks (rotary embeddings, position biases, ...)."""
        return {}

    def check_fast_path(self, loaded: LoadedSpan) -> bool:
        """Whether `loaded` may run its blocks through a path faster than calling their modules, which this
        checks gives the very same outputs. By default there is none."""
        return False

    def new_session_state(self, loaded: LoadedSpan, sub_span: BlockSpan, max_length: int) -> Any:
        """Creates what a session on `sub_span` keeps between steps."""
        raise NotImplementedError

    def check_inputs(
        self, loaded: LoadedSpan, inputs: Tensors, state: Any | None, max_length: int | None, sub_span: BlockSpan
    ):
        """Raises `BadRequestError` naming what is wrong with a request's tensors for blocks `sub_span`.
        A family with `phases` also takes `phase=` (one of them)."""
        raise NotImplementedError

    def forward(self, loaded: LoadedSpan, sub_span: BlockSpan, inputs: Tensors, state: Any | None) -> Tensors:
        """Runs blocks `sub_span` on `inputs`; `state` is None for a forward without a session.
        A family with `phases` also takes `phase=` (one of them; None with no state: the server measuring
        its speed runs every phase)."""
        raise NotImplementedError

    def example_inputs(self, loaded: LoadedSpan) -> Tensors:
        """Inputs for one position of batch 1, used to measure the server's throughput."""
        raise NotImplementedError

    def state_length(self, state: Any) -> int:
        """How many positions a session state holds (checked against the session's maximum length)."""
        raise NotImplementedError


def load_span(
    family: ModelFamily, config, checkpoint: CheckpointIndex, span: BlockSpan, dtype: torch.dtype, device, progress=None
) -> LoadedSpan:
    """Builds blocks `span` with empty weights and fills them with their checkpoint tensors only."""
    from accelerate import init_empty_weights

    blocks = []
    for index in range(span.start, span.end):
        with init_empty_weights():
            block = family.build_block(config, index, index - span.start)
        names = family.block_tensor_names(config, index, checkpoint.file_of)
        stored = checkpoint.load(list(names))
        tensors = family.convert_block_tensors(config, {names[name]: tensor for name, tensor in stored.items()})
        try:
            block.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as error:
            raise ConfigurationError(f"block {index} does not match its checkpoint tensors: {error}") from None
        blocks.append(block.to(device=device, dtype=dtype).eval().requires_grad_(False))
        if progress is not None:
            progress.update(1)
    helpers = family.build_helpers(config, device, checkpoint, span)
    loaded = LoadedSpan(config, span, nn.ModuleList(blocks), dtype, torch.device(device), helpers)
    loaded.fast_path = family.check_fast_path(loaded)
    return loaded


def require(condition: bool, message: str):
    """Raises `BadRequestError(message)` unless `condition` holds."""
    if not condition:
        raise BadRequestError(message)


def check_hidden_states(loaded: LoadedSpan, inputs: Tensors, name: str, width: int) -> tuple[int, int]:
    """Checks `inputs[name]` is (batch, tokens, width) in the server's dtype; returns (batch, tokens)."""
    hidden = inputs.get(name)
    require(hidden is not None, f"request has no {name!r} tensor")
    require(
        hidden.ndim == 3 and hidden.shape[-1] == width and hidden.shape[0] > 0 and hidden.shape[1] > 0,
        f"{name} must have shape (batch, tokens, {width}), got {tuple(hidden.shape)}",
    )
    require(hidden.dtype == loaded.dtype, f"{name} must be {loaded.dtype} on this server, got {hidden.dtype}")
    return hidden.shape[0], hidden.shape[1]


def check_mask(mask: torch.Tensor | None, name: str, batch: int, length: int):
    if mask is not None:
        require(
            tuple(mask.shape) == (batch, length) and not mask.is_floating_point(),
            f"{name} must be an integer or bool tensor of shape ({batch}, {length}), got {tuple(mask.shape)}",
        )


def check_session_step(state, hypo_ids: torch.Tensor | None, batch: int, tokens: int, max_length: int):
    """Checks a step against a session holding `state.length` positions of `state.batch_size` rows."""
    require(
        state.batch_size in (None, batch), f"this session holds a batch of {state.batch_size}, the step sends {batch}"
    )
    require(
        state.length + tokens <= max_length,
        f"step would reach {state.length + tokens} positions, past the session's max_length {max_length}",
    )
    if hypo_ids is not None:
        require(
            hypo_ids.dtype == torch.int64
            and tuple(hypo_ids.shape) == (batch,)
            and bool(((hypo_ids >= 0) & (hypo_ids < (state.batch_size or 0))).all()),
            f"hypo_ids must be int64 of shape ({batch},) indexing the session's batch of {state.batch_size}",
        )


def extend_mask(past_mask: torch.Tensor | None, new_mask: torch.Tensor | None, batch: int, past: int, tokens: int):
    """The attention mask of every position so far, given the past one and the new tokens' (None while all ones)."""
    if past_mask is None and new_mask is None:
        return None
    past_mask = past_mask if past_mask is not None else torch.ones(batch, past, dtype=torch.long)
    new_mask = new_mask if new_mask is not None else torch.ones(batch, tokens, dtype=torch.long)
    return torch.cat([past_mask.long(), new_mask.long().to(past_mask.device)], dim=1)
