"""Encoder-only models (BERT, RoBERTa, ViT, DINOv2, ...), served with no file of their own.

The model's own base class (`AutoModel.from_config`, on the meta device) tells where its layers are: the one
`nn.ModuleList` of `config.num_hidden_layers` layers (`encoder.layer`), each called with the hidden states and
the model's attention mask alone. Servers run those layers; the client keeps the embeddings, the final norm and
the pooler (or the head of the class the checkpoint names, `BertForSequenceClassification`, ...) with their own
code. There are no sessions: a request is one forward over whole sequences.

A request to a span carries:
    hidden_states   (batch, tokens, hidden_size)  in the server's dtype
    attention_mask  (batch, tokens)               0/1, optional (default: every position; padded batches)
and the reply carries `hidden_states` of the same shape. Each server makes the 4-D mask as the model's own
forward does (`create_bidirectional_mask`); layers that take anything else from the model's forward (relative
position biases, rotary embeddings) are refused with `UnsupportedModelError`.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import transformers
from torch import nn
from transformers import AutoModel
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from swarm.errors import UnsupportedModelError
from swarm.models.base import ClientStack, LoadedSpan, ModelFamily, Tensors
from swarm.models.checks import check_hidden_states, check_mask, check_names, require
from swarm.models.layout import converted_patterns, loading_renamer
from swarm.models.state import SequenceState
from swarm.spans import BlockSpan

# what a layer may take: the hidden states and the mask, and what an encoder's forward leaves at its default
KNOWN_ARGUMENTS = {"hidden_states", "attention_mask"}
LEFT_AT_DEFAULT = {
    "encoder_hidden_states",
    "encoder_attention_mask",
    "output_attentions",
    "cache",
    "past_key_values",
    "head_mask",
}
CAUSAL_LM_CLASSES = {
    name
    for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    for name in ([names] if isinstance(names, str) else names)
}


@dataclass(frozen=True)
class EncoderLayout:
    layers: str  # the nn.ModuleList of layers in the base model ("encoder.layer")
    rename: Callable[[str], str]  # checkpoint tensor name -> the base model's own, by transformers' loading rules
    converted: tuple[str, ...]  # checkpoint names that transformers rewrites while loading (swarm does not)


class EncoderFamily(ModelFamily):
    client_kind = "encoder"

    def __init__(self):
        self._layouts: dict[int, tuple[object, EncoderLayout]] = {}  # id(config) -> (config, its layout)

    def layout(self, config) -> EncoderLayout:
        if id(config) not in self._layouts:
            self._layouts[id(config)] = (config, read_encoder_layout(config))
        return self._layouts[id(config)][1]

    def prepare_config(self, config):
        self.layout(config)
        return config

    def num_blocks(self, config) -> int:
        return config.num_hidden_layers

    def block_tensor_names(self, config, index: int, checkpoint_names) -> dict[str, str]:
        layout = self.layout(config)
        checkpoint_names = list(checkpoint_names)
        converted = sorted(
            {name for name in checkpoint_names for pattern in layout.converted if re.search(pattern, name)}
        )
        if converted:
            raise UnsupportedModelError(
                config.model_type,
                f"transformers rewrites its checkpoint's {converted[:3]} while loading, which swarm does not",
            )
        prefix = f"{layout.layers}.{index}."
        return {
            name: renamed[len(prefix) :]
            for name in checkpoint_names
            if (renamed := layout.rename(name)).startswith(prefix)
        }

    def build_blocks(self, config, span: BlockSpan) -> list[nn.Module]:
        layers = build_base_model(config).get_submodule(self.layout(config).layers)
        return [layers[index] for index in span]

    def new_session_state(self, loaded: LoadedSpan, sub_span: BlockSpan, max_length: int) -> SequenceState:
        require(False, f"{loaded.config.model_type} blocks take plain forward requests, not sessions")

    def example_inputs(self, loaded: LoadedSpan) -> Tensors:
        return {"hidden_states": torch.zeros(1, 1, loaded.config.hidden_size, dtype=loaded.dtype, device=loaded.device)}

    def check_inputs(self, loaded: LoadedSpan, inputs: Tensors, state, max_length, sub_span: BlockSpan, phase):
        batch, tokens = check_hidden_states(inputs, "hidden_states", loaded.config.hidden_size, loaded.dtype)
        check_names(inputs, {"hidden_states", "attention_mask"}, "encoder blocks")
        check_mask(inputs.get("attention_mask"), "attention_mask", batch, tokens)

    def forward(self, loaded: LoadedSpan, sub_span: BlockSpan, inputs: Tensors, state, phase) -> Tensors:
        hidden = inputs["hidden_states"].to(loaded.device)
        mask = inputs.get("attention_mask")
        if mask is not None:
            mask = create_bidirectional_mask(
                config=loaded.config, inputs_embeds=hidden, attention_mask=mask.to(loaded.device)
            )
        for block in loaded.blocks_of(sub_span):
            output = block(hidden, attention_mask=mask)
            hidden = output[0] if isinstance(output, tuple) else output
        return {"hidden_states": hidden}

    # The client side: the class the checkpoint names (the base model, or one with a head), its layers in the swarm

    def client_skeleton(self, config) -> nn.Module:
        from accelerate import init_empty_weights

        model_class = client_class(config)
        with init_empty_weights():
            return AutoModel.from_config(config) if model_class is None else model_class(config)

    def client_stacks(self, config) -> tuple[ClientStack, ...]:
        model = self.client_skeleton(config)
        owner = model.base_model_prefix if model.base_model is not model else ""
        layers = f"{owner}.{self.layout(config).layers}" if owner else self.layout(config).layers
        return (ClientStack(layers, stage=0, inputs=("attention_mask",), owner=owner),)

    def client_tensor_names(self, config, checkpoint_names) -> dict[str, str]:
        """Every tensor outside the layers, under the name the client's class loads it as."""
        layout, model = self.layout(config), self.client_skeleton(config)
        rename = loading_renamer(model)
        inside = f"{model.base_model_prefix}.{layout.layers}." if model.base_model is not model else f"{layout.layers}."
        return {name: renamed for name in checkpoint_names if not (renamed := rename(name)).startswith(inside)}


def client_class(config) -> type | None:
    """The transformers class the checkpoint names, if it has one; None for the base model (`AutoModel`)."""
    names = getattr(config, "architectures", None) or []
    return getattr(transformers, names[0], None) if names else None


def build_base_model(config) -> nn.Module:
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            return AutoModel.from_config(config)
    except ValueError as error:
        raise UnsupportedModelError(
            getattr(config, "model_type", None), f"transformers has no model for it ({error})"
        ) from None


@functools.cache
def _layer_parameters(layer_class: type) -> tuple[frozenset[str], frozenset[str]]:
    """(every parameter of `layer_class.forward`, its named ones)."""
    signature = inspect.signature(layer_class.forward)
    named = {
        name
        for name, parameter in signature.parameters.items()
        if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    }
    return frozenset(signature.parameters) - {"self"}, frozenset(named - {"self"})


def read_encoder_layout(config) -> EncoderLayout:
    """The layout of `config`'s encoder, or `UnsupportedModelError` naming every reason swarm cannot serve it."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        raise UnsupportedModelError(model_type, "it is not an encoder-only model, and swarm has no family for it")
    model_class = client_class(config)
    if model_class is not None and model_class.__name__ in CAUSAL_LM_CLASSES:
        raise UnsupportedModelError(model_type, f"{model_class.__name__} is a causal LM")
    model = build_base_model(config)
    count = getattr(config, "num_hidden_layers", None)
    stacks = [
        name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module) == count
    ]
    if len(stacks) != 1:
        raise UnsupportedModelError(
            model_type, f"swarm finds no single list of its {count} layers in {type(model).__name__}"
        )
    layers = model.get_submodule(stacks[0])
    if len({type(layer) for layer in layers}) != 1:
        raise UnsupportedModelError(model_type, "its layers are of several classes")
    _, named = _layer_parameters(type(layers[0]))
    unknown = named - KNOWN_ARGUMENTS - LEFT_AT_DEFAULT
    if unknown:
        raise UnsupportedModelError(
            model_type, f"swarm cannot serve it: its layers take {sorted(unknown)} from its forward"
        )
    config._attn_implementation = model.config._attn_implementation
    return EncoderLayout(layers=stacks[0], rename=loading_renamer(model), converted=converted_patterns(model))
