"""What every distributed model shares: it is the model's own class, with its stacks of blocks in the swarm.

A distributed model is an instance of the model's own class (`LlamaForCausalLM`, `T5ForConditionalGeneration`,
...), built on the meta device by its family (`ModelFamily.client_skeleton`). Each stack of blocks the family
names (`client_stacks`) is replaced by a `RemoteStack`: the model's own forward runs its embeddings, norms and
head here, exactly as their code says, and the `RemoteStack` sends the hidden states through the servers of
its stage. Only the tensors that no block holds are loaded. The instance's class is the model's class with a
mixin in front (`distributed_class`), under the same name, so `generate()` and `pipeline(...)` treat it as the
model itself; the mixin adds inference sessions, in which servers keep the KV cache and beam search reorders it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import threading
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY, _active_collector  # what a forward records

from swarm.checkpoint import CheckpointIndex
from swarm.client.joining import join_concurrent_calls
from swarm.client.remote import RemoteBlocks
from swarm.client.session import InferenceSession
from swarm.errors import ConfigurationError, UnsupportedModelError
from swarm.models.base import LAYER_OUTPUT, ClientStack, ModelFamily
from swarm.spans import BlockSpan

MASKS = ("attention_mask", "encoder_attention_mask")  # inputs that mean "all positions" when all ones
PER_POSITION = ("attention_mask", "position_ids")  # inputs a session step sends for its new positions only


class SwarmModelMixin:
    """Inference sessions for a distributed model; mixed in front of the model's own class."""

    family: ModelFamily
    remote: RemoteBlocks
    residual_dtype: torch.dtype  # what hidden states go to the swarm in (`ModelFamily.residual_dtype`)

    def attach_swarm(self, family: ModelFamily, remote: RemoteBlocks):
        self.family = family
        self.remote = remote
        self._swarm_local = threading.local()

    @classmethod
    def from_swarm(cls, path: Path, weights_path: Path, config, family: ModelFamily, remote: RemoteBlocks, dtype):
        """The client side of the model at `path`, its blocks served by `remote`'s swarm."""
        model = load_client_model(weights_path, config, family, remote, dtype, cls)
        head = model.get_output_embeddings() if isinstance(model, PreTrainedModel) else None
        if isinstance(head, nn.Linear):  # threads generating side by side (the HTTP API's requests) share its products
            join_concurrent_calls(head)
        model.name_or_path = str(path)  # where its tokenizer and other files are, as for a local model
        if (path / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(path)
        return model

    @property
    def session_span(self) -> BlockSpan:
        """The blocks an inference session runs: the last stage (the decoder of an encoder-decoder)."""
        return self.family.stages(self.config)[-1]

    @property
    def active_session(self) -> InferenceSession | None:
        return getattr(self._swarm_local, "session", None)

    def step_session(self) -> InferenceSession | None:
        """The session the current call steps (None inside a call made with `use_cache=False`)."""
        return None if getattr(self._swarm_local, "without_session", False) else self.active_session

    @contextlib.contextmanager
    def inference_session(self, max_length: int) -> Iterator[InferenceSession]:
        """A session whose servers keep the KV cache; `.generate()` calls inside it continue one conversation."""
        with InferenceSession(self.remote, max_length, self.session_span) as session, self._use_session(session):
            yield session

    @contextlib.contextmanager
    def _use_session(self, session: InferenceSession):
        previous = self.active_session
        self._swarm_local.session = session
        try:
            yield session
        finally:
            self._swarm_local.session = previous

    @contextlib.contextmanager
    def _without_session(self, without: bool):
        previous = getattr(self._swarm_local, "without_session", False)
        self._swarm_local.without_session = without
        try:
            yield
        finally:
            self._swarm_local.without_session = previous

    # How `generate()` meets the servers' caches

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the servers keep the cache; the local side has none

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        model_kwargs.setdefault("cache", None)  # a key, so that beam search calls `_reorder_cache`

    def _reorder_cache(self, cache, beam_idx: torch.Tensor):
        """Beam search keeps the beams `beam_idx`: the servers reorder their caches before the next step."""
        if self.active_session is not None:
            self.active_session.reorder(beam_idx)
        return cache


class SessionCache:
    """What `generate()`'s assisted decoding sees of the servers' caches: their length, and a `crop` that drops the
    draft tokens it did not accept (from every hop, with the next step)."""

    is_croppable = True
    is_compileable = False

    def __init__(self, session: InferenceSession):
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

    def activate_past_recording(self):
        pass  # the servers' caches keep what a crop of the last step needs (see `swarm.models.state`)

    def crop(self, tokens_to_remove: int):
        """Drops the last `-tokens_to_remove` positions (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of positions to drop, got {tokens_to_remove}")
        self.session.crop(self.session.position + tokens_to_remove)


class RemoteStack(nn.Module):
    """Stands in for a stack of blocks: called as the stack's first block, it runs them all in the swarm.

    What travels with the hidden states (`ClientStack.inputs`) is read from the arguments of the call to the
    stack's owner (the module whose forward loops over the blocks), captured by a forward pre-hook, and
    position ids from the call to the block when the owner computed them."""

    def __init__(self, model: SwarmModelMixin, stack: ClientStack, span: BlockSpan, runs_sessions: bool):
        super().__init__()
        self._model = [model]  # a list, so that the model is not registered as a submodule
        self.stack = stack
        self.span = span  # the blocks of the stack's stage
        self.runs_sessions = runs_sessions  # whether an active inference session runs this stack
        self._owner_signature: inspect.Signature | None = None
        self._calls = threading.local()

    def capture(self, owner: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of the owner: keeps the arguments of its call that travel to the servers."""
        if self._owner_signature is None:
            self._owner_signature = inspect.signature(owner.forward)
        arguments = self._owner_signature.bind_partial(*args, **kwargs).arguments
        self._calls.arguments = {name: arguments.get(name) for name in self.stack.inputs}

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        model = self._model[0]
        values = dict(getattr(self._calls, "arguments", None) or {})
        if kwargs.get("position_ids") is not None and "position_ids" in self.stack.inputs:
            values["position_ids"] = kwargs["position_ids"]
        session = model.step_session() if self.runs_sessions else None
        tokens, tensors = hidden_states.shape[1], {"hidden_states": hidden_states.to(model.residual_dtype)}
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and name in MASKS and value.ndim != 2:
                raise UnsupportedModelError(
                    getattr(model.config, "model_type", None), f"its forward gives its blocks a prepared {name}"
                )
            if name == "attention_mask" and isinstance(value, torch.Tensor) and session is None and value.shape[1] != tokens:
                raise UnsupportedModelError(
                    getattr(model.config, "model_type", None),
                    f"its attention_mask covers {value.shape[1]} positions, its blocks' hidden states {tokens}",
                )
            if not isinstance(value, torch.Tensor) or (name in MASKS and bool(value.all())):
                continue  # servers read a missing mask as all ones
            if session is not None and name in PER_POSITION:
                value = value[:, -tokens:]
            if session is None or session.position == 0 or name not in self.stack.kept:
                tensors[name] = value
        collector = _active_collector.get()  # what the model's forward records: hidden states, attentions, ...
        recorded = self._recorded(model, collector, session)
        if recorded:
            tensors["output_layers"] = torch.tensor([self.span.start + index for index in recorded])
        if session is not None:
            tensors["hypo_ids"] = session.take_hypo_ids()
            outputs = session.step(tensors)
        else:
            outputs = model.remote.forward(tensors, self.span)
        hidden = outputs["hidden_states"]
        if collector is not None and "hidden_states" in collector:
            self._record(collector, hidden_states, outputs, hidden)
        return hidden if self.stack.returns == 0 else (hidden, *[None] * (self.stack.returns - 1))

    def _recorded(self, model, collector: dict | None, session) -> list[int]:
        """The blocks (indices in the stack) whose outputs the servers return: those the model's forward records
        as hidden states and its code reads (the last block's output is the reply's hidden states anyway)."""
        model_type = getattr(model.config, "model_type", None)
        if collector is None:
            return []
        unsupported = set(collector) - {"hidden_states", "_hidden_states_layers"}
        if unsupported:
            raise UnsupportedModelError(model_type, f"the swarm does not return {sorted(unsupported)} of its blocks")
        if "hidden_states" not in collector:
            return []
        if session is not None:
            raise UnsupportedModelError(model_type, "the swarm returns no intermediate hidden states in an inference session")
        wanted = set(range(len(self.span) - 1))
        if (selection := collector.get("_hidden_states_layers")) is not None:
            wanted &= {index - 1 for index in selection}  # hidden state 0 is the first block's input
        if self.stack.reads_outputs is not None:
            wanted &= set(self.stack.reads_outputs)
        return sorted(wanted)

    def _record(self, collector: dict, first_input: torch.Tensor, outputs: dict, last: torch.Tensor):
        """Appends the stack's hidden states to `collector` as transformers' hooks on its blocks would: the first
        block's input, then each block's output (None where not selected or not returned)."""
        hidden_states, selection = collector["hidden_states"], collector.get("_hidden_states_layers")
        received = [outputs.get(LAYER_OUTPUT.format(self.span.start + index)) for index in range(len(self.span) - 1)]
        for state in ([first_input] if not hidden_states else []) + received + [last]:
            hidden_states.append(state if selection is None or len(hidden_states) in selection else None)


@functools.cache
def distributed_class(model_class: type, mixin: type) -> type:
    """`model_class` with `mixin` in front, under the model class's own name (a mixin that already derives from
    `model_class` is the class itself)."""
    if issubclass(mixin, model_class):
        return mixin
    return type(model_class.__name__, (mixin, model_class), {"__doc__": model_class.__doc__})


def load_client_model(weights_path: Path, config, family: ModelFamily, remote: RemoteBlocks, dtype, mixin: type):
    """Builds the family's client skeleton as `distributed_class(its class, mixin)`, puts its stacks in the
    swarm, and loads only its own tensors from the checkpoint at `weights_path`."""
    model = family.client_skeleton(config)
    model.__class__ = distributed_class(type(model), mixin)
    if isinstance(model, PreTrainedModel):  # transformers keeps what a model records by its class's name
        _CAN_RECORD_REGISTRY[model] = model._can_record_outputs
    model.attach_swarm(family, remote)
    stages = family.stages(config)
    for stack in family.client_stacks(config):
        stand_in = RemoteStack(model, stack, stages[stack.stage], runs_sessions=stack.stage == len(stages) - 1)
        parent_path, _, name = stack.path.rpartition(".")
        setattr(model.get_submodule(parent_path), name, nn.ModuleList([stand_in]))
        owner = model.get_submodule(parent_path if stack.owner is None else stack.owner)
        owner.register_forward_pre_hook(stand_in.capture, with_kwargs=True)
    for path in family.client_removed(config):
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, None)
    checkpoint = CheckpointIndex(weights_path)
    names = family.client_tensor_names(config, checkpoint.file_of)
    tensors = checkpoint.load(list(names), dtype)
    model.load_state_dict({names[name]: tensor for name, tensor in tensors.items()}, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # the model's own rule: its head to its embeddings, T5's stacks to `shared`, ...
    still_empty = [name for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()) if tensor.is_meta]
    if still_empty:
        raise ConfigurationError(f"the checkpoint at {weights_path} lacks client-side tensors {still_empty}")
    model.residual_dtype = family.residual_dtype(config, dtype)
    return model.to(dtype).eval().requires_grad_(False)
