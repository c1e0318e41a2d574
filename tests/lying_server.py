"""A server that lies, for tests only: `python -m tests.lying_server MODE MODEL ...` runs `python -m swarm.server
MODEL ...` with its replies to `forward` and `step` altered as MODE says. The shipped CLI has no such switch.

    shape      the hidden states lose their last position
    extra      an extra tensor rides along with the hidden states
    dtype      the hidden states come back in float16
    length     a step's reply says the session holds one position more than it does
    perturb    the hidden states are nudged by 1e-2 (well-formed: only a second opinion can tell)
    fail       every forward and step fails inside the server (an internal error)
"""

from __future__ import annotations

import re
import sys

import torch

from swarm.launch import PeerProcess
from swarm.server import __main__ as server_main
from swarm.server import handlers, server

MODES = ("shape", "extra", "dtype", "length", "perturb", "fail")


def lie(mode: str, reply):
    fields, tensors = reply
    hidden = tensors["hidden_states"]
    if mode == "fail":
        raise RuntimeError("this server fails on purpose")
    if mode == "shape":
        tensors = {**tensors, "hidden_states": hidden[:, :-1]}
    elif mode == "extra":
        tensors = {**tensors, "secret": torch.zeros(1)}
    elif mode == "dtype":
        tensors = {**tensors, "hidden_states": hidden.half()}
    elif mode == "length" and "length" in fields:
        fields = {**fields, "length": fields["length"] + 1}
    elif mode == "perturb":
        tensors = {**tensors, "hidden_states": hidden + 1e-2}
    return fields, tensors


def lying_handler(mode: str) -> type:
    class LyingRequestHandler(handlers.RequestHandler):
        def _forward(self, *args):
            return lie(mode, super()._forward(*args))

        def _stepped(self, *args):  # every step, alone or in a batch
            return lie(mode, super()._stepped(*args))

    return LyingRequestHandler


def start_liar(mode: str, model, initial_peers: list[str], log_path, blocks: str = "0:5") -> tuple[PeerProcess, str]:
    """Starts a lying server and waits for it to be ready; returns it and its peer id."""
    args = ["-m", "tests.lying_server", mode, str(model), "--host", "127.0.0.1", "--initial-peers", *initial_peers]
    liar = PeerProcess([*args, "--blocks", blocks], name=f"liar ({mode})", log_path=log_path)
    try:
        liar.wait_ready(120)
    except BaseException:
        liar.stop()
        raise
    peer_id = re.search(r"ready: .* peer (\S+)", "\n".join(liar.lines)).group(1)
    return liar, peer_id


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode not in MODES:
        sys.exit(f"MODE must be one of {MODES}")
    server.RequestHandler = lying_handler(mode)
    sys.exit(server_main.main(sys.argv[2:]))
