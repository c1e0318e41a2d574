"""The contract between `swarm` and a model family: everything the server and the client call on a family.

A family says how to cut a model into blocks and how to run a span of them; the model's own classes do the
math. The generic server and client never test a family's name: they call only `ModelFamily`'s methods.
A family holds no session data: what a server keeps between steps lives in the `SequenceState` the family
creates (a KV cache, the mask of past positions, an encoder output, a UNet's skip tensors).

Requests to a span and their replies are dicts of named tensors, so a family chooses what travels between
peers (hidden states and position ids for a decoder; sample and time embedding for a UNet).

Most models make one pass over a route per step (`phases` is empty, and `phase` is always None). A U-shaped
model (a UNet) declares two phases: a step then goes down the route in order and comes back up in reverse,
each server keeping what the way back needs in its session state.

On the client, the model is the model's own class (`client_skeleton`, built on the meta device) with each
stack of blocks replaced by one call to the swarm (`client_stacks`): its embeddings, norms and head run here as
their own code says, and only the tensors no block holds are loaded (`client_tensor_names`).
`client_kind` names the client class that drives it (see `swarm.client.auto`).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from swarm.checkpoint import CheckpointIndex
from swarm.errors import ConfigurationError
from swarm.models.state import SequenceState
from swarm.quantization import PrecisionRules, quantize_linears, return_freed_memory
from swarm.spans import BlockSpan

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]
# Reply tensors named so hold block i's output, asked for by a request's `output_layers` (int64 block indices)
# when the client's model reads intermediate hidden states: the client keeps them, they do not go on to the next hop
LAYER_OUTPUT = "layer_output.{}"


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
    quant_type: str = "none"  # how the blocks' linear layers hold their weights (see `swarm.quantization`)
    residual_dtype: torch.dtype | None = None  # hidden states between blocks, where wider than `dtype`
    # (`ModelFamily.residual_dtype`: T5 in float16); None: `dtype`

    def blocks_of(self, sub_span: BlockSpan) -> list[nn.Module]:
        return list(self.blocks[sub_span.start - self.span.start : sub_span.end - self.span.start])


@dataclass(frozen=True)
class ClientStack:
    """A stack of blocks in the model's own class that the client runs in the swarm, as one call."""

    path: str  # the nn.ModuleList of blocks in the client model ("model.layers", "decoder.block")
    stage: int  # index in `ModelFamily.stages` of the blocks it holds
    # what travels with the hidden states: arguments of the call to the stack's owner ("model" for "model.layers")
    # or of the call to a block, by name; None values stay home
    inputs: tuple[str, ...] = ("attention_mask", "position_ids")
    kept: tuple[str, ...] = ()  # inputs a session keeps from its first step (an encoder's output), sent once
    returns: int = 0  # what a block returns: 0, the hidden states alone; n, a tuple of n (hidden states first)
    # the owner, if not the stack's parent: the module called with the inputs as the model's user gave them ("" for
    # the model itself: an encoder's own forward turns its 2-D attention mask into the 4-D one its layers take)
    owner: str | None = None
    # when the model asks for its hidden states (`output_hidden_states`, a backbone's feature maps): the blocks
    # (indices in the stack) whose outputs its own code reads, the only ones servers return; None: all it asks for
    reads_outputs: tuple[int, ...] | None = None


class ModelFamily(ABC):
    """The interface each file in `swarm.models` implements once. `phase` is always passed: None for a
    model that makes one pass per step, else one of `phases(config)`."""

    client_kind: str = "causal_lm"  # the client class that drives the model: a key of `swarm.client.auto.CLIENT_KINDS`

    # The model and its blocks

    def prepare_config(self, config):
        """Returns the configuration that servers and clients run the model with, or raises
        `UnsupportedModelError` naming what swarm cannot cut."""
        return config

    @abstractmethod
    def num_blocks(self, config) -> int:
        """How many blocks the model is cut into; blocks are numbered in the order a request runs them."""

    def stages(self, config) -> list[BlockSpan]:
        """Consecutive groups of blocks that run one after the other (an encoder, then a decoder). A request
        never crosses a stage boundary; inference sessions run the last stage."""
        return [BlockSpan(0, self.num_blocks(config))]

    def phases(self, config) -> tuple[str, ...]:
        """The passes a step makes over a route. `()` (the default): one pass, hops in route order. Two names
        make a round trip: the first pass visits the hops in route order, the second in reverse order; the
        last hop runs both in one request, and each request of the second pass receives only what the
        previous one returned (the servers keep the rest)."""
        return ()

    @abstractmethod
    def block_tensor_names(self, config, index: int, checkpoint_names: Iterable[str]) -> dict[str, str]:
        """Checkpoint name -> name in block `index`'s state dict, for every tensor that block holds."""

    def convert_block_tensors(self, config, tensors: Tensors) -> Tensors:
        """Renames or fuses one block's checkpoint tensors into the layout `build_blocks` makes."""
        return tensors

    @abstractmethod
    def build_blocks(self, config, span: BlockSpan) -> list[nn.Module]:
        """Builds blocks `span` (called on the meta device: their weights are loaded afterwards)."""

    def residual_dtype(self, config, dtype: torch.dtype) -> torch.dtype:
        """The dtype of the hidden states between blocks, in the model held in `dtype`: `dtype`, unless the model's
        own code widens them (T5 in float16 keeps its feed-forward output layer in float32, so that its hidden
        states are float32 from each stack's first block on). They travel between servers in it, and a stage's first
        block takes its input in `dtype` (`input_dtype`)."""
        return dtype

    def input_dtype(self, loaded: LoadedSpan, sub_span: BlockSpan) -> torch.dtype:
        """The dtype of the hidden states `sub_span` takes: the server's, or at a block past the first of its stage,
        the wider one between blocks (`residual_dtype`)."""
        if loaded.residual_dtype is None or any(stage.start == sub_span.start for stage in self.stages(loaded.config)):
            return loaded.dtype
        return loaded.residual_dtype

    def precision_rules(self, config) -> PrecisionRules | None:
        """How transformers holds the model's modules in lower precisions (which layers it quantizes, what it keeps
        in float32), for blocks cut from a transformers model; None: every linear layer is quantized, and every
        tensor takes the server's dtype."""
        return None

    def block_path(self, config, index: int) -> str:
        """Where block `index` is in the model `precision_rules` describes ("model.layers.3", "encoder.block.0")."""
        raise NotImplementedError(f"{type(self).__name__} has precision rules but no block paths")

    def build_helpers(self, config, device: torch.device, checkpoint: CheckpointIndex, span: BlockSpan) -> dict[str, nn.Module]:
        """Small modules a server needs besides its blocks (rotary embeddings, position biases, ...)."""
        return {}

    def check_fast_path(self, loaded: LoadedSpan) -> bool:
        """Whether `loaded` may run its blocks through a path faster than calling their modules, which this
        checks gives the very same outputs. By default there is none."""
        return False

    # Running a span

    @abstractmethod
    def new_session_state(self, loaded: LoadedSpan, sub_span: BlockSpan, max_length: int) -> SequenceState:
        """Creates what a session on `sub_span` keeps between steps."""

    @abstractmethod
    def check_inputs(
        self,
        loaded: LoadedSpan,
        inputs: Tensors,
        state: SequenceState | None,
        max_length: int | None,
        sub_span: BlockSpan,
        phase: str | None,
    ):
        """Raises `BadRequestError` naming what is wrong with a request's tensors for blocks `sub_span`
        (`state` is None for a forward without a session)."""

    @abstractmethod
    def forward(
        self, loaded: LoadedSpan, sub_span: BlockSpan, inputs: Tensors, state: SequenceState | None, phase: str | None
    ) -> Tensors:
        """Runs blocks `sub_span` on `inputs`; `state` is None for a forward without a session (then a model with
        phases runs all of them: the server measuring its speed does so)."""

    def batch_key(self, loaded: LoadedSpan, sub_span: BlockSpan, inputs: Tensors, state: SequenceState, phase: str | None):
        """A hashable value shared by session steps that `forward_batch` can run as one forward, or None for a step
        that runs alone (`forward`). By default every step runs alone."""
        return None

    def forward_batch(self, loaded: LoadedSpan, sub_span: BlockSpan, steps: list[tuple[Tensors, SequenceState]]) -> list[Tensors]:
        """Runs the steps of several sessions (checked, with one `batch_key`) as one forward; returns each one's
        outputs, the same as `forward` would within float tolerance. Leaves every state as it was if it raises."""
        raise NotImplementedError(f"{type(self).__name__} gives no step a batch_key")

    @abstractmethod
    def example_inputs(self, loaded: LoadedSpan) -> Tensors:
        """Inputs for one position of batch 1, used to measure the server's throughput."""

    # The client side

    @abstractmethod
    def client_skeleton(self, config) -> nn.Module:
        """The model's own class for `config`, built on the meta device (the client loads its own tensors)."""

    def client_stacks(self, config) -> tuple[ClientStack, ...]:
        """The stacks of blocks in `client_skeleton` that run in the swarm."""
        return ()

    def client_removed(self, config) -> tuple[str, ...]:
        """Other modules of `client_skeleton` whose work the swarm does (the client drops them)."""
        return ()

    def shared_tensor_names(self, config, checkpoint_names: Iterable[str]) -> list[str]:
        """Tensors that every server of a stage needs besides its blocks' own (published in one shared file)."""
        return []

    def client_tensor_names(self, config, checkpoint_names: Iterable[str]) -> dict[str, str]:
        """Checkpoint name -> name in the client model, for every tensor the client loads. By default every
        tensor that no block holds, under its own name."""
        names = list(checkpoint_names)
        held = {name for index in range(self.num_blocks(config)) for name in self.block_tensor_names(config, index, names)}
        return {name: name for name in names if name not in held}


def load_span(
    family: ModelFamily,
    config,
    checkpoint: CheckpointIndex,
    span: BlockSpan,
    dtype: torch.dtype,
    device,
    progress=None,
    quant_type: str = "none",
) -> LoadedSpan:
    """Builds blocks `span` with empty weights and fills them with their checkpoint tensors only, their linear
    layers quantized if `quant_type` says so (`swarm.quantization`)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        blocks = family.build_blocks(config, span)
    rules, quantized = family.precision_rules(config), 0
    for index, block in zip(span, blocks):
        names = family.block_tensor_names(config, index, checkpoint.file_of)
        stored = checkpoint.load(list(names))
        tensors = family.convert_block_tensors(config, {names[name]: tensor for name, tensor in stored.items()})
        try:
            block.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as error:
            raise ConfigurationError(f"block {index} does not match its checkpoint tensors: {error}") from None
        block.to(device=device, dtype=dtype).eval().requires_grad_(False)
        path = family.block_path(config, index) if rules is not None else ""
        if rules is not None:
            _keep_in_float32(block, tensors, rules, path, dtype, device)
        quantized += quantize_linears(block, quant_type, dtype, device, rules, path)
        if progress is not None:
            progress.update(1)
    if quant_type != "none":
        if not quantized:
            logger.warning(f"--quant-type {quant_type} leaves blocks {span} as they are: transformers quantizes none of their layers")
        return_freed_memory()
    helpers = family.build_helpers(config, device, checkpoint, span)
    for parameter in (parameter for helper in helpers.values() for parameter in helper.parameters()):
        # in the blocks' dtype, as in the whole model loaded in it (whose buffers, rotary frequencies, stay float32)
        parameter.data = parameter.data.to(dtype)
    loaded = LoadedSpan(config, span, nn.ModuleList(blocks), dtype, torch.device(device), helpers, quant_type=quant_type)
    if (residual := family.residual_dtype(config, dtype)) != dtype:
        loaded.residual_dtype = residual
    loaded.fast_path = quant_type == "none" and family.check_fast_path(loaded)  # fast paths read plain weights
    return loaded


def _keep_in_float32(block: nn.Module, tensors: Tensors, rules: PrecisionRules, path: str, dtype: torch.dtype, device):
    """Puts back in float32, from its checkpoint tensor, each tensor of `block` (at `path` in its model) that
    transformers keeps in float32 when it loads the model in `dtype`."""
    held = block.state_dict(keep_vars=True)  # its parameters and buffers themselves
    for name, tensor in tensors.items():
        if rules.keeps_in_float32(f"{path}.{name}", dtype):
            held[name].data = tensor.to(device=device, dtype=torch.float32)
