"""Encoder-decoder models with BART-style layers (Whisper, SpeechT5), cut into blocks numbered in execution order.

The class the checkpoint names (`WhisperForConditionalGeneration`, `SpeechT5ForTextToSpeech`), built on the meta
device, tells where the layers are: in its encoder (`model.get_encoder()`) and in its decoder, the one
`nn.ModuleList` of `config.encoder_layers` (`decoder_layers`) transformers layers. The encoder's layers come first,
then the decoder's (see `swarm.models.encoder_decoder` for the stacks, the requests and the sessions). What runs
before and after the layers (a convolutional front end, pre-nets, post-nets, the final norms, the head) stays on
the client, as its own code.

A model whose encoder gives its layers no mask (Whisper) takes none; one whose encoder gives them more than the mask
(SpeechT5's relative position bias) names, in its `EncoderExtras`, the modules of the encoder that compute it, which
every server of the encoder loads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer

from swarm.errors import UnsupportedModelError
from swarm.models.base import ClientStack, LoadedSpan
from swarm.models.encoder_decoder import DECODER, ENCODER, KEPT, DecoderStep, EncoderDecoderFamily, Keep
from swarm.models.encoder_layout import build_model
from swarm.models.layout import converted_patterns, loading_renamer, tensors_under
from swarm.quantization import PrecisionRules
from swarm.spans import BlockSpan


@dataclass(frozen=True)
class EncoderExtras:
    """What a model's encoder gives its layers besides the hidden states and the mask."""

    modules: tuple[str, ...]  # modules of the encoder's owner (the module that calls the layers) that compute it
    # make(modules by name, hidden_states) -> keyword arguments of each layer's call
    make: Callable[[dict[str, nn.Module], torch.Tensor], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Seq2SeqLayout:
    encoder_layers: str  # the nn.ModuleList of encoder layers in the checkpoint's class ("model.encoder.layers")
    decoder_layers: str
    encoder_count: int
    decoder_count: int
    hidden_size: int
    returns: int  # what a layer returns: 0, the hidden states; n, a tuple of n
    rename: Callable[[str], str]  # checkpoint tensor name -> the model's own, by transformers' loading rules
    converted: tuple[str, ...]  # checkpoint names that transformers rewrites while loading (swarm does not)
    precision: PrecisionRules  # how transformers holds its modules in lower precisions
    stacks: dict[str, str] = field(default_factory=dict)  # "encoder"/"decoder" -> its list of layers

    def owner(self, stack: str) -> str:
        return self.stacks[stack].rpartition(".")[0]


def _find_layers(model: nn.Module, part: nn.Module, count: int, what: str, model_type) -> str:
    """The path in `model` of the one list of `count` transformers layers inside `part` (its encoder or decoder)."""
    prefix = next(name for name, module in model.named_modules() if module is part)
    found = [
        f"{prefix}.{name}" if prefix else name
        for name, module in part.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) == count
        and all(isinstance(layer, GradientCheckpointingLayer) for layer in module)
    ]
    if len(found) != 1:
        raise UnsupportedModelError(model_type, f"swarm finds no single list of {count} {what} layers in it")
    return found[0]


def read_seq2seq_layout(config) -> Seq2SeqLayout:
    """Where `config`'s model keeps its encoder and decoder layers, or `UnsupportedModelError` naming why not."""
    model_type = getattr(config, "model_type", None)
    model = build_model(config)
    if not (hasattr(model, "get_encoder") and hasattr(model, "get_decoder")):
        raise UnsupportedModelError(model_type, f"{type(model).__name__} has no encoder and decoder")
    encoder = _find_layers(model, model.get_encoder(), config.encoder_layers, ENCODER, model_type)
    decoder = _find_layers(model, model.get_decoder(), config.decoder_layers, DECODER, model_type)
    returns = {_returns(model.get_submodule(path)[0], config.hidden_size) for path in (encoder, decoder)}
    if len(returns) != 1:
        raise UnsupportedModelError(model_type, "its encoder and decoder layers return different things")
    config._attn_implementation = model.config._attn_implementation
    return Seq2SeqLayout(
        encoder_layers=encoder,
        decoder_layers=decoder,
        encoder_count=config.encoder_layers,
        decoder_count=config.decoder_layers,
        hidden_size=config.hidden_size,
        returns=returns.pop(),
        rename=loading_renamer(model),
        converted=converted_patterns(model),
        precision=PrecisionRules.of(model),
        stacks={ENCODER: encoder, DECODER: decoder},
    )


def _returns(layer: nn.Module, hidden_size: int) -> int:
    """What `layer` returns (0: a tensor alone; n: a tuple of n), found by running it on the meta device."""
    with torch.no_grad():
        output = layer(torch.empty(1, 2, hidden_size, device="meta"), None)
    return len(output) if isinstance(output, tuple) else 0


class Seq2SeqFamily(EncoderDecoderFamily):

    def __init__(
        self,
        encoder_mask: bool = True,
        encoder_extras: EncoderExtras | None = None,
        client_kind: str = "seq2seq_lm",
        classes: tuple[str, ...] | None = None,
    ):
        self.client_kind = client_kind  # "text_to_speech" for a model whose generate() makes speech (SpeechT5)
        self.classes = classes  # the checkpoint classes served (None: any); the client kind drives those
        self.encoder_mask = encoder_mask  # whether the model's encoder gives its layers the attention mask
        self.encoder_extras = encoder_extras
        self._layouts: dict[int, tuple[object, Seq2SeqLayout]] = {}  # id(config) -> (config, its layout)

    def layout(self, config) -> Seq2SeqLayout:
        if id(config) not in self._layouts:
            self._layouts[id(config)] = (config, read_seq2seq_layout(config))
        return self._layouts[id(config)][1]

    def prepare_config(self, config):
        architecture = (getattr(config, "architectures", None) or [None])[0]
        if self.classes is not None and architecture not in self.classes:
            named = f"names {architecture}" if architecture else "names no class"
            raise UnsupportedModelError(config.model_type, f"swarm serves it as {' or '.join(self.classes)}; its checkpoint {named}")
        self.layout(config)
        return config

    def num_blocks(self, config) -> int:
        layout = self.layout(config)
        return layout.encoder_count + layout.decoder_count

    def encoder_blocks(self, config) -> int:
        return self.layout(config).encoder_count

    def width(self, config) -> int:
        return self.layout(config).hidden_size

    def encoder_takes_mask(self, config) -> bool:
        return self.encoder_mask

    def block_tensor_names(self, config, index: int, checkpoint_names) -> dict[str, str]:
        layout = self.layout(config)
        stack, position = self.stack_of(config, index)
        prefix = f"{layout.stacks[stack]}.{position}."
        return tensors_under(config.model_type, prefix, checkpoint_names, layout.rename, layout.converted)

    def precision_rules(self, config) -> PrecisionRules:
        return self.layout(config).precision

    def block_path(self, config, index: int) -> str:
        stack, position = self.stack_of(config, index)
        return f"{self.layout(config).stacks[stack]}.{position}"

    def build_blocks(self, config, span: BlockSpan) -> list[nn.Module]:
        model, layout = build_model(config), self.layout(config)
        return [model.get_submodule(layout.stacks[stack])[position] for stack, position in (self.stack_of(config, i) for i in span)]

    def _extras_names(self, config) -> dict[str, str]:
        """Checkpoint-side prefix -> module name, for each module of `encoder_extras`."""
        owner = self.layout(config).owner(ENCODER)
        return {f"{owner}.{name}.": name for name in self.encoder_extras.modules} if self.encoder_extras else {}

    def shared_tensor_names(self, config, checkpoint_names) -> list[str]:
        layout, prefixes = self.layout(config), self._extras_names(config)
        return [name for name in checkpoint_names if layout.rename(name).startswith(tuple(prefixes))]

    def build_helpers(self, config, device, checkpoint, span: BlockSpan):
        """The encoder's modules that compute its layers' extra inputs, for a server of encoder blocks."""
        if self.encoder_extras is None or self.stack_of(config, span.start)[0] != ENCODER:
            return {}
        layout, model = self.layout(config), build_model(config)
        owner = model.get_submodule(layout.owner(ENCODER))
        helpers = {}
        for prefix, name in self._extras_names(config).items():
            module = owner.get_submodule(name)
            names = [stored for stored in checkpoint.file_of if layout.rename(stored).startswith(prefix)]
            tensors = {layout.rename(stored)[len(prefix) :]: tensor for stored, tensor in checkpoint.load(names).items()}
            module.load_state_dict(tensors, strict=True, assign=True)
            helpers[name] = module.to(device).eval().requires_grad_(False)
        return helpers

    def run_encoder(self, loaded: LoadedSpan, sub_span: BlockSpan, hidden, mask, keep: Keep):
        mask = create_bidirectional_mask(config=loaded.config, inputs_embeds=hidden, attention_mask=mask)
        extras = self.encoder_extras.make(loaded.helpers, hidden) if self.encoder_extras else {}
        for index, block in zip(sub_span, loaded.blocks_of(sub_span)):
            hidden = _hidden(block(hidden, mask, **extras))
            keep(index, hidden)
        return hidden

    def run_decoder(self, loaded: LoadedSpan, sub_span: BlockSpan, hidden, step: DecoderStep, keep: Keep):
        encoder_hidden = step.kept["encoder_hidden_states"]
        self_cache = step.cache.self_attention_cache if step.cache is not None else None
        causal_mask = create_causal_mask(
            config=loaded.config,
            inputs_embeds=hidden,
            attention_mask=step.mask,
            cache=self_cache,
            layer_idx=self.stack_of(loaded.config, sub_span.start)[1],
        )
        cross_mask = create_bidirectional_mask(
            config=loaded.config,
            inputs_embeds=hidden,
            attention_mask=step.kept.get("encoder_attention_mask"),
            encoder_hidden_states=encoder_hidden,
        )
        for index, block in zip(sub_span, loaded.blocks_of(sub_span)):
            output = block(hidden, causal_mask, encoder_hidden, encoder_attention_mask=cross_mask, cache=step.cache, use_cache=step.cache is not None)
            hidden = _hidden(output)
            keep(index, hidden)
        return hidden

    # The client side: the checkpoint's class, both stacks of layers in the swarm

    def client_skeleton(self, config) -> nn.Module:
        return build_model(config)

    def client_stacks(self, config) -> tuple[ClientStack, ...]:
        layout = self.layout(config)
        return (
            ClientStack(
                layout.encoder_layers, stage=0, inputs=("attention_mask",) if self.encoder_mask else (), returns=layout.returns
            ),
            ClientStack(layout.decoder_layers, stage=1, inputs=("attention_mask", *KEPT), kept=KEPT, returns=layout.returns),
        )

    def client_tensor_names(self, config, checkpoint_names) -> dict[str, str]:
        """Every tensor outside the layers, under the name the client's class loads it as."""
        layout = self.layout(config)
        stacks = tuple(f"{path}." for path in layout.stacks.values())
        return {name: renamed for name in checkpoint_names if not (renamed := layout.rename(name)).startswith(stacks)}


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def speecht5_position_bias(modules: dict[str, nn.Module], hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """SpeechT5's encoder gives each layer a relative position bias computed from the sequence length."""
    return {"position_bias": modules["embed_positions"](hidden)}


SPEECHT5_EXTRAS = EncoderExtras(modules=("embed_positions",), make=speecht5_position_bias)
