"""An OpenAI-compatible HTTP API over a model served by the swarm (`python -m swarm.api`; see `swarm.api.app`)."""

from swarm.api.app import create_app

__all__ = ["create_app"]
