"""Model distribution with real peers on loopback, one 127.0.0.x address each: publish, fetch only your blocks,
serve, survive the publisher leaving, a corrupt seeder and a killed one; and refuse what cannot be trusted."""

from __future__ import annotations

import hashlib
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import hivemind
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, T5ForConditionalGeneration

import swarm
from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.distribution.fetch import fetch_files, resolve
from swarm.distribution.manifest import ManifestError
from swarm.distribution.publish import TORRENT_FILE
from swarm.distribution.records import Announcement, Seeder, announce_model, announce_seeder, choose_announcement
from swarm.distribution.torrents import TorrentSession
from swarm.identity import Identity
from swarm.launch import PeerProcess, launch_server
from swarm.status import swarm_status
from tests.conftest import make_tiny_llama
from tests.test_t5 import make_tiny_t5

NAME = "tiny-published"
SPANS = ["0:2", "2:4", "4:5"]


def files_under(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


def same_tensors(first: Path, second: Path) -> bool:
    """Whether two checkpoint folders hold the same tensors, bit for bit (whatever their files)."""
    def tensors(folder):
        return {name: tensor for file in sorted(folder.rglob("*.safetensors")) for name, tensor in load_file(file).items()}

    left, right = tensors(first), tensors(second)
    return left.keys() == right.keys() and all(torch.equal(left[name], right[name]) for name in left)


@pytest.fixture(scope="module")
def dht_client(bootstrap_peers):
    dht = hivemind.DHT(initial_peers=bootstrap_peers, client_mode=True, start=True)
    yield dht
    dht.shutdown()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="module")
def publisher(original, bootstrap_peers, tmp_path_factory):
    """The model published from 127.0.0.2 by a `python -m swarm.publish` process."""
    work = tmp_path_factory.mktemp("publisher")
    args = ["-m", "swarm.publish", str(original), "--name", NAME, "--initial-peers", *bootstrap_peers,
            "--host", "127.0.0.2", "--work-dir", str(work / "published"), "--identity", str(work / "identity.key")]  # fmt: skip
    process = PeerProcess(args, name="publisher", log_path=work / "publisher.log")
    try:
        match = process.wait_for(r"published: (\S+) ([0-9a-f]{64})", timeout=120)
        assert match.group(1) == NAME
        yield process, match.group(2), work / "published" / "model"
    finally:
        process.stop()


@pytest.fixture(scope="module")
def fetching_servers(publisher, bootstrap_peers, tmp_path_factory):
    """Three servers started with the model's NAME only, each on its own address and with its own cache."""
    caches = [tmp_path_factory.mktemp(f"cache-{index}") for index in range(len(SPANS))]
    servers = [
        launch_server(NAME, span, bootstrap_peers, "--cache-dir", str(cache), host=f"127.0.0.{3 + index}")
        for index, (span, cache) in enumerate(zip(SPANS, caches))
    ]
    try:
        for server in servers:
            server.wait_ready(180)
        yield servers, caches
    finally:
        for server in servers:
            server.stop()


def test_split_layout_is_a_checkpoint_with_one_file_per_block(publisher, original):
    _, _, published = publisher
    assert files_under(published) == {
        *(f"block-{block:05d}.safetensors" for block in range(5)),
        "client.safetensors", "config.json", "generation_config.json", "model.safetensors.index.json",
    }  # fmt: skip
    assert set(load_file(published / "block-00003.safetensors")) == {
        name for name in load_file(original / "model.safetensors") if name.startswith("model.layers.3.")
    }
    assert same_tensors(published, original)


def test_servers_fetch_only_their_blocks_and_generate_like_the_local_model(fetching_servers, original, bootstrap_peers, tmp_path):
    _, caches = fetching_servers
    everywhere = {"client.safetensors", "config.json", "generation_config.json", "model.safetensors.index.json"}
    for span, cache in zip(SPANS, caches):
        start, end = map(int, span.split(":"))
        blocks = {f"block-{block:05d}.safetensors" for block in range(start, end)}
        assert files_under(cache) - {".swarm-announcement.json"} == everywhere | blocks
    config = ClientConfig(torrent_host="127.0.0.9")
    model = AutoDistributedModel.from_pretrained(NAME, initial_peers=bootstrap_peers, cache_dir=tmp_path, client_config=config)
    try:
        assert not any(path.startswith("block-") for path in files_under(tmp_path))
        local = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
        input_ids = torch.tensor([[5, 6, 7, 8, 9]])
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids).logits, local(input_ids).logits, atol=1e-4, rtol=0)
        assert torch.equal(model.generate(input_ids, max_new_tokens=8), local.generate(input_ids, max_new_tokens=8))
    finally:
        model.remote.shutdown()


def test_status_shows_who_seeds_which_blocks(fetching_servers, bootstrap_peers):
    status = swarm_status(bootstrap_peers)
    model = next(model for model in status.models if model.name == NAME)
    [publication] = model.publications
    seeded = {seeder.address.split(":")[0]: seeder for seeder in publication.seeders}
    assert seeded["127.0.0.2"].blocks == [[0, 5]]
    assert [seeded[f"127.0.0.{3 + index}"].blocks for index in range(3)] == [[[0, 2]], [[2, 4]], [[4, 5]]]
    assert all(seeder.client_files for seeder in publication.seeders)


def test_after_the_publisher_leaves_a_new_peer_fetches_everything(fetching_servers, publisher, original, bootstrap_peers, tmp_path):
    process, info_hash, _ = publisher
    process.stop()
    output = swarm.fetch(f"{NAME}@{info_hash}", bootstrap_peers, output=tmp_path / "fetched", host="127.0.0.10", timeout=120)
    assert same_tensors(output, original)
    local, fetched = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) for path in (original, output))
    assert all(torch.equal(a, b) for a, b in zip(local.state_dict().values(), fetched.state_dict().values()))


# Peers that lie or die


@pytest.fixture(scope="module")
def slow_original(tmp_path_factory):
    """Another model (the same model split the same way is the same torrent, which the servers above seed)."""
    return make_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-slow", intermediate_size=131)


@pytest.fixture(scope="module")
def seeded(slow_original, bootstrap_peers, tmp_path_factory):
    """It, published with an upload limit of 150 kB/s (so that downloads take seconds), seeded in this process
    from 127.0.0.20."""
    work = tmp_path_factory.mktemp("slow")
    publisher = swarm.publish(
        slow_original, "tiny-slow", bootstrap_peers, host="127.0.0.20", work_dir=work, identity=work / "identity.key",
        upload_rate_limit=150_000,
    )  # fmt: skip
    yield publisher
    publisher.stop()


def download(dht, name: str, host: str, destination: Path):
    """Fetches every file of `name`; returns what was fetched, the banned peers, the hash failures and the bytes
    downloaded (read before the session closes: closing removes the torrent, and its handle with it)."""
    session = TorrentSession(host)
    try:
        fetched = fetch_files(dht, session, name, lambda manifest: sorted(manifest.files), destination, timeout=120)
        torrent = fetched.torrent
        return fetched, set(torrent.ban_counts), torrent.hash_failures, torrent.handle.status().total_payload_download
    finally:
        session.close()


def test_a_corrupt_seeder_is_banned_and_the_download_completes(seeded, dht_client, slow_original, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(seeded.published.path, corrupt / "model")
    liar = TorrentSession("127.0.0.21")
    try:
        torrent = liar.seed(corrupt, (seeded.published.path.parent / TORRENT_FILE).read_bytes(), hashed=False)
        deadline = time.monotonic() + 30
        while not torrent.handle.status().is_seeding and time.monotonic() < deadline:
            time.sleep(0.05)
        for block_file in (corrupt / "model").glob("block-*.safetensors"):  # checked good, now all but the header flipped
            data = bytearray(block_file.read_bytes())
            header = 8 + int.from_bytes(data[:8], "little")
            data[header:] = bytes(byte ^ 0xFF for byte in data[header:])
            block_file.write_bytes(bytes(data))
        announce_seeder(dht_client, seeded.info_hash, Seeder("the-liar", liar.address, tuple(seeded.published.manifest.files)), 60)
        fetched, banned, failures, _ = download(dht_client, "tiny-slow", "127.0.0.22", tmp_path / "download")
    finally:
        liar.close()
    assert failures > 0 and any(address.startswith("127.0.0.21:") for address in banned)
    assert same_tensors(fetched.path, slow_original)


def test_a_seeder_killed_mid_download_costs_only_its_pieces(seeded, dht_client, bootstrap_peers, slow_original, tmp_path):
    helper = PeerProcess(
        ["-m", "swarm.fetch", "tiny-slow", "--seed", "--cache-dir", str(tmp_path / "helper"), "--host", "127.0.0.30",
         "--upload-limit", "150000", "--initial-peers", *bootstrap_peers],
        name="second seeder",
    )  # fmt: skip
    try:
        helper.wait_for("seeding it", timeout=180)
        time.sleep(0.5)
        killer = threading.Timer(1.5, helper.signal, args=(signal.SIGKILL,))
        killer.start()
        started = time.monotonic()
        fetched, _, _, _ = download(dht_client, "tiny-slow", "127.0.0.31", tmp_path / "download")
        assert time.monotonic() - started > 1.5, "the download should have outlived the killed seeder"
        assert same_tensors(fetched.path, slow_original)
    finally:
        helper.stop()


def forged(announcement: Announcement, identity: Identity, **changes) -> Announcement:
    """The publication, changed and signed by another publisher."""
    changed = replace(announcement, publisher=identity.public_key, **changes)
    return replace(changed, signature=identity.sign(changed.payload()))


def test_a_manifest_with_lying_sizes_is_refused(seeded, dht_client, tmp_path):
    liar = Identity.load_or_create(tmp_path / "liar.key")
    manifest = dict(seeded.published.announcement.manifest, name="tiny-lying")
    manifest["files"] = {path: dict(entry) for path, entry in manifest["files"].items()}
    manifest["files"]["block-00001.safetensors"]["size"] += 1000
    announce_model(dht_client, forged(seeded.published.announcement, liar, name="tiny-lying", manifest=manifest))
    with pytest.raises(ManifestError, match="do not match the manifest"):
        download(dht_client, "tiny-lying", "127.0.0.40", tmp_path / "download")
    assert not (tmp_path / "download" / "model").exists()


def test_a_manifest_that_escapes_the_folder_is_refused(seeded, dht_client, tmp_path):
    liar = Identity.load_or_create(tmp_path / "liar.key")
    manifest = dict(seeded.published.announcement.manifest, name="tiny-escaping")
    manifest["files"] = {"../../outside.safetensors" if path == "client.safetensors" else path: entry for path, entry in manifest["files"].items()}
    announce_model(dht_client, forged(seeded.published.announcement, liar, name="tiny-escaping", manifest=manifest))
    with pytest.raises(ManifestError, match="would leave the model folder"):
        download(dht_client, "tiny-escaping", "127.0.0.41", tmp_path / "download")


def test_an_announcement_with_a_forged_signature_is_ignored(seeded, dht_client):
    genuine = seeded.published.announcement
    tampered = replace(genuine, name="tiny-tampered", manifest=dict(genuine.manifest, name="tiny-tampered"))
    announce_model(dht_client, tampered)  # signed by nobody: the genuine signature does not cover the change
    with pytest.raises(swarm.errors.ConfigurationError, match="nobody in the swarm announces"):
        resolve(dht_client, "tiny-tampered", wait=1.0)


def test_a_name_announced_a_moment_after_the_look_up_is_found(seeded, dht_client, tmp_path):
    """A peer that has just joined the DHT may not see a name at once: the look-up tries again for a while."""
    late = forged(seeded.published.announcement, Identity.load_or_create(tmp_path / "late.key"), name="tiny-late",
                  manifest=dict(seeded.published.announcement.manifest, name="tiny-late"))  # fmt: skip
    announcer = threading.Timer(1.5, announce_model, args=(dht_client, late))
    announcer.start()
    try:
        started = time.monotonic()
        assert resolve(dht_client, "tiny-late", wait=20.0) == late
        assert time.monotonic() - started >= 1.0
    finally:
        announcer.cancel()


def test_two_publishers_of_one_name(seeded, dht_client, tmp_path):
    other = Identity.load_or_create(tmp_path / "other.key")
    first = seeded.published.announcement
    second = forged(first, other, info_hash=hashlib.sha256(b"another model").hexdigest(), published_at=first.published_at - 10)
    assert choose_announcement("tiny-slow", [first, second], {first.info_hash: 2, second.info_hash: 1}, None) is first
    assert choose_announcement("tiny-slow", [first, second], {}, None) is second  # earlier, when no one seeds
    assert choose_announcement("tiny-slow", [first, second], {first.info_hash: 2}, second.info_hash) is second


# Every family


def test_a_t5_model_round_trips_through_the_swarm(bootstrap_peers, tmp_path):
    original = make_tiny_t5(tmp_path / "tiny-t5")
    with swarm.publish(original, "tiny-t5-published", bootstrap_peers, host="127.0.0.50", work_dir=tmp_path / "published",
                       identity=tmp_path / "identity.key") as publisher:  # fmt: skip
        manifest = publisher.published.manifest
        assert [path for path, entry in manifest.files.items() if entry.role == "shared"] == ["shared.safetensors"]
        output = swarm.fetch("tiny-t5-published", bootstrap_peers, output=tmp_path / "fetched", host="127.0.0.51", timeout=120)
    assert same_tensors(output, original)
    local, fetched = (T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32) for path in (original, output))
    assert all(torch.equal(a, b) for a, b in zip(local.state_dict().values(), fetched.state_dict().values()))


def test_a_diffusers_pipeline_round_trips_through_the_swarm(bootstrap_peers, tmp_path):
    from diffusers import StableDiffusionPipeline

    from swarm.tiny_diffusion import TINY_UNET, make_stable_diffusion

    original = make_stable_diffusion(tmp_path / "tiny-sd", unet=TINY_UNET)
    with swarm.publish(original, "tiny-sd-published", bootstrap_peers, host="127.0.0.52", work_dir=tmp_path / "published",
                       identity=tmp_path / "identity.key") as publisher:  # fmt: skip
        roles = {path: entry.role for path, entry in publisher.published.manifest.files.items()}
        assert roles["unet/block-00000.safetensors"] == "block" and roles["unet/config.json"] == "small"
        assert roles["text_encoder/model.safetensors"] == "client" and roles["model_index.json"] == "small"
        output = swarm.fetch("tiny-sd-published", bootstrap_peers, output=tmp_path / "fetched", host="127.0.0.53", timeout=120)
    assert same_tensors(output, original)
    pipeline = StableDiffusionPipeline.from_pretrained(output)
    reference = StableDiffusionPipeline.from_pretrained(original)
    assert all(torch.equal(a, b) for a, b in zip(pipeline.unet.state_dict().values(), reference.unet.state_dict().values()))


def test_an_interrupted_download_resumes(seeded, dht_client, bootstrap_peers, slow_original, tmp_path):
    uploaded = seeded.published.torrent.handle.status
    before = uploaded().total_payload_upload
    first = PeerProcess(
        ["-m", "swarm.fetch", "tiny-slow", "--cache-dir", str(tmp_path / "cache"), "--host", "127.0.0.60",
         "--initial-peers", *bootstrap_peers],
        name="interrupted fetch",
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while uploaded().total_payload_upload < before + 400_000 and time.monotonic() < deadline:  # half the model
            time.sleep(0.05)
        time.sleep(1.0)
        first.signal(signal.SIGKILL)
    finally:
        first.stop()
    fetched, _, _, downloaded = download(dht_client, "tiny-slow", "127.0.0.61", tmp_path / "cache")
    assert 0 < downloaded < fetched.manifest.total_bytes, "the second run should fetch only what the first did not"
    assert same_tensors(fetched.path, slow_original)


def test_a_server_publishes_its_local_model(original, bootstrap_peers, tmp_path):
    server = launch_server(
        original, "0:5", bootstrap_peers, "--publish", "tiny-served", "--cache-dir", str(tmp_path / "published"),
        "--identity", str(tmp_path / "identity.key"), host="127.0.0.70",
    )  # fmt: skip
    try:
        server.wait_for(r"published: tiny-served [0-9a-f]{64}", timeout=120)
        server.wait_ready(120)
        output = swarm.fetch("tiny-served", bootstrap_peers, output=tmp_path / "fetched", host="127.0.0.71", timeout=120)
        assert same_tensors(output, original)
    finally:
        server.stop()


def test_a_server_that_moves_fetches_its_new_blocks(bootstrap_peers, tmp_path):
    """A server that chose its blocks moves to blocks nobody serves, and fetches their files from the swarm."""
    original = make_tiny_llama(tmp_path / "tiny-llama-4", num_hidden_layers=4)
    caches = [tmp_path / "cache-moving", tmp_path / "cache-fixed"]
    with swarm.publish(original, "tiny-moving", bootstrap_peers, host="127.0.0.80", work_dir=tmp_path / "published",
                       identity=tmp_path / "identity.key"):  # fmt: skip
        moving = launch_server("tiny-moving", None, bootstrap_peers, "--num-blocks", "2", "--rebalance-period", "1",
                               "--cache-dir", str(caches[0]), host="127.0.0.81")  # fmt: skip
        fixed = None
        try:
            moving.wait_for(r"ready: serving tiny-moving blocks 0:2", timeout=120)
            assert {path for path in files_under(caches[0]) if path.startswith("block-")} == {"block-00000.safetensors", "block-00001.safetensors"}
            fixed = launch_server("tiny-moving", "0:2", bootstrap_peers, "--cache-dir", str(caches[1]), host="127.0.0.82")
            fixed.wait_ready(120)
            moving.wait_for(r"Moving from blocks 0:2 to 2:4", timeout=60)
            moving.wait_for(r"ready: serving tiny-moving blocks 2:4", timeout=120)
            assert {f"block-0000{index}.safetensors" for index in range(4)} <= files_under(caches[0])
            model = AutoDistributedModel.from_pretrained("tiny-moving", initial_peers=bootstrap_peers, cache_dir=tmp_path / "client",
                                                         client_config=ClientConfig(torrent_host="127.0.0.83"), coverage_timeout=60)  # fmt: skip
            try:
                local = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32)
                input_ids = torch.tensor([[5, 6, 7, 8, 9]])
                assert torch.equal(model.generate(input_ids, max_new_tokens=6), local.generate(input_ids, max_new_tokens=6))
            finally:
                model.remote.shutdown()
        finally:
            for server in (fixed, moving):
                if server is not None:
                    server.stop()
