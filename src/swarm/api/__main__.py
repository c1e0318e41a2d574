"""`python -m swarm.api MODEL --initial-peers MADDR ... [--host 127.0.0.1] [--port 8000] [--api-key KEY]`

Loads the client side of MODEL (a local checkpoint folder, or the name of a model published in the swarm), and
serves the OpenAI-compatible API (`swarm.api.app`) with uvicorn. Logs `ready: API for NAME at http://HOST:PORT/v1`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from transformers import AutoTokenizer

from swarm import AutoDistributedModel
from swarm.api import serve
from swarm.client.config import ClientConfig
from swarm.client.retry import RetryPolicy
from swarm.errors import ConfigurationError, SwarmUnavailableError
from swarm.logs import configure_logging

logger = logging.getLogger("swarm.api")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m swarm.api", description="Serve a swarm's model over an OpenAI-compatible HTTP API.")
    parser.add_argument("model", help="a local checkpoint folder, or the NAME of a model published in the swarm")
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR", help="multiaddrs of DHT peers")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    parser.add_argument("--api-key", help="require this key as `Authorization: Bearer KEY`")
    parser.add_argument("--model-name", help="the name clients ask for (default: the name the swarm serves it under)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens generated when a request gives no max_tokens")
    parser.add_argument(
        "--coverage-timeout",
        type=float,
        default=ClientConfig.coverage_timeout,
        help="seconds a request waits for servers (to cover every block, or to replace a failed one) before it is "
        "answered 503",
    )
    args = parser.parse_args(argv)
    configure_logging()
    try:
        retry = RetryPolicy(total_timeout=args.coverage_timeout)
        config = ClientConfig(initial_peers=args.initial_peers, coverage_timeout=args.coverage_timeout, retry=retry)
        model = AutoDistributedModel.from_pretrained(args.model, client_config=config)
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    except (ConfigurationError, SwarmUnavailableError) as error:
        logger.error(f"error: {error}")
        return 2
    name = args.model_name or model.remote.model_name
    try:
        serve(model, tokenizer, name, args.host, args.port, api_key=args.api_key, default_max_tokens=args.max_tokens)
    finally:
        model.remote.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
