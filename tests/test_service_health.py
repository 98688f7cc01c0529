"""Health and reflection of the real service processes: NOT_SERVING until the model is ready, services listed."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import grpc
import pytest

from gateway.client import Client
from tests.deployment import REDIS_URL, Deployment, free_port_run
from tests.test_grpc_server import check, list_services


def test_gateway_is_not_serving_until_the_model_is_ready():
    # A gateway whose kvstore is not up yet: it answers health (NOT_SERVING) and refuses work with UNAVAILABLE.
    port = free_port_run(2)
    dead = port + 1  # nothing listens there
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway.server",
            "--port",
            str(port),
            "--kvstore",
            f"127.0.0.1:{dead}",
            "--redis-url",
            REDIS_URL,
            "--name",
            "kvtest-health",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"

    async def probe():
        async with grpc.aio.insecure_channel(address) as channel:
            deadline = time.monotonic() + 60
            while True:
                try:
                    return (
                        await check(channel, ""),
                        await check(channel, "kvrelay.v1.Gateway"),
                        await list_services(channel),
                    )
                except grpc.aio.AioRpcError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)

    try:
        overall, gateway, services = asyncio.run(probe())
        assert overall == "NOT_SERVING" and gateway == "NOT_SERVING"
        assert {"kvrelay.v1.Gateway", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services
        with Client(address) as client, pytest.raises(grpc.RpcError) as err:
            client.complete(prompt="hi")
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_every_process_serves_and_lists_its_services():
    d = Deployment("--num-blocks", "16")
    try:
        processes = {
            d.address: "kvrelay.v1.Gateway",
            f"127.0.0.1:{d.base_port}": "kvrelay.v1.KVStore",
            f"127.0.0.1:{d.base_port + 1}": "kvrelay.v1.Prefill",
            f"127.0.0.1:{d.base_port + 2}": "kvrelay.v1.Decode",
        }

        async def probe(address, service):
            async with grpc.aio.insecure_channel(address) as channel:
                return await check(channel, service), await list_services(channel)

        for address, service in processes.items():
            status, services = asyncio.run(probe(address, service))
            assert status == "SERVING", (address, service)
            assert service in services
    finally:
        assert d.stop() == 0
    assert d.leftovers() == []
