"""Churn on 127.0.0.1: while a client generates, a random server is SIGKILLed and a new one started on its span
every few seconds. Every generation completes with the local model's tokens, and the only errors a caller could
see are `swarm.errors` types (none here).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import torch

from swarm import AutoDistributedModel
from swarm.client.config import ClientConfig
from swarm.client.retry import RetryPolicy
from swarm.launch import LocalSwarm

SPANS = ["0:3", "3:5", "0:5", "0:5"]
PERIOD = 3.0  # seconds between kills
DURATION = 30.0  # seconds of generation under churn
SERVER_ARGS = ("--announce-period", "2", "--record-ttl", "8")


def churn(swarm: LocalSwarm, stop: threading.Event, kills: list[str]):
    """Kills a random live server every PERIOD seconds and starts a replacement on its span at once."""
    chooser = random.Random(0)
    while not stop.wait(PERIOD):
        index = chooser.randrange(len(SPANS))
        victim = swarm.servers[index]
        os.killpg(victim.pid, signal.SIGKILL)  # the server and its DHT daemon, with no goodbye
        victim.process.wait()
        replacement = swarm.launch_server(SPANS[index])  # LocalSwarm stops it on exit, like the others
        swarm.servers.remove(replacement)
        swarm.servers[index] = replacement
        kills.append(SPANS[index])


def test_generation_under_churn_matches_local(tiny_llama, local_tiny_llama, tmp_path):
    prompts = [torch.randint(3, 131, (1, 6), generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
    expected = [local_tiny_llama.generate(prompt, max_new_tokens=24, do_sample=False) for prompt in prompts]
    retry = RetryPolicy(max_attempts=40, max_delay=1.0, total_timeout=60.0)
    with LocalSwarm(tiny_llama, SPANS, server_args=SERVER_ARGS, log_dir=tmp_path) as swarm:
        config = ClientConfig(initial_peers=swarm.initial_peers, retry=retry, ban_duration=10.0, records_max_age=2.0)
        model = AutoDistributedModel.from_pretrained(tiny_llama, client_config=config)
        stop, kills = threading.Event(), []
        killer = threading.Thread(target=churn, args=(swarm, stop, kills), daemon=True)
        killer.start()
        generations, started = 0, time.monotonic()
        try:
            while time.monotonic() - started < DURATION:
                index = generations % len(prompts)
                tokens = model.generate(prompts[index], max_new_tokens=24, do_sample=False)
                assert torch.equal(tokens, expected[index]), (generations, kills)
                generations += 1
        finally:
            stop.set()
            killer.join()
            left_out = set(model.remote.banned_until)  # servers it met dead (or dying) and routed around
            model.remote.shutdown()
    assert len(kills) >= DURATION / PERIOD - 2 and generations >= 4, (kills, generations)
    assert left_out, "no generation met a killed server"
