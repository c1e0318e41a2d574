"""An OpenAI-compatible HTTP API over a model served by the swarm (`python -m swarm.api`; see `swarm.api.app`)."""

from __future__ import annotations

import logging

import uvicorn

from swarm.api.app import create_app

__all__ = ["create_app", "serve"]

logger = logging.getLogger(__name__)


def serve(model, tokenizer, name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, default_max_tokens: int = 256):
    """Serves the API and its web page over `model` with uvicorn until interrupted; logs `ready: API for NAME at
    http://HOST:PORT/v1`, then the page's URL, once it listens (port 0 picks a free one)."""
    app = create_app(model, tokenizer, name, api_key=api_key, default_max_tokens=default_max_tokens)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    original_startup = server.startup

    async def startup(*args, **kwargs):
        await original_startup(*args, **kwargs)
        bound = server.servers[0].sockets[0].getsockname()[1] if server.servers else port
        logger.info(f"ready: API for {name} at http://{host}:{bound}/v1")
        logger.info(f"Chat and live swarm map: http://{host}:{bound}/")

    server.startup = startup
    server.run()
