"""Depth estimation (DPT, Depth Anything): the backbone's layers in the swarm, the neck and head local, through two
real servers on 127.0.0.1 against the local Hugging Face model; only the hidden states the neck reads cross the
network."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import DPTImageProcessorPil, pipeline

from tests.conftest import served_model

ATOL = 1e-4
SPANS = ["0:2", "2:5"]
VIT = dict(hidden_size=32, num_hidden_layers=5, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8)
HEAD = dict(neck_hidden_sizes=[8, 16, 16, 16], fusion_hidden_size=16, head_hidden_size=8)
# name -> (model class, config, the layers whose outputs the neck reads)
MODELS = {
    "dpt": ("DPTForDepthEstimation", lambda: transformers.DPTConfig(**VIT, **HEAD, backbone_out_indices=[0, 2, 3, 4]), {0, 2, 3}),
    "depth_anything": (
        "DepthAnythingForDepthEstimation",
        lambda: transformers.DepthAnythingConfig(
            backbone_config=transformers.Dinov2Config(**VIT, out_indices=[1, 3, 4, 5], reshape_hidden_states=False),
            reassemble_hidden_size=32, patch_size=8, **HEAD,
        ),
        {0, 2, 3},
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(MODELS))
def served(request, tmp_path_factory, bootstrap_peers):
    class_name, make_config, _ = MODELS[request.param]
    directory = tmp_path_factory.mktemp("models") / request.param
    model_class = getattr(transformers, class_name)
    torch.manual_seed(0)
    model_class(make_config()).eval().save_pretrained(directory)
    DPTImageProcessorPil(size={"height": 32, "width": 32}, keep_aspect_ratio=False).save_pretrained(directory)
    local = model_class.from_pretrained(directory).eval()
    with served_model(directory, SPANS, bootstrap_peers, tmp_path_factory.mktemp("logs")) as model:
        yield request.param, model, local, directory


def test_depth_matches_local_and_only_read_layers_travel(served, monkeypatch):
    name, model, local, _ = served
    assert type(model).__name__ == type(local).__name__ and isinstance(model, type(local))
    returned = []
    forward = model.remote.forward

    def recording_forward(tensors, span=None):
        outputs = forward(tensors, span)
        returned.append(sorted(outputs))
        return outputs

    monkeypatch.setattr(model.remote, "forward", recording_forward)
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).predicted_depth, local(pixel_values).predicted_depth, atol=ATOL, rtol=0)
    expected = sorted(["hidden_states", *(f"layer_output.{index}" for index in MODELS[name][2])])
    assert returned == [expected]


def test_depth_estimation_pipeline_matches_local(served):
    _, model, local, directory = served
    processor = DPTImageProcessorPil.from_pretrained(directory)
    pixels = np.random.default_rng(2).integers(0, 256, (36, 44, 3), dtype=np.uint8)
    images = [Image.fromarray(pixels), Image.fromarray(pixels[:, ::-1].copy())]
    remote = pipeline("depth-estimation", model=model, image_processor=processor)(images)
    expected = pipeline("depth-estimation", model=local, image_processor=processor)(images)
    for got, want in zip(remote, expected):
        torch.testing.assert_close(got["predicted_depth"], want["predicted_depth"], atol=ATOL, rtol=0)
        difference = np.abs(np.asarray(got["depth"], dtype=int) - np.asarray(want["depth"], dtype=int))
        assert difference.max() <= 1  # the depth image: the map scaled to 0..255 and rounded
