"""Logging set-up for the command-line entry points (the library itself only calls getLogger)."""

import logging
import os


def configure_logging(level: str | None = None):
    logging.basicConfig(
        level=(level or os.environ.get("SWARM_LOG_LEVEL", "INFO")).upper(),
        format="%(asctime)s %(levelname)s [%(name)s] %(message)s",
        datefmt="%H:%M:%S",
    )
