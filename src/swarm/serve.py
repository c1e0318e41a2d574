"""`python -m swarm.serve [--port 8000]` (`make serve`): SmolLM2 on a local swarm, behind the OpenAI-compatible API.

Converts SmolLM2-135M-Instruct once (see `swarm.smollm2`), starts a bootstrap peer and three servers on 127.0.0.1
hosting blocks [0, 10), [10, 20) and [20, 30), then serves the API (`swarm.api`) until Ctrl-C, printing its URL and
the multiaddrs that other peers and clients can join with. Everything it started stops when it ends.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile

from transformers import AutoTokenizer

from swarm import AutoDistributedModel
from swarm.api import serve
from swarm.launch import LocalSwarm
from swarm.logs import configure_logging
from swarm.smollm2 import smollm2_checkpoint

SPANS = ["0:10", "10:20", "20:30"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.serve", description="SmolLM2 on a local swarm, behind the OpenAI-compatible API.")
    parser.add_argument("--host", default="127.0.0.1", help="interface the API listens on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port the API listens on (default: 8000)")
    args = parser.parse_args(argv)
    configure_logging()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwind, so the servers stop
    checkpoint = smollm2_checkpoint()
    with LocalSwarm(checkpoint, SPANS, log_dir=tempfile.mkdtemp(prefix="swarm-serve-logs-")) as swarm:
        print(f"Swarm of {len(SPANS)} servers; other peers join with --initial-peers {' '.join(swarm.initial_peers)}", flush=True)
        model = AutoDistributedModel.from_pretrained(checkpoint, initial_peers=swarm.initial_peers)
        try:
            serve(model, AutoTokenizer.from_pretrained(checkpoint), model.remote.model_name, args.host, args.port)
        except KeyboardInterrupt:
            pass
        finally:
            model.remote.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
