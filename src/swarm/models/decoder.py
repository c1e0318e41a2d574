"""Decoder-only causal LMs, served with no file of their own: any `*ForCausalLM` whose blocks are one list of layers.

The model's own class, built on the meta device, tells everything (`swarm.models.layout` reads it): where its
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
    output_layers   (k,)                               int64, optional: blocks whose outputs to return too
and the reply carries `hidden_states` of the same shape (and `layer_output.{i}` for the blocks asked for).
Each layer gets the mask of its attention type (`create_causal_mask` or `create_sliding_window_causal_mask`,
for the session's past), and the rotary embeddings the model computes for it. What transformers 5 leaves to a model's forward and cannot be read off
its classes (Bloom's and Falcon's alibi, Mixtral's per-expert checkpoints) is given as a thin adapter where the
family is registered (`swarm.models.FAMILIES`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from swarm.errors import UnsupportedModelError
from swarm.models.base import LAYER_OUTPUT, ClientStack, LoadedSpan, ModelFamily, Tensors
from swarm.models.checks import (
    check_hidden_states,
    check_mask,
    check_names,
    check_output_layers,
    check_position_ids,
    require,
)
from swarm.models.layout import DecoderLayout, build_model, read_layout
from swarm.models.stacking import StackedRows, unstack_layer
from swarm.models.state import SequenceState
from swarm.quantization import PrecisionRules
from swarm.spans import BlockSpan

logger = logging.getLogger(__name__)

MASKS = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
INPUTS = {"hidden_states", "position_ids", "attention_mask", "hypo_ids", "output_layers"}

# position_bias(config, hidden, mask, cache, positions, past, layer_idx, masks) -> (masks, alibi): a model whose
# forward gives its layers alibi biases (and may fold them into the masks); see `swarm.models.alibi`
PositionBias = Callable[..., tuple[dict, torch.Tensor | None]]
# fast_layer_forward(layer, hidden_states, attention_mask, position_embeddings, position_ids, cache) -> what
# `layer(...)` returns, computed with less overhead (see `swarm.models.llama`)
FastForward = Callable[..., torch.Tensor]


class DecoderFamily(ModelFamily):
    client_kind = "causal_lm"

    def __init__(
        self,
        convert_tensors: Callable[[Tensors], Tensors] | None = None,
        position_bias: PositionBias | None = None,
        returns: int = 0,
        fast_paths: dict[type, FastForward] | None = None,
    ):
        self.convert_tensors = convert_tensors  # a block's checkpoint tensors -> the layout transformers builds
        self.position_bias = position_bias
        self.returns = returns  # what a layer returns: 0 for its hidden states, n for a tuple of n
        self.fast_paths = fast_paths or {}  # exact layer class -> its checked fast forward
        self._layouts: dict[int, tuple[object, DecoderLayout]] = {}  # id(config) -> (config, its layout)

    def layout(self, config) -> DecoderLayout:
        """The layout of `config`'s model (read once per config object), or `UnsupportedModelError`."""
        if id(config) not in self._layouts:
            layout = read_layout(config, self.position_bias is not None, self.convert_tensors is not None)
            self._layouts[id(config)] = (config, layout)
        return self._layouts[id(config)][1]

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

    def precision_rules(self, config) -> PrecisionRules:
        return self.layout(config).precision

    def block_path(self, config, index: int) -> str:
        return f"{self.layout(config).layers}.{index}"

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
        check_output_layers(inputs.get("output_layers"), self.num_blocks(loaded.config))
        if state is not None:
            state.check_step(inputs.get("hypo_ids"), batch, tokens, max_length)
        else:
            require("hypo_ids" not in inputs, "hypo_ids only make sense in a session")

    def forward(self, loaded: LoadedSpan, sub_span: BlockSpan, inputs: Tensors, state, phase) -> Tensors:
        hidden = inputs["hidden_states"].to(loaded.device)
        batch, tokens = hidden.shape[:2]
        past = state.length if state is not None else 0
        positions = _positions(inputs, past, tokens, loaded.device)
        mask, cache = inputs.get("attention_mask"), None
        if state is not None:
            if (hypo_ids := inputs.get("hypo_ids")) is not None:
                state.reorder(hypo_ids.to(loaded.device))
            state.trim_windows()
            mask, cache = state.mask_with(mask, batch, tokens), state.cache
        mask = mask.to(loaded.device) if mask is not None else None
        hidden, outputs = self._run_layers(loaded, sub_span, hidden, mask, cache, positions, past, _wanted(inputs))
        if state is not None:
            state.advance(mask, batch, tokens)
        return {"hidden_states": hidden, **outputs}

    def batch_key(self, loaded: LoadedSpan, sub_span: BlockSpan, inputs: Tensors, state, phase):
        """Steps of one span and one number of new tokens batch, for models whose sessions keep transformers' plain
        caches (full attention and sliding windows); see `swarm.models.stacking`."""
        if type(state.cache) is not DynamicCache:
            return None
        if any(type(state.cache.layers[index]) not in (DynamicLayer, DynamicSlidingWindowLayer) for index in sub_span):
            return None
        return sub_span, inputs["hidden_states"].shape[1]

    def forward_batch(self, loaded: LoadedSpan, sub_span: BlockSpan, steps: list[tuple[Tensors, SequenceState]]) -> list[Tensors]:
        """Stacks the sessions' rows and caches (`swarm.models.stacking`); each row keeps its own positions, mask and
        beam order (`hypo_ids`). The sessions' caches are replaced only once every block has run."""
        device, stacked = loaded.device, StackedRows.of(steps, loaded.device)
        hidden = torch.cat([inputs["hidden_states"].to(device) for inputs, _ in steps])
        positions = [_positions(inputs, state.length, stacked.tokens, device).expand(batch, stacked.tokens)
                     for (inputs, state), batch in zip(steps, stacked.rows)]  # fmt: skip
        cache = DynamicCache(config=loaded.config)
        for index in sub_span:
            stacked.stack(cache.layers[index], [state.cache.layers[index] for _, state in steps])
        wanted = set().union(*(_wanted(inputs) for inputs, _ in steps))
        mask = stacked.mask(device)
        hidden, outputs = self._run_layers(loaded, sub_span, hidden, mask, cache, torch.cat(positions), stacked.past, wanted)
        results = []
        for (inputs, state), own_rows, order, own_mask in zip(steps, stacked.slices(), stacked.orders, stacked.masks):
            for index in sub_span:
                unstack_layer(cache.layers[index], state.cache.layers[index], own_rows, state.length, stacked.tokens, stacked.past)
            if order is not None:
                state.kept = {name: tensor[order.to(tensor.device)] for name, tensor in state.kept.items()}
            state.advance(own_mask, own_rows.stop - own_rows.start, stacked.tokens)
            names = [LAYER_OUTPUT.format(index) for index in _wanted(inputs)]
            results.append({"hidden_states": hidden[own_rows], **{name: outputs[name][own_rows] for name in names if name in outputs}})
        return results

    def _run_layers(self, loaded: LoadedSpan, sub_span: BlockSpan, hidden, mask, cache, positions, past: int, wanted: set[int]):
        """Runs blocks `sub_span` on new positions after `past` ones (with the masks, biases and rotary embeddings
        the model makes for them); returns the hidden states and the outputs of the blocks in `wanted`."""
        layout = self.layout(loaded.config)
        kinds = {index: layout.layer_types[index] for index in sub_span}
        first_of_kind = {kind: next(index for index in sub_span if kinds[index] == kind) for kind in set(kinds.values())}
        masks = {kind: self._mask(loaded, kind, hidden, mask, cache, positions, index) for kind, index in first_of_kind.items()}
        alibi = None
        if self.position_bias is not None:
            masks, alibi = self.position_bias(loaded.config, hidden, mask, cache, positions, past, sub_span.start, masks)
        embeddings = self._rotary(loaded, layout, hidden, positions, set(first_of_kind))
        outputs = {}
        for index, block in zip(sub_span, loaded.blocks_of(sub_span)):
            kind = kinds[index]
            if loaded.fast_path:
                hidden = self.fast_paths[type(block)](block, hidden, masks[kind], embeddings[kind], positions, cache)
            else:
                hidden = self._call_layer(loaded, block, hidden, masks[kind], embeddings[kind], positions, cache, alibi)
            if index in wanted:
                outputs[LAYER_OUTPUT.format(index)] = hidden
        return hidden, outputs

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
        if isinstance(output, tuple) != (self.returns > 0):
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


def _positions(inputs: Tensors, past: int, tokens: int, device) -> torch.Tensor:
    """The new tokens' positions: those the request gives, or the next ones after `past`."""
    positions = inputs.get("position_ids")
    return (positions if positions is not None else torch.arange(past, past + tokens).unsqueeze(0)).to(device)


def _wanted(inputs: Tensors) -> set[int]:
    """The blocks whose outputs a request asks for too."""
    return set(inputs["output_layers"].tolist()) if "output_layers" in inputs else set()
