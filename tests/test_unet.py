"""Stable Diffusion's UNet: its round trip against the local UNet without a network, then real servers on
127.0.0.1 against the local diffusers pipeline: the same image (within 1e-4), failover included."""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel

from swarm import AutoDistributedModel
from swarm.checkpoint import CheckpointIndex, DiffusersConfig, load_model_config, model_name_of
from swarm.client.config import ClientConfig
from swarm.client.diffusion import DistributedUNet2DConditionModel
from swarm.client.retry import RetryPolicy
from swarm.client.session import ServerSession, plan_requests
from swarm.errors import BadRequestError, ConfigurationError
from swarm.launch import LocalSwarm, start_server
from swarm.models import FAMILIES, family_for
from swarm.models.base import load_span
from swarm.spans import BlockSpan
from swarm.tiny_diffusion import TINY_UNET, make_stable_diffusion
from swarm.transport import Connection
from tests.conftest import ATOL
from tests.test_push import push_counts

HEIGHT, WIDTH = 72, 40  # 9x5 latents: odd, so up blocks upsample to sizes that are not twice their input
PROMPT = "the fox and the ox"


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return make_stable_diffusion(tmp_path_factory.mktemp("models") / "tiny-sd", unet=TINY_UNET)


@pytest.fixture(scope="module")
def local_pipe(tiny_sd):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps=3, **kwargs) -> np.ndarray:
    settings = dict(num_inference_steps=steps, height=HEIGHT, width=WIDTH, output_type="np", guidance_scale=7.5)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), **{**settings, **kwargs}).images


# The family's math, without a network


def unet_variants():
    """Besides Stable Diffusion's layout: SDXL-style embeddings (text and time ids) with linear projections and
    no mid block; unCLIP-style resnet up/downsamplers, simple cross-attention and an encoder projection."""
    common = dict(sample_size=8, block_out_channels=(16, 24), layers_per_block=1, norm_num_groups=8, attention_head_dim=4)
    return {
        "text-time": (UNet2DConditionModel(
            **common, cross_attention_dim=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=32 + 6 * 8, mid_block_type=None,
        ), (9, 5)),
        "simple-cross": (UNet2DConditionModel(
            **common, cross_attention_dim=32, encoder_hid_dim=24, encoder_hid_dim_type="text_proj",
            down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
            up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
            mid_block_type="UNetMidBlock2DSimpleCrossAttn", resnet_time_scale_shift="scale_shift",
        ), (8, 6)),
    }  # fmt: skip


def unet_inputs(unet_config, latent_size, batch=2):
    generator = torch.Generator().manual_seed(5)
    width = unet_config.encoder_hid_dim or unet_config.cross_attention_dim
    inputs = {
        "sample": torch.randn(batch, unet_config.in_channels, *latent_size, generator=generator),
        "timestep": torch.tensor(901),
        "encoder_hidden_states": torch.randn(batch, 7, width, generator=generator),
    }
    if unet_config.addition_embed_type == "text_time":
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=generator),
            "time_ids": torch.tensor([[72.0, 40.0, 0.0, 0.0, 72.0, 40.0]] * batch),
        }
    return inputs


def round_trip(directory, cuts: list[int], inputs: dict) -> torch.Tensor:
    """The client's embeddings, then the family's phases over spans cut at `cuts`, as a swarm would run them."""
    config, weights = load_model_config(directory, FAMILIES)
    family = family_for(config)
    checkpoint = CheckpointIndex(weights)
    bounds = [0, *cuts, family.num_blocks(config)]
    spans = [load_span(family, config, checkpoint, BlockSpan(start, end), torch.float32, "cpu") for start, end in zip(bounds, bounds[1:])]
    states = [family.new_session_state(loaded, loaded.span, 1) for loaded in spans]
    client = DistributedUNet2DConditionModel.from_swarm(weights, weights, config, family, None)
    with torch.no_grad():
        step, encoder = client._embed(
            inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], None, None, inputs.get("added_cond_kwargs", {})
        )
        tensors = {**step, "encoder_hidden_states": encoder}
        for loaded, state in zip(spans, states):
            family.check_inputs(loaded, tensors, state, 1, loaded.span, "down")
            tensors |= family.forward(loaded, loaded.span, tensors, state, "down")
        tensors = {"sample": tensors["sample"]}
        for loaded, state in reversed(list(zip(spans, states))):
            family.check_inputs(loaded, tensors, state, 1, loaded.span, "up")
            tensors = family.forward(loaded, loaded.span, tensors, state, "up")
    return tensors["sample"]


def test_blocks_and_client_hold_every_tensor_once(tiny_sd):
    config, weights = load_model_config(tiny_sd, FAMILIES)
    family, names = family_for(config), list(CheckpointIndex(weights).file_of)
    owners = [name for index in range(family.num_blocks(config)) for name in family.block_tensor_names(config, index, names)]
    owners += family.client_tensor_names(config, names)
    assert sorted(owners) == sorted(names)
    assert set(family.block_tensor_names(config, 1, names).values()) >= {"down.resnets.0.conv1.weight", "upsamplers.0.conv.weight"}
    assert not any(name.startswith("up.upsamplers") for name in family.block_tensor_names(config, 1, names).values())
    assert model_name_of(tiny_sd / "unet") == model_name_of(tiny_sd) == "tiny-sd"


@pytest.mark.parametrize("cuts", [[], [1, 2, 3], [2], [3]], ids=["one-server", "every-block", "pairs-split", "mid-alone"])
def test_round_trip_matches_the_local_unet(tiny_sd, cuts):
    local = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").eval()
    inputs = unet_inputs(local.config, (9, 5))
    with torch.no_grad():
        expected = local(**inputs).sample
    torch.testing.assert_close(round_trip(tiny_sd, cuts, inputs), expected, atol=1e-5, rtol=0)


def test_a_sharded_unet_loads_each_block_from_its_shards(tiny_sd, tmp_path):
    local = UNet2DConditionModel.from_pretrained(tiny_sd / "unet").eval()
    local.save_pretrained(tmp_path / "unet", max_shard_size="40KB")
    checkpoint = CheckpointIndex(tmp_path / "unet")
    assert len(set(checkpoint.file_of.values())) > 3
    inputs = unet_inputs(local.config, (9, 5))
    with torch.no_grad():
        expected = local(**inputs).sample
    torch.testing.assert_close(round_trip(tmp_path / "unet", [2], inputs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", ["text-time", "simple-cross"])
def test_round_trip_matches_other_unet_layouts(tmp_path, variant):
    torch.manual_seed(0)
    local, latent_size = unet_variants()[variant]
    local.eval().save_pretrained(tmp_path / variant)
    inputs = unet_inputs(local.config, latent_size)
    with torch.no_grad():
        expected = local(**inputs).sample
    for cuts in ([], [1], [1, 2]):
        torch.testing.assert_close(round_trip(tmp_path / variant, cuts, inputs), expected, atol=1e-5, rtol=0)


def test_a_step_goes_down_the_route_and_back_up_turning_at_the_last_hop():
    phases = ("down", "up")
    assert plan_requests(3, phases, phases) == [
        (0, ("down",)), (1, ("down",)), (2, ("down", "up")), (1, ("up",)), (0, ("up",))
    ]  # fmt: skip
    assert plan_requests(1, phases, phases) == [(0, ("down", "up"))]
    # replaying what a lost hop in the middle was sent, over the two hops that replace it
    assert plan_requests(2, ("down",), phases) == [(0, ("down",)), (1, ("down",))]
    assert plan_requests(2, ("up",), phases) == [(1, ("up",)), (0, ("up",))]
    assert plan_requests(2, None, ()) == [(0, None), (1, None)]


def test_unsupported_blocks_are_a_configuration_error(tiny_sd):
    config, _ = load_model_config(tiny_sd, FAMILIES)
    values = {**config.values, "down_block_types": ["KDownBlock2D", "DownBlock2D", "DownBlock2D"]}
    with pytest.raises(ConfigurationError, match="KDownBlock2D"):
        family_for(config).prepare_config(DiffusersConfig(values))


# Real servers


@pytest.fixture(scope="module")
def sd_swarm(tiny_sd, tmp_path_factory):
    """Blocks 0:2 from the pipeline folder, 2:4 from the UNet's own folder: both serve model "tiny-sd"."""
    logs = tmp_path_factory.mktemp("logs")
    with LocalSwarm(tiny_sd, ["0:2"], log_dir=logs) as swarm:
        swarm.servers.append(start_server(tiny_sd / "unet", "2:4", swarm.initial_peers, log_path=logs / "unet-folder.log"))
        yield swarm


@pytest.fixture(scope="module")
def pipe(tiny_sd, sd_swarm):
    pipe = AutoDistributedModel.from_pretrained(tiny_sd, initial_peers=sd_swarm.initial_peers, coverage_timeout=30)
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    pipe.unet.remote.shutdown()


def test_auto_model_is_the_pipeline_with_its_unet_in_the_swarm(pipe):
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, DistributedUNet2DConditionModel) and isinstance(pipe.unet, UNet2DConditionModel)
    assert {name.split(".")[0] for name in pipe.unet.state_dict()} == {"time_embedding"}
    assert pipe.unet.config.in_channels == 4 and isinstance(pipe.text_encoder, CLIPTextModel)


def test_one_unet_step_matches_the_local_unet(pipe, local_pipe):
    inputs = unet_inputs(local_pipe.unet.config, (9, 5))
    with torch.no_grad():
        expected = local_pipe.unet(**inputs).sample
        torch.testing.assert_close(pipe.unet(**inputs).sample, expected, atol=ATOL, rtol=0)
        with pipe.unet.inference_session():
            for _ in range(2):
                torch.testing.assert_close(pipe.unet(**inputs).sample, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scheduler", ["pndm", "euler"])
def test_image_matches_the_local_pipeline(pipe, local_pipe, scheduler):
    original = local_pipe.scheduler
    if scheduler == "euler":  # float timesteps and scaled inputs
        pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
        local_pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
    histories = []

    def record_histories(pipeline, step, timestep, callback_kwargs):
        histories.append([len(server_session.history) for server_session in pipeline.unet.active_session._server_sessions])
        return callback_kwargs

    before = push_counts(pipe.unet.remote)
    try:
        image = generate(pipe, num_images_per_prompt=2, callback_on_step_end=record_histories)
        expected = generate(local_pipe, num_images_per_prompt=2)
    finally:
        pipe.scheduler = local_pipe.scheduler = original
    assert image.shape == (2, HEIGHT, WIDTH, 3) and image.std() > 0.05
    assert np.abs(image - expected).max() <= ATOL
    after = push_counts(pipe.unet.remote)
    for address in after:  # each step: 0:2 pushes its way down on to 2:4, which turns around and pushes back up
        pushed, received = (after[address][name] - before[address][name] for name in ("pushed", "received"))
        assert pushed == received == len(histories), f"{address} pushed {pushed} and received {received} of {len(histories)} steps"
    assert len(histories) >= 3 and all(lengths == [2, 1] for lengths in histories), (
        "only the first step, which sent the prompt embeddings, stays in the hops' histories"
    )


def test_distributed_unet_drops_into_a_pipeline(tiny_sd, sd_swarm, local_pipe):
    unet = DistributedUNet2DConditionModel.from_pretrained(tiny_sd / "unet", initial_peers=sd_swarm.initial_peers)
    try:
        components = {**local_pipe.components, "unet": unet}
        pipe = StableDiffusionPipeline(**components)
        pipe.set_progress_bar_config(disable=True)
        expected = generate(local_pipe, steps=2)
        assert np.abs(generate(pipe, steps=2) - expected).max() <= ATOL  # a session per UNet call
        with unet.inference_session():
            assert np.abs(generate(pipe, steps=2) - expected).max() <= ATOL
    finally:
        unet.remote.shutdown()


def test_the_way_back_needs_the_way_down_and_the_server_keeps_serving(sd_swarm, pipe, local_pipe):
    inputs = unet_inputs(local_pipe.unet.config, (9, 5), batch=1)
    connection = Connection(sd_swarm.servers[1].address, timeout=10)
    try:
        session_id = connection.request({"method": "open", "start": 2, "end": 4, "max_length": 1})[0]["session_id"]
        step = {"method": "step", "session_id": session_id}
        with pytest.raises(BadRequestError, match="way down first"):
            connection.request({**step, "phases": ["up"]}, {"sample": torch.zeros(2, 32, 3, 2)})
        with pytest.raises(BadRequestError, match="phases must be"):
            connection.request({**step, "phases": ["up", "down"]}, {"sample": torch.zeros(2, 32, 3, 2)})
        with pytest.raises(BadRequestError, match="encoder_hidden_states"):
            connection.request({**step, "phases": ["down"]}, {"sample": torch.zeros(2, 24, 3, 2), "emb": torch.zeros(2, 64)})
    finally:
        connection.close()
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(**inputs).sample, local_pipe.unet(**inputs).sample, atol=ATOL, rtol=0)


def peer_id(server) -> str:
    return server.wait_for(r"ready: .* peer (\S+)", timeout=1).group(1)


@pytest.mark.parametrize("push", [True, False], ids=["push", "relay"])
def test_servers_dying_between_steps_and_mid_step_keep_the_image(tiny_sd, local_pipe, tmp_path, monkeypatch, push):
    """Between steps, the two replicas of blocks 2:4 die one after the other (2:3 + 3:4 take over, the
    turnaround moving to the mid block's own server); then 0:2 dies between its way down and its way back,
    and 0:1 + 1:2 take over mid-step, replaying that step's way down before its way back. With push, the
    servers pass the samples to each other down and back up; with relay, the client sends every request."""
    with LocalSwarm(tiny_sd, ["0:2", "2:4", "2:4", "2:3", "3:4", "0:1", "1:2"], log_dir=tmp_path) as swarm:
        first_choices = {peer_id(server) for server in swarm.servers[:3]}  # routes by ping times would vary
        retry = RetryPolicy(max_attempts=5, base_delay=0.05, total_timeout=20)
        client_config = ClientConfig(retry=retry, pinned_peers=first_choices, push=push)
        pipe = AutoDistributedModel.from_pretrained(tiny_sd, initial_peers=swarm.initial_peers, client_config=client_config)
        pipe.set_progress_bar_config(disable=True)
        routes, killed, armed = [], [], []

        def kill(hop):
            victim = next(server for server in swarm.servers if server.address == hop.server.address)
            victim.signal(signal.SIGKILL)
            killed.append(victim.process.wait(5))

        def kill_between_steps(pipeline, step, timestep, callback_kwargs):
            route = pipeline.unet.active_session.route
            routes.append([str(hop.span) for hop in route])
            if step < 2:
                kill(route[1])
            armed.append(step == 2)  # during the next step, the first hop dies after its way down
            return callback_kwargs

        step_of_a_hop, reply_of_a_hop = ServerSession.step, ServerSession.receive_step

        def kill_after_the_way_down(server_session, phases):
            if armed and armed[-1] and phases == ("down",) and server_session.hop.span == BlockSpan(0, 2):
                armed.append(False)
                kill(server_session.hop)

        def step_then_die(server_session, remote, tensors, phases, step):
            reply = step_of_a_hop(server_session, remote, tensors, phases, step)
            kill_after_the_way_down(server_session, phases)
            return reply

        def reply_then_die(server_session, tensors, step, timeout, phases=None):
            reply = reply_of_a_hop(server_session, tensors, step, timeout, phases)
            kill_after_the_way_down(server_session, phases)
            return reply

        monkeypatch.setattr(ServerSession, "step", step_then_die)  # relay
        monkeypatch.setattr(ServerSession, "receive_step", reply_then_die)  # push
        try:
            image = generate(pipe, steps=4, callback_on_step_end=kill_between_steps)
        finally:
            pipe.unet.remote.shutdown()
    assert len(killed) == 3
    assert routes[:2] == [["0:2", "2:4"]] * 2, "a replica of 2:4 replaces the first one"
    assert routes[2] == ["0:2", "2:3", "3:4"], "then 2:3 and 3:4 replace the second one"
    assert routes[3:] == [["0:1", "1:2", "2:3", "3:4"]] * (len(routes) - 3), "then 0:1 and 1:2 replace 0:2"
    assert np.abs(image - generate(local_pipe, steps=4)).max() <= ATOL
