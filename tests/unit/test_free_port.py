"""tests.support.turnout.free_port: per-xdist-worker blocks below the ephemeral port range."""

from __future__ import annotations

import os
import subprocess
import sys

import orjson

from tests.support.turnout import PROJECT_ROOT, _ephemeral_low, free_port, port_block

SCRIPT = """
import orjson, sys
from tests.support.turnout import free_port, port_block
block = port_block()
sys.stdout.write(orjson.dumps([block.start, block.stop, [free_port() for _ in range(50)]]).decode())
"""


def block_of(worker: str, count: int) -> tuple[range, list[int]]:
    env = {"PYTEST_XDIST_WORKER": worker, "PYTEST_XDIST_WORKER_COUNT": str(count)}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=PROJECT_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        check=True,
    ).stdout
    start, stop, ports = orjson.loads(out)
    return range(start, stop), ports


def test_ports_differ_and_stay_in_this_process_block_below_the_ephemeral_range() -> None:
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(port in port_block() for port in ports)
    assert port_block().stop <= _ephemeral_low()


def test_workers_get_disjoint_blocks_and_a_replacement_worker_one_of_them() -> None:
    blocks = [block_of(f"gw{index}", 4) for index in range(4)]
    for index, (block, ports) in enumerate(blocks):
        assert set(ports) <= set(block)
        assert len(set(ports)) == len(ports)
        for other, _ in blocks[index + 1 :]:
            assert not set(block) & set(other)
    assert max(block.stop for block, _ in blocks) <= _ephemeral_low()
    replacement, _ = block_of("gw5", 4)
    assert replacement == blocks[1][0]
