from swarm.records import ServerRecord, ServerState
from swarm.server.block_selection import block_capacities, blocks_that_fit, choose_span, should_move
from swarm.spans import BlockSpan


def record(peer, start, end, throughput, state=ServerState.ONLINE):
    return ServerRecord(peer, start, end, state, throughput, "0.1.0", "127.0.0.1:1", "float32")


def test_capacities_sum_online_servers_and_can_leave_one_out():
    records = [record("a", 0, 3, 10), record("b", 2, 4, 5), record("c", 0, 4, 99, ServerState.JOINING)]
    by_block = [[r for r in records if block in r.span] for block in range(5)]
    assert block_capacities(by_block) == [10, 10, 15, 5, 0]
    assert block_capacities(by_block, exclude_peer="a") == [0, 0, 5, 5, 0]


def test_choose_span_fills_the_gap():
    assert choose_span([10, 10, 0, 0, 10, 10], 2) == BlockSpan(2, 4)
    assert choose_span([10, 10, 0, 0, 10, 10], 3) == BlockSpan(1, 4)
    assert choose_span([5, 1, 1, 5, 1, 1], 2) == BlockSpan(1, 3)
    assert choose_span([0, 0, 0], 5) == BlockSpan(0, 3)


def test_redundant_server_moves_to_an_uncovered_span_and_a_needed_one_stays():
    assert should_move([10, 10, 10, 0, 0, 0], BlockSpan(0, 3), throughput=10) == BlockSpan(3, 6)
    assert should_move([0, 0, 0, 0, 0, 0], BlockSpan(0, 3), throughput=10) is None
    assert should_move([10, 10, 10, 10, 10, 10], BlockSpan(0, 3), throughput=10) is None


def test_small_gains_do_not_cause_moves():
    assert should_move([10, 10, 10, 9, 9, 9], BlockSpan(0, 3), throughput=1) is None
    assert should_move([30, 30, 30, 2, 2, 2], BlockSpan(0, 3), throughput=10) == BlockSpan(3, 6)


def test_blocks_that_fit():
    assert blocks_that_fit(max_memory=1000, block_bytes=100, num_blocks=30, reserved=200) == 8
    assert blocks_that_fit(max_memory=10**12, block_bytes=100, num_blocks=30, reserved=200) == 30
    assert blocks_that_fit(max_memory=100, block_bytes=100, num_blocks=30, reserved=200) == 1


def test_num_blocks_fills_the_gap_and_a_roomy_peer_hosts_everything(tiny_llama, tmp_path):
    from swarm.checkpoint import CheckpointIndex
    from swarm.launch import LocalSwarm

    with LocalSwarm(tiny_llama, ["0:2", "4:5"], log_dir=tmp_path) as swarm:
        gap_filler = swarm.add_server(None, "--num-blocks", "2")
        assert "blocks 2:4 (2 of 5)" in gap_filler.wait_for(r"ready: .*", 5).group(0)
        replica = swarm.add_server(None)
        assert "blocks 0:5 (5 of 5)" in replica.wait_for(r"ready: .*", 5).group(0)
        index = CheckpointIndex(tiny_llama)
        block_bytes = index.nbytes(index.names(lambda name: name.startswith("model.layers.0.")))
        assert block_bytes == 4 * (2 * 60 * 60 + 2 * 60 * 20 + 3 * 60 * 97 + 2 * 60)
        small = swarm.add_server(None, "--max-memory", str(int(block_bytes * 1.5)))
        assert "(1 of 5)" in small.wait_for(r"ready: .*", 5).group(0)
