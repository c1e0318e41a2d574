"""Encoder-only models (BERT, RoBERTa, ViT, DINOv2, DPT, Depth Anything, ...), served with no file of their own.

The class the checkpoint names (`BertModel`, `BertForSequenceClassification`, `DepthAnythingForDepthEstimation`;
`AutoModel` when it names none), built on the meta device, tells where the layers are (`swarm.models.encoder_layout`
reads it): the one `nn.ModuleList` of the layer class that transformers records hidden states from
(`encoder.layer`, `backbone.encoder.layer`), each layer called with the hidden states and the model's attention
mask alone. Servers run those layers; the
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

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask

from swarm.models.base import LAYER_OUTPUT, ClientStack, LoadedSpan, ModelFamily, Tensors
from swarm.models.checks import check_hidden_states, check_mask, check_names, check_output_layers, require
from swarm.models.encoder_layout import EncoderLayout, ReadsOutputs, build_model, read_encoder_layout
from swarm.models.layout import tensors_under
from swarm.models.state import SequenceState
from swarm.quantization import PrecisionRules
from swarm.spans import BlockSpan


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
        layout = self.layout(config)
        return tensors_under(config.model_type, f"{layout.layers}.{index}.", checkpoint_names, layout.rename, layout.converted)

    def precision_rules(self, config) -> PrecisionRules:
        return self.layout(config).precision

    def block_path(self, config, index: int) -> str:
        return f"{self.layout(config).layers}.{index}"

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


def dpt_reads_outputs(config) -> list[int] | None:
    """DPT's neck reads the outputs of layers `backbone_out_indices` of its own ViT (a DPT built on a backbone
    class reads that backbone's feature maps instead)."""
    return (
        list(config.backbone_out_indices)
        if getattr(config, "backbone_config", None) is None or config.is_hybrid
        else None
    )
