"""The client over several servers (issue 15, item 3): `Client([a, b])` (or "a,b") sends each request to
the next server in turn, over REST and gRPC, sync and async; a server that is down is skipped and the
request goes to the next at once, so a trainer loses no call while one replica restarts; a gRPC target
that resolves to several servers is balanced per call by gRPC itself. Servers count their own
requests (/metrics), which is how the tests see where each request went."""

from __future__ import annotations

import asyncio
import re

import httpx
import numpy as np
import pytest

from advserve_client import AsyncClient, Client
from advserve_client._retry import Balancer
from advserve_client.errors import Unavailable
from conftest import RunningServer

MASK = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], bool)
REWARDS = np.array([1.0, 0.0, 0.0, 1.0])


def grpo(client: Client) -> np.ndarray:
    return client.compute_advantages("grpo", rewards=REWARDS, response_mask=MASK, group_ids=[0, 0, 1, 1]).advantages


def served(server: RunningServer, transport: str) -> int:
    """The advantage requests `server` answered over `transport` (its own /metrics)."""
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return int(sum(float(v) for v in re.findall(
        rf'advserve_requests_total{{endpoint="advantages",estimator="grpo",status="(?:200|OK)",transport="{transport}"}} '
        r'([0-9.e+]+)', text)))


@pytest.fixture(scope="module")
def pair():
    servers = [RunningServer(), RunningServer()]
    yield servers
    for server in servers:
        server.stop()


def address(server: RunningServer, transport: str) -> str:
    return f"127.0.0.1:{server.port if transport == 'http' else server.grpc_port}"


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_requests_alternate_between_the_servers(pair, transport):
    before = [served(s, transport) for s in pair]
    with Client([address(s, transport) for s in pair], transport=transport) as client:
        results = [grpo(client) for _ in range(6)]
    assert [served(s, transport) - b for s, b in zip(pair, before)] == [3, 3]
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_a_comma_separated_address_is_the_same_list(pair):
    joined = ",".join(address(s, "http") for s in pair)
    with Client(joined) as client:
        assert client.addresses == [address(s, "http") for s in pair] and client.address == joined
    for bad in ("", " , ", []):
        with pytest.raises(ValueError, match="address"):
            Client(bad)
    with pytest.raises(ValueError, match="one address"):
        Client(joined, shared_memory=True)


@pytest.mark.parametrize("transport", ["http", "grpc"])
def test_a_server_that_is_down_is_skipped_without_losing_a_call(transport):
    alive, dead = RunningServer(), RunningServer()
    try:
        dead_address = address(dead, transport)
        dead.stop()  # its port refuses connections now
        before = served(alive, transport)
        with Client([dead_address, address(alive, transport)], transport=transport, max_retries=0) as client:
            for _ in range(5):
                grpo(client)  # none raises: with max_retries=0 a failure would surface at once
            assert client._balancer.order()[-1] == 0  # the dead server is tried last while it is down
        assert served(alive, transport) - before == 5
    finally:
        alive.stop()


def test_when_every_server_is_down_the_error_is_unavailable():
    gone = RunningServer()
    dead = address(gone, "http")
    gone.stop()
    with Client([dead, dead], max_retries=0, timeout=5) as client, pytest.raises(Unavailable):
        grpo(client)


def test_the_async_client_alternates_too(pair):
    before = [served(s, "http") for s in pair]

    async def run():
        async with AsyncClient([address(s, "http") for s in pair]) as client:
            for _ in range(4):
                await client.compute_advantages("grpo", rewards=REWARDS, response_mask=MASK, group_ids=[0, 0, 1, 1])

    asyncio.run(run())
    assert [served(s, "http") - b for s, b in zip(pair, before)] == [2, 2]


def test_a_grpc_target_with_several_addresses_is_balanced_per_call(pair):
    """One channel, gRPC's own resolver and round_robin policy ("ipv4:a,b" here; "dns:///name:port" for a
    headless Service resolves the same way to several addresses)."""
    target = "ipv4:" + ",".join(address(s, "grpc") for s in pair)
    with Client([target], transport="grpc") as client:
        for _ in range(4):  # until both connections are up (round_robin picks among the ready ones)
            grpo(client)
        before = [served(s, "grpc") for s in pair]
        for _ in range(8):
            grpo(client)
    counts = [served(s, "grpc") - b for s, b in zip(pair, before)]
    assert sum(counts) == 8 and min(counts) >= 3, counts


def test_balancer_order():
    now = [0.0]
    balancer = Balancer(3, cooldown_s=5.0, clock=lambda: now[0])
    assert [balancer.order()[0] for _ in range(4)] == [0, 1, 2, 0]
    balancer.down(2)
    assert balancer.order() == [1, 0, 2]  # in turn from 1; the down one last
    assert balancer.order() == [0, 1, 2]  # its turn: skipped to the end
    now[0] = 5.0  # the cooldown is over
    assert balancer.order() == [0, 1, 2]
    balancer.down(1)
    balancer.up(1)  # answered since
    assert balancer.order() == [1, 2, 0]
