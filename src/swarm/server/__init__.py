"""The server side of the swarm: `python -m swarm.server MODEL --blocks START:END`."""

from swarm.server.config import ServerConfig
from swarm.server.server import Server

__all__ = ["Server", "ServerConfig"]
