import json

from swarm.launch import LocalSwarm
from swarm.status import main, swarm_status


def run_status(capsys, swarm, *args):
    """What `python -m swarm.status --initial-peers ... *args` prints (its `main`, run here)."""
    assert main(["--initial-peers", *swarm.initial_peers, *args]) == 0
    return capsys.readouterr().out


def test_status_of_a_known_swarm(tiny_llama, tmp_path, capsys):
    with LocalSwarm(tiny_llama, ["0:2", "0:2", "3:5"], log_dir=tmp_path) as swarm:
        table = run_status(capsys, swarm)
        assert "Model tiny-llama: 5 blocks, 3 server(s)" in table
        assert "online servers per block: 2 2 0 1 1" in table
        assert "UNCOVERED blocks: 2:3" in table
        for server in swarm.servers:
            assert server.address in table

        data = json.loads(run_status(capsys, swarm, "--json", "--plot", str(tmp_path / "coverage.png")))
        (model,) = data["models"]
        assert model["name"] == "tiny-llama" and model["coverage"] == [2, 2, 0, 1, 1]
        assert model["uncovered"] == [[2, 3]]
        assert sorted((s["start"], s["end"]) for s in model["servers"]) == [(0, 2), (0, 2), (3, 5)]
        assert all(s["state"] == "online" and s["latency_ms"] > 0 and s["throughput"] > 0 for s in model["servers"])
        assert (tmp_path / "coverage.png").stat().st_size > 1000

        status = swarm_status(swarm.initial_peers)
        assert status.models[0].coverage == [2, 2, 0, 1, 1]
