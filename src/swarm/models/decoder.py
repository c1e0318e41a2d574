"""Decoder-only causal LMs, served with no file of their own: any `*ForCausalLM` whose blocks are one list of layers.

The model's own class (`AutoModelForCausalLM.from_config`, on the meta device) tells everything: where its
layers are (`model.layers`, `transformer.h`, `gpt_neox.layers`, `model.decoder.layers`), its rotary embedding
module if it has one, the keywords its layers take, and the attention implementation it supports. A server
takes its blocks from that model, so each keeps its global layer index (which decides its structure: sliding
or full attention, dense or MoE); a session keeps transformers' own cache for the whole model
(`DynamicCache(config=...)`: empty below the server's first layer, sliding layers keep only their window).
The client keeps the model's own embeddings, final norm and head with their own code (embedding scale, logit
softcapping and scaling included) and replaces the list of layers by one call to the swarm.

A request to a span carries:
    hidden_states   (batch, new_tokens, hidden_size)  in the server's dtype
    position_ids    (batch or 1, new_tokens)           int64, optional (default: next positions)
    attention_mask  (batch, new_tokens)                0/1 for the new tokens, optional (default: all 1)
    hypo_ids        (batch,)                           int64, optional: reorders a session's cache first
and the reply carries `hidden_states` of the same shape. Each layer gets the mask of its attention type
(`create_causal_mask` or `create_sliding_window_causal_mask`, for the session's past), and the rotary
embeddings the model computes for it. What transformers 5 leaves to a model's forward and cannot be read off
its classes (Bloom's and Falcon's alibi, Mixtral's per-expert checkpoints) is given as a thin adapter where the
family is registered (`swarm.models.FAMILIES`).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from swarm.errors import UnsupportedModelError
from swarm.models.base import ClientStack, LoadedSpan, ModelFamily, Tensors
from swarm.models.checks import check_hidden_states, check_mask, check_names, check_position_ids, require
from swarm.models.state import SequenceState
from swarm.spans import BlockSpan

logger = logging.getLogger(__name__)

MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
CACHE_KEYWORDS = ("cache", "layer_past", "past_key_values")  # what layers of different ages call their cache
# the arguments a server gives a layer; a layer that requires any other one is not served
KNOWN_ARGUMENTS = {"hidden_states", "attention_mask", "position_embeddings", "position_ids", "use_cache", "alibi"}
INPUTS = {"hidden_states", "position_ids", "attention_mask", "hypo_ids"}

# position_bias(config, hidden, mask, cache, positions, past, layer_idx, masks) -> (masks, alibi): a model whose
# forward gives its layers alibi biases (and may fold them into the masks); see `swarm.models.alibi`
PositionBias = Callable[..., tuple[dict, torch.Tensor | None]]
# fast_layer_forward(layer, hidden_states, attention_mask, position_embeddings, position_ids, cache) -> what
# `layer(...)` returns, computed with less overhead (see `swarm.models.llama`)
FastForward = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class DecoderLayout:
    """Where a causal LM keeps its parts and how its layers are called, read off its own class."""

    layers: str  # the nn.ModuleList of layers ("model.layers", "transformer.h", ...)
    rotary: str | None  # the rotary embedding module, None for learned or alibi positions
    rotary_per_layer_type: bool  # the rotary module takes a layer type (gemma3: one base per attention type)
    layer_types: tuple[str, ...]  # every layer's attention type, as transformers' caches see them
    parameters: frozenset[str]  # what a layer's forward takes
    cache_keyword: str  # the name it takes its cache by
    rename: Callable[[str], str]  # checkpoint tensor name -> the model's own, by transformers' loading rules


class DecoderFamily(ModelFamily):
    client_kind = "causal_lm"

    def __init__(
        self,
        convert_tensors: Callable[[Tensors], Tensors] | None = None,
        position_bias: PositionBias | None = None,
        returns: int = 1,
        fast_paths: dict[type, FastForward] | None = None,
    ):
        self.convert_tensors = convert_tensors  # a block's checkpoint tensors -> the layout transformers builds
        self.position_bias = position_bias
        self.returns = returns  # what a layer returns: 1 for its hidden states, n for a tuple of n
        self.fast_paths = fast_paths or {}  # exact layer class -> its checked fast forward
        self._layouts: dict[int, tuple[object, DecoderLayout]] = {}  # id(config) -> (config, its layout)

    def layout(self, config) -> DecoderLayout:
        """The layout of `config`'s model (read once per config object), or `UnsupportedModelError`."""
        if id(config) not in self._layouts:
            self._layouts[id(config)] = (config, self._read_layout(config))
        return self._layouts[id(config)][1]

    def _read_layout(self, config) -> DecoderLayout:
        model_type = getattr(config, "model_type", None)
        model = build_model(config)
        count = getattr(config, "num_hidden_layers", None)
        stacks = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module) == count]
        if len(stacks) != 1:
            raise UnsupportedModelError(model_type, f"swarm finds no single list of its {count} layers in {type(model).__name__}")
        layers = model.get_submodule(stacks[0])
        owner = model.get_submodule(stacks[0].rpartition(".")[0])
        if len({type(layer) for layer in layers}) != 1:
            raise UnsupportedModelError(model_type, "its layers are of several classes")
        conversions = get_model_conversion_mapping(model)
        signature = inspect.signature(type(layers[0]).forward)
        parameters = frozenset(signature.parameters) - {"self"}
        required = {
            name
            for name, parameter in signature.parameters.items()
            if parameter.default is parameter.empty and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
        } - {"self"}
        cache_keyword = next((name for name in CACHE_KEYWORDS if name in parameters), None)
        rotary = getattr(owner, "rotary_emb", None)
        problems = [
            f"its layers require {sorted(required - KNOWN_ARGUMENTS)}" if required - KNOWN_ARGUMENTS else None,
            "its layers take no cache" if cache_keyword is None else None,
            "its layers take rotary embeddings but it has no rotary_emb module"
            if "position_embeddings" in parameters and rotary is None
            else None,
            "its layers take alibi biases that swarm cannot compute for it"
            if "alibi" in parameters and self.position_bias is None
            else None,
            "transformers converts its checkpoints when it loads them (fused experts)"
            if self.convert_tensors is None and any(isinstance(rule, WeightConverter) for rule in conversions)
            else None,
        ]
        layer_types = tuple(get_layer_types_and_kwargs(config)[0])
        problems += [f"layers of type {kind!r}" for kind in sorted(set(layer_types) - set(MASKS))]
        if any(problems):
            raise UnsupportedModelError(model_type, "swarm cannot serve it: " + "; ".join(filter(None, problems)))
        config._attn_implementation = model.config._attn_implementation  # what the class supports (eager for gemma2)
        return DecoderLayout(
            layers=stacks[0],
            rotary=f"{stacks[0].rpartition('.')[0]}.rotary_emb" if rotary is not None else None,
            rotary_per_layer_type="layer_type" in inspect.signature(type(rotary).forward).parameters if rotary else False,
            layer_types=layer_types,
            parameters=parameters,
            cache_keyword=cache_keyword,
            rename=checkpoint_renamer(model, [rule for rule in conversions if isinstance(rule, WeightRenaming)]),
        )

    # The model and its blocks

    def prepare_config(self, config):
        self.layout(config)
        return config

    def num_blocks(self, config) -> int:
        return len(self.layout(config).layer_types)

    def block_tensor_names(self, config, index: int, checkpoint_names) -> dict[str, str]:
        """The tensors whose names transformers loads into `model.layers.{index}.*` (or `transformer.h.{index}.*`,
        ...): GPT-2's own checkpoints leave out `transformer.`, older ones call some tensors otherwise."""
        layout = self.layout(config)
        prefix = f"{layout.layers}.{index}."
        return {name: renamed[len(prefix) :] for name in checkpoint_names if (renamed := layout.rename(name)).startswith(prefix)}

    def convert_block_tensors(self, config, tensors: Tensors) -> Tensors:
        return self.convert_tensors(tensors) if self.convert_tensors is not None else tensors

    def build_blocks(self, config, span: BlockSpan) -> list[nn.Module]:
        layers = build_model(config).get_submodule(self.layout(config).layers)
        return [layers[index] for index in span]

    def build_helpers(self, config, device, checkpoint, span):
        rotary = self.layout(config).rotary
        return {"rotary": build_model(config).get_submodule(rotary).to(device)} if rotary else {}

    # Running a span

    def new_session_state(self, loaded: LoadedSpan, sub_span: BlockSpan, max_length: int) -> SequenceState:
        return SequenceState(cache=DynamicCache(config=loaded.config))

    def example_inputs(self, loaded: LoadedSpan) -> Tensors:
        hidden_size = loaded.config.hidden_size
        return {"hidden_states": torch.zeros(1, 1, hidden_size, dtype=loaded.dtype, device=loaded.device)}

    def check_inputs(self, loaded: LoadedSpan, inputs: Tensors, state, max_length, sub_span: BlockSpan, phase):
        batch, tokens = check_hidden_states(inputs, "hidden_states", loaded.config.hidden_size, loaded.dtype)
        check_names(inputs, INPUTS, "decoder blocks")
        check_position_ids(inputs.get("position_ids"), batch, tokens)
        check_mask(inputs.get("attention_mask"), "attention_mask", batch, tokens)
        if state is not None:
            state.check_step(inputs.get("hypo_ids"), batch, tokens, max_length)
        else:
            require("hypo_ids" not in inputs, "hypo_ids only make sense in a session")

    def forward(self, loaded: LoadedSpan, sub_span: BlockSpan, inputs: Tensors, state, phase) -> Tensors:
        layout = self.layout(loaded.config)
        hidden = inputs["hidden_states"].to(loaded.device)
        batch, tokens = hidden.shape[:2]
        past = state.length if state is not None else 0
        positions = inputs.get("position_ids")
        positions = (positions if positions is not None else torch.arange(past, past + tokens).unsqueeze(0)).to(loaded.device)
        mask, cache = inputs.get("attention_mask"), None
        if state is not None:
            if (hypo_ids := inputs.get("hypo_ids")) is not None:
                state.reorder(hypo_ids.to(loaded.device))
            mask, cache = state.mask_with(mask, batch, tokens), state.cache
        mask = mask.to(loaded.device) if mask is not None else None
        kinds = {index: layout.layer_types[index] for index in sub_span}
        first_of_kind = {kind: next(index for index in sub_span if kinds[index] == kind) for kind in set(kinds.values())}
        masks = {kind: self._mask(loaded, kind, hidden, mask, cache, positions, index) for kind, index in first_of_kind.items()}
        alibi = None
        if self.position_bias is not None:
            masks, alibi = self.position_bias(loaded.config, hidden, mask, cache, positions, past, sub_span.start, masks)
        embeddings = self._rotary(loaded, layout, hidden, positions, set(first_of_kind))
        for index, block in zip(sub_span, loaded.blocks_of(sub_span)):
            kind = kinds[index]
            if loaded.fast_path:
                hidden = self.fast_paths[type(block)](block, hidden, masks[kind], embeddings[kind], positions, cache)
                continue
            hidden = self._call_layer(loaded, block, hidden, masks[kind], embeddings[kind], positions, cache, alibi)
        if state is not None:
            state.advance(mask, batch, tokens)
        return {"hidden_states": hidden}

    def _mask(self, loaded: LoadedSpan, kind: str, hidden, mask, cache, positions, layer_idx: int):
        return MASKS[kind](
            config=loaded.config,
            inputs_embeds=hidden,
            attention_mask=mask,
            cache=cache,
            position_ids=positions,
            layer_idx=layer_idx if cache is not None else None,
        )

    def _rotary(self, loaded: LoadedSpan, layout: DecoderLayout, hidden, positions, kinds: set[str]) -> dict:
        """Each attention type's (cos, sin), as the model computes them (None for a model without rotary)."""
        rotary = loaded.helpers.get("rotary")
        if rotary is None:
            return dict.fromkeys(kinds)
        if layout.rotary_per_layer_type:
            return {kind: rotary(hidden, positions, kind) for kind in kinds}
        return dict.fromkeys(kinds, rotary(hidden, positions))

    def _call_layer(self, loaded: LoadedSpan, block, hidden, mask, embeddings, positions, cache, alibi):
        """Calls a layer with the keywords it takes; returns its hidden states."""
        layout = self.layout(loaded.config)
        arguments = {"attention_mask": mask, layout.cache_keyword: cache}
        optional = {"position_embeddings": embeddings, "position_ids": positions, "use_cache": cache is not None, "alibi": alibi}
        arguments.update((name, value) for name, value in optional.items() if name in layout.parameters)
        output = block(hidden, **arguments)
        if isinstance(output, tuple) != (self.returns > 1):
            raise UnsupportedModelError(
                loaded.config.model_type, f"its layers return a {type(output).__name__}, which its family does not declare"
            )
        return output[0] if isinstance(output, tuple) else output

    def check_fast_path(self, loaded: LoadedSpan) -> bool:
        """Runs the first block as the layers are (prefills with and without padding, a step, a forward without a
        session), which also checks the model runs here at all; keeps the family's fast path for this layer class
        only if it gives bitwise the same outputs."""
        reference = self._probe(loaded, fast=False)
        if type(loaded.blocks[0]) not in self.fast_paths or len({type(block) for block in loaded.blocks}) != 1:
            return False
        try:
            same = all(map(torch.equal, reference, self._probe(loaded, fast=True)))
            reason = "its outputs differ"
        except Exception as error:
            same, reason = False, repr(error)
        finally:
            loaded.fast_path = False
        if not same:
            logger.warning(f"Not using the fast path on blocks {loaded.span}: {reason}; using the layers as they are")
        return same

    def _probe(self, loaded: LoadedSpan, fast: bool) -> list[torch.Tensor]:
        loaded.fast_path = fast
        first = BlockSpan(loaded.span.start, loaded.span.start + 1)
        generator = torch.Generator().manual_seed(0)
        prefill, step = (
            torch.randn(2, tokens, loaded.config.hidden_size, generator=generator).to(loaded.device, loaded.dtype)
            for tokens in (5, 1)
        )
        outputs = []
        with torch.inference_mode():
            for mask in (None, torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])):
                state = self.new_session_state(loaded, first, max_length=6)
                outputs.append(self.forward(loaded, first, {"hidden_states": prefill, "attention_mask": mask}, state, None))
                outputs.append(self.forward(loaded, first, {"hidden_states": step}, state, None))
            outputs.append(self.forward(loaded, first, {"hidden_states": prefill}, None, None))
        return [output["hidden_states"] for output in outputs]

    # The client side

    def client_skeleton(self, config) -> nn.Module:
        return build_model(config)

    def client_stacks(self, config) -> tuple[ClientStack, ...]:
        return (ClientStack(self.layout(config).layers, stage=0, returns=self.returns),)

    def client_tensor_names(self, config, checkpoint_names) -> dict[str, str]:
        """Every tensor outside the layers, under the name transformers loads it as."""
        layout = self.layout(config)
        return {name: renamed for name in checkpoint_names if not (renamed := layout.rename(name)).startswith(f"{layout.layers}.")}


def build_model(config) -> nn.Module:
    """`config`'s causal LM on the meta device (its non-persistent buffers, such as rotary frequencies, are real)."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config)
    except ValueError as error:
        raise UnsupportedModelError(getattr(config, "model_type", None), f"transformers has no causal LM for it ({error})") from None


def checkpoint_renamer(model: nn.Module, renamings: list[WeightRenaming]) -> Callable[[str], str]:
    """Checkpoint name -> `model`'s parameter name, as transformers renames them when it loads a checkpoint: its
    renaming rules (`embed_out` -> `lm_head` in GPT-NeoX, legacy `gamma`/`beta`, ...), and the base model's prefix
    added or dropped (`h.0.*` -> `transformer.h.0.*` in GPT-2's own checkpoints)."""
    names = dict.fromkeys(model.state_dict(), True)

    @functools.cache
    def rename(name: str) -> str:
        return rename_source_key(name, renamings, [], model.base_model_prefix, names)[0]

    return rename
