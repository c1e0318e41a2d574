"""Encoder-only models (BERT, RoBERTa, ViT, DINOv2, DPT, Depth Anything, ...), served with no file of their own.

The class the checkpoint names (`BertModel`, `BertForSequenceClassification`, `DepthAnythingForDepthEstimation`;
`AutoModel` when it names none), built on the meta device, tells where the layers are: the one `nn.ModuleList`
of the layer class that transformers records hidden states from (`encoder.layer`, `backbone.encoder.layer`),
each layer called with the hidden states and the model's attention mask alone. Servers run those layers; the
client keeps everything else (embeddings, final norm, pooler, a classification head, a depth model's neck and
head) with its own code. There are no sessions: a request is one forward over whole sequences.

A request to a span carries:
    hidden_states   (batch, tokens, hidden_size)  in the server's dtype
    attention_mask  (batch, tokens)               0/1, optional (default: every position; padded batches)
    output_layers   (k,)                          int64, optional: blocks whose outputs the client reads
and the reply carries `hidden_states` of the same shape, and `layer_output.{i}` for each block i of the span in
`output_layers` (the intermediate hidden states a depth model's neck reads: only those cross the network).
Each server makes the 4-D mask as the model's own forward does (`create_bidirectional_mask`); layers that take
anything else from the model's forward (relative position biases, rotary embeddings) are refused with
`UnsupportedModelError`.
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
from transformers import AutoModel, PreTrainedModel
from transformers.backbone_utils import BackboneMixin
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from swarm.errors import UnsupportedModelError
from swarm.models.base import LAYER_OUTPUT, ClientStack, LoadedSpan, ModelFamily, Tensors
from swarm.models.checks import check_hidden_states, check_mask, check_names, check_output_layers, require
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

# reads_outputs(config) -> the layers whose outputs the model's head reads (indices in its list of layers), or None
ReadsOutputs = Callable[[object], list[int] | None]


@dataclass(frozen=True)
class EncoderLayout:
    layers: str  # the nn.ModuleList of layers in it ("encoder.layer", "bert.encoder.layer", "backbone.encoder.layer")
    owner: str  # the model whose call gives the attention mask ("" for the model itself)
    count: int
    hidden_size: int
    takes_mask: bool  # whether its layers take an attention mask (a ViT's in DPT take the hidden states alone)
    returns: int  # what a layer returns: 1, the hidden states; n, a tuple of n (FNet, MegatronBERT)
    config: object  # the configuration of the sub-model that holds them (a depth model's backbone has its own)
    reads_outputs: tuple[int, ...] | None  # the layers whose outputs the model's own code reads; None: any
    rename: Callable[[str], str]  # checkpoint tensor name -> the model's own, by transformers' loading rules
    converted: tuple[str, ...]  # checkpoint names that transformers rewrites while loading (swarm does not)


class EncoderFamily(ModelFamily):
    client_kind = "encoder"

    def __init__(self, reads_outputs: ReadsOutputs | None = None):
        self.reads_outputs = reads_outputs  # for a model whose head reads intermediate hidden states (DPT)
        self._layouts: dict[int, tuple[object, EncoderLayout]] = {}  # id(config) -> (config, its layout)

    def layout(self, config) -> EncoderLayout:
        if id(config) not in self._layouts:
            self._layouts[id(config)] = (config, read_encoder_layout(config, self.reads_outputs))
        return self._layouts[id(config)][1]

    def prepare_config(self, config):
        self.layout(config)
        return config

    def num_blocks(self, config) -> int:
        return self.layout(config).count

    def block_tensor_names(self, config, index: int, checkpoint_names) -> dict[str, str]:
        layout, checkpoint_names = self.layout(config), list(checkpoint_names)
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
        layers = build_model(config).get_submodule(self.layout(config).layers)
        return [layers[index] for index in span]

    def new_session_state(self, loaded: LoadedSpan, sub_span: BlockSpan, max_length: int) -> SequenceState:
        require(False, f"{loaded.config.model_type} blocks take plain forward requests, not sessions")

    def example_inputs(self, loaded: LoadedSpan) -> Tensors:
        hidden_size = self.layout(loaded.config).hidden_size
        return {"hidden_states": torch.zeros(1, 1, hidden_size, dtype=loaded.dtype, device=loaded.device)}

    def check_inputs(self, loaded: LoadedSpan, inputs: Tensors, state, max_length, sub_span: BlockSpan, phase):
        layout = self.layout(loaded.config)
        batch, tokens = check_hidden_states(inputs, "hidden_states", layout.hidden_size, loaded.dtype)
        allowed = {"hidden_states", "output_layers"} | ({"attention_mask"} if layout.takes_mask else set())
        check_names(inputs, allowed, f"{loaded.config.model_type} blocks")
        check_mask(inputs.get("attention_mask"), "attention_mask", batch, tokens)
        check_output_layers(inputs.get("output_layers"), layout.count)

    def forward(self, loaded: LoadedSpan, sub_span: BlockSpan, inputs: Tensors, state, phase) -> Tensors:
        layout = self.layout(loaded.config)
        hidden = inputs["hidden_states"].to(loaded.device)
        mask = inputs.get("attention_mask")
        if mask is not None:
            mask = create_bidirectional_mask(config=layout.config, inputs_embeds=hidden, attention_mask=mask.to(loaded.device))
        wanted = set(inputs["output_layers"].tolist()) if "output_layers" in inputs else set()
        outputs = {}
        for index, block in zip(sub_span, loaded.blocks_of(sub_span)):
            output = block(hidden, attention_mask=mask) if layout.takes_mask else block(hidden)
            hidden = output[0] if isinstance(output, tuple) else output
            if index in wanted:
                outputs[LAYER_OUTPUT.format(index)] = hidden
        return {"hidden_states": hidden, **outputs}

    # The client side: the same class, its layers in the swarm

    def client_skeleton(self, config) -> nn.Module:
        return build_model(config)

    def client_stacks(self, config) -> tuple[ClientStack, ...]:
        layout = self.layout(config)
        return (
            ClientStack(
                layout.layers,
                stage=0,
                inputs=("attention_mask",),
                owner=layout.owner,
                reads_outputs=layout.reads_outputs,
                returns=layout.returns,
            ),
        )

    def client_tensor_names(self, config, checkpoint_names) -> dict[str, str]:
        """Every tensor outside the layers, under the name the client's class loads it as."""
        layout = self.layout(config)
        return {
            name: renamed
            for name in checkpoint_names
            if not (renamed := layout.rename(name)).startswith(f"{layout.layers}.")
        }


def checkpoint_class(config) -> type | None:
    """The transformers class the checkpoint names, if it has one."""
    names = getattr(config, "architectures", None) or []
    return getattr(transformers, names[0], None) if names else None


def build_model(config) -> nn.Module:
    """The checkpoint's class (else `AutoModel`'s) for `config`, on the meta device."""
    from accelerate import init_empty_weights

    model_class = checkpoint_class(config)
    try:
        with init_empty_weights():
            return AutoModel.from_config(config) if model_class is None else model_class(config)
    except ValueError as error:
        raise UnsupportedModelError(
            getattr(config, "model_type", None), f"transformers has no model for it ({error})"
        ) from None


def recorded_layer_classes(model: nn.Module) -> set[type]:
    """The classes whose outputs transformers records as hidden states, in `model` and its sub-models."""
    classes = set()
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            specs = (getattr(type(module), "_can_record_outputs", None) or {}).get("hidden_states")
            for spec in specs if isinstance(specs, list) else [specs]:
                target = getattr(spec, "target_class", spec)
                if isinstance(target, type):
                    classes.add(target)
    return classes


@functools.cache
def _named_parameters(layer_class: type) -> frozenset[str]:
    signature = inspect.signature(layer_class.forward)
    return frozenset(
        name
        for name, parameter in signature.parameters.items()
        if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)
    ) - {"self"}


def _returns(layer: nn.Module, hidden_size: int, model_type: str | None) -> int:
    """How many values `layer` returns (1: a tensor), found by running it on the meta device."""
    mask = {"attention_mask": None} if "attention_mask" in _named_parameters(type(layer)) else {}
    try:
        with torch.no_grad():
            output = layer(torch.empty(1, 2, hidden_size, device="meta"), **mask)
    except Exception as error:
        raise UnsupportedModelError(model_type, f"swarm could not run its layer on the meta device to see what it returns ({error})") from None
    if isinstance(output, tuple) and len(output) == 1:  # FNet; `ClientStack.returns` cannot say so
        raise UnsupportedModelError(model_type, "its layers return a tuple of one tensor")
    return len(output) if isinstance(output, tuple) else 1


def read_encoder_layout(config, reads_outputs: ReadsOutputs | None = None) -> EncoderLayout:
    """The layout of `config`'s encoder, or `UnsupportedModelError` naming why swarm cannot serve it."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        raise UnsupportedModelError(model_type, "it is not an encoder-only model, and swarm has no family for it")
    model_class = checkpoint_class(config)
    if model_class is not None and model_class.__name__ in CAUSAL_LM_CLASSES:
        raise UnsupportedModelError(model_type, f"{model_class.__name__} is a causal LM")
    model = build_model(config)
    recorded = tuple(recorded_layer_classes(model))
    lists = {
        name: module for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and len(module) > 0
    }
    if recorded:
        stacks = [name for name, module in lists.items() if all(isinstance(layer, recorded) for layer in module)]
    else:
        stacks = [name for name, module in lists.items() if len(module) == getattr(config, "num_hidden_layers", None)]
    if len(stacks) != 1:
        raise UnsupportedModelError(model_type, f"swarm finds no single list of layers in {type(model).__name__}")
    layers = model.get_submodule(stacks[0])
    if len({type(layer) for layer in layers}) != 1:
        raise UnsupportedModelError(model_type, "its layers are of several classes")
    unknown = _named_parameters(type(layers[0])) - KNOWN_ARGUMENTS - LEFT_AT_DEFAULT
    if unknown:
        raise UnsupportedModelError(
            model_type, f"swarm cannot serve it: its layers take {sorted(unknown)} from its forward"
        )
    parts = stacks[0].split(".")
    paths = [".".join(parts[:end]) for end in range(len(parts))]
    models = [path for path in paths if isinstance(model.get_submodule(path), PreTrainedModel)]
    # the outermost model whose call takes an attention mask gives it as its user did (its forward makes the 4-D one)
    owner = next((path for path in models if "attention_mask" in _named_parameters(type(model.get_submodule(path)))), models[-1])
    layers_model = model.get_submodule(models[-1])  # the innermost: its config describes the layers
    count = getattr(layers_model.config, "num_hidden_layers", len(layers))
    if count != len(layers):  # ALBERT runs one group of layers num_hidden_layers times
        raise UnsupportedModelError(model_type, f"its forward runs {count} layers from a list of {len(layers)}")
    read = reads_outputs(config) if reads_outputs is not None else None
    backbones = [model.get_submodule(path) for path in models if isinstance(model.get_submodule(path), BackboneMixin)]
    if read is None and backbones:  # a backbone's stage 0 is the embeddings' output, stage i the output of layer i - 1
        stages = len(backbones[-1].stage_names)
        read = [index % stages - 1 for index in backbones[-1].out_indices if index % stages]
    config._attn_implementation = model.config._attn_implementation
    return EncoderLayout(
        layers=stacks[0],
        owner=owner,
        count=len(layers),
        hidden_size=layers_model.config.hidden_size,
        takes_mask="attention_mask" in _named_parameters(type(layers[0])),
        returns=_returns(layers[0], layers_model.config.hidden_size, model_type),
        config=layers_model.config,
        reads_outputs=tuple(read) if read is not None else None,
        rename=loading_renamer(model),
        converted=converted_patterns(model),
    )


def dpt_reads_outputs(config) -> list[int] | None:
    """DPT's neck reads the outputs of layers `backbone_out_indices` of its own ViT (a DPT built on a backbone
    class reads that backbone's feature maps instead)."""
    return (
        list(config.backbone_out_indices)
        if getattr(config, "backbone_config", None) is None or config.is_hybrid
        else None
    )
