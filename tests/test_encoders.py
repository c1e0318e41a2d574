"""Encoder-only models (the generic encoder family), each through two real servers on 127.0.0.1 against the local
Hugging Face model: the model's own outputs and the feature-extraction pipelines within 1e-5.

Each model is tiny and random, with 5 layers cut into servers "0:2" and "2:5".
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from transformers import AutoConfig, BertTokenizer, ViTImageProcessorPil, pipeline

from swarm.errors import BadRequestError
from tests.conftest import served_model

ATOL = 1e-5
SPANS = ["0:2", "2:5"]
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz", "hello", "world", "swarm", "peer"]
TEXT = dict(
    vocab_size=len(WORDS),
    hidden_size=32,
    num_hidden_layers=5,
    num_attention_heads=4,
    intermediate_size=37,
    pad_token_id=0,
)
IMAGE = dict(
    hidden_size=32, num_hidden_layers=5, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8
)
# name -> (the class the checkpoint names, config class, settings); what the issue names, plus two that share the layout
MODELS = {
    "bert": ("BertModel", "BertConfig", TEXT),
    "roberta": ("RobertaModel", "RobertaConfig", {**TEXT, "pad_token_id": 1, "max_position_embeddings": 40}),
    "electra-classifier": ("ElectraForSequenceClassification", "ElectraConfig", {**TEXT, "embedding_size": 24, "num_labels": 3}),
    "vit": ("ViTModel", "ViTConfig", IMAGE),
    "deit": ("DeiTModel", "DeiTConfig", IMAGE),
    "dinov2": ("Dinov2Model", "Dinov2Config", {**IMAGE, "mlp_ratio": 2, "layerscale_value": 0.5}),
}  # fmt: skip
TEXT_MODELS = {"bert", "roberta", "electra-classifier"}


def make_model(directory, name: str):
    class_name, config_class, settings = MODELS[name]
    config = getattr(transformers, config_class)(**settings)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    getattr(transformers, class_name)(config).eval().save_pretrained(directory)
    if name in TEXT_MODELS:
        BertTokenizer(vocab={word: index for index, word in enumerate(WORDS)}).save_pretrained(directory)
    else:
        ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=sorted(MODELS))
def served(request, tmp_path_factory, bootstrap_peers):
    """(name, distributed model, local model, model folder) of one encoder, served by two servers."""
    directory = make_model(tmp_path_factory.mktemp("models") / f"tiny-{request.param}", request.param)
    local = getattr(transformers, MODELS[request.param][0]).from_pretrained(directory).eval()
    with served_model(directory, SPANS, bootstrap_peers, tmp_path_factory.mktemp("logs")) as model:
        yield request.param, model, local, directory


def example_inputs(name: str) -> dict:
    if name in TEXT_MODELS:
        generator = torch.Generator().manual_seed(1)
        input_ids = torch.randint(5, len(WORDS), (3, 9), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, 6:] = 0  # a padded batch: the padding must not change the other positions
        attention_mask[2, 3:] = 0
        return {"input_ids": input_ids, "attention_mask": attention_mask}
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}


def test_outputs_match_local(served):
    name, model, local, _ = served
    assert type(model).__name__ == type(local).__name__ and isinstance(model, type(local))
    inputs = example_inputs(name)
    with torch.no_grad():
        remote, expected = model(**inputs), local(**inputs)
    assert remote.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(remote[key], expected[key], atol=ATOL, rtol=0)
    if "input_ids" in inputs:  # a padded sequence gives what it gives alone
        with torch.no_grad():
            alone = model(input_ids=inputs["input_ids"][2:, :3])
        first = "logits" if "logits" in expected else "last_hidden_state"
        if first == "last_hidden_state":
            torch.testing.assert_close(alone[first][0], remote[first][2, :3], atol=ATOL, rtol=0)
        else:
            torch.testing.assert_close(alone[first][0], remote[first][2], atol=ATOL, rtol=0)


def test_hidden_states_match_local(served):
    """`output_hidden_states`: the servers return every block's output, recorded where the model's own would be."""
    name, model, local, _ = served
    inputs = example_inputs(name)
    with torch.no_grad():
        remote, expected = model(**inputs, output_hidden_states=True), local(**inputs, output_hidden_states=True)
    assert len(remote.hidden_states) == len(expected.hidden_states) == 6
    for got, want in zip(remote.hidden_states, expected.hidden_states):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_pipelines_match_local(served):
    name, model, local, directory = served
    if name in TEXT_MODELS:
        tokenizer = BertTokenizer.from_pretrained(directory)
        task = "text-classification" if "classifier" in name else "feature-extraction"
        inputs = ["hello world", "a swarm of peer peer peer", "b"]
        remote = pipeline(task, model=model, tokenizer=tokenizer)(inputs)
        expected = pipeline(task, model=local, tokenizer=tokenizer)(inputs)
    else:
        processor = ViTImageProcessorPil.from_pretrained(directory)
        pixels = np.random.default_rng(2).integers(0, 256, (40, 48, 3), dtype=np.uint8)
        images = [Image.fromarray(pixels), Image.fromarray(pixels[::-1].copy())]
        remote = pipeline("image-feature-extraction", model=model, image_processor=processor)(images)
        expected = pipeline("image-feature-extraction", model=local, image_processor=processor)(images)
    if name == "electra-classifier":
        assert [item["label"] for item in remote] == [item["label"] for item in expected]
        np.testing.assert_allclose([item["score"] for item in remote], [item["score"] for item in expected], atol=ATOL)
        return
    for got, want in zip(remote, expected):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=ATOL, rtol=0)


def test_sessions_are_refused(served):
    _, model, *_ = served
    with (
        pytest.raises(BadRequestError, match="plain forward requests"),
        model.inference_session(max_length=8) as session,
    ):
        session.step({"hidden_states": torch.zeros(1, 1, 32)})


def test_the_client_picks_the_encoder_family_by_the_class_the_checkpoint_names(tmp_path):
    """A BERT checkpoint of `BertModel` is an encoder; the same model type saved as a causal LM stays a decoder."""
    from swarm.models import family_for
    from swarm.models.decoder import DecoderFamily
    from swarm.models.encoder import EncoderFamily

    config = AutoConfig.from_pretrained(make_model(tmp_path / "bert", "bert"))
    assert isinstance(family_for(config), EncoderFamily)
    config.architectures = ["BertLMHeadModel"]
    assert isinstance(family_for(config), DecoderFamily)


def test_bad_requests_get_clear_errors_and_the_servers_keep_serving(served):
    _, model, local, _ = served
    width = local.config.hidden_size
    bad = [
        ({"hidden_states": torch.zeros(1, 3, width + 1)}, "hidden_states must have shape"),
        ({"hidden_states": torch.zeros(1, 3, width), "output_layers": torch.tensor([0.5])}, "output_layers must be int64"),
        ({"hidden_states": torch.zeros(1, 3, width), "position_ids": torch.zeros(1, 3, dtype=torch.int64)}, "unexpected tensors"),
    ]
    for tensors, message in bad:
        with pytest.raises(BadRequestError, match=message):
            model.remote.forward(tensors)
    test_outputs_match_local(served)
