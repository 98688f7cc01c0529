"""Health and reflection of the real service processes: NOT_SERVING until the model is ready, services listed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import grpc
import pytest

from kvrelay.client import Client
from kvrelay.deployment import REDIS_URL, Deployment, free_port_run
from tests.kvrelay.test_grpc_server import check, list_services


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
            f"kvtest{os.environ.get('KVRELAY_TEST_RUN', '')}health",
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
            f"127.0.0.1:{d.base_port}": "kvrelay.internal.v1.KVStore",
            f"127.0.0.1:{d.base_port + 1}": "kvrelay.internal.v1.Prefill",
            f"127.0.0.1:{d.base_port + 2}": "kvrelay.internal.v1.Decode",
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


def kvrelay_env() -> dict:
    return {k: v for k, v in os.environ.items() if k.startswith("KVRELAY_")}


def test_up_without_redis_says_how_to_get_it(tmp_path):
    # No Redis at the URL and no redis-server on PATH: one line that says what to do, exit code 2.
    port = free_port_run(1)
    result = subprocess.run(
        [sys.executable, "-m", "kvrelay.cli", "up", "--redis-url", f"redis://127.0.0.1:{port}/0", "--name", "kvnone"],
        capture_output=True,
        text=True,
        env={"PATH": str(tmp_path), "HOME": os.environ.get("HOME", "/root"), **kvrelay_env()},
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "redis-server" in lines[0] and "REDIS_URL" in lines[0]


def test_private_redis_and_two_decode_replicas():
    # Nothing answers at the URL, redis-server is on PATH: the launcher starts a private one. Two decode replicas
    # share the streams.
    dead = free_port_run(1)
    d = Deployment("--num-blocks", "64", "--redis-url", f"redis://127.0.0.1:{dead}/0", decode_replicas=2)
    try:
        assert "started a private redis-server" in d.output()

        async def run():
            from kvrelay.client import AsyncClient

            async with AsyncClient(d.address) as client:
                outs = await asyncio.gather(
                    *(client.complete(prompt=f"Number {i}:", max_tokens=6, temperature=0.0) for i in range(6))
                )
                return outs, await client.status()

        outs, status = asyncio.run(run())
        assert all(o.finish.completion_tokens == 6 for o in outs)
        assert sorted(w.role for w in status.workers) == ["decode", "decode", "prefill"]
        assert status.blocks_used == 0
    finally:
        assert d.stop() == 0
    assert d.leftovers() == []


def test_service_env_splits_the_gpu_per_role(tmp_path):
    """MPS: each role's SM share, prefill below decode's priority; AMD: each role's CU mask (launcher only, no GPU)."""

    from kvrelay.launcher import Launcher
    from kvrelay.settings import UpSettings

    launcher = Launcher(UpSettings(prefill_sm_pct=50, decode_sm_pct=100, prefill_cu_mask="0x0000ffff"))
    assert launcher.service_env("prefill") == {"HSA_CU_MASK": "0x0000ffff"}  # no MPS daemon: no MPS variables
    assert launcher.service_env("decode") == {}
    launcher.mps = "nvidia-cuda-mps-control"  # as start_mps leaves it
    prefill, decode = launcher.service_env("prefill"), launcher.service_env("decode")
    assert prefill["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "50" and prefill["CUDA_MPS_CLIENT_PRIORITY"] == "1"
    assert decode == {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": "100"}


def test_cpu_threads_split_the_cores_among_compute_processes(monkeypatch):
    """kvrelay up gives each prefill/decode process its share of the cores (two processes each taking every core of
    a CPU machine made concurrent requests 3.7x slower); --cpu-threads overrides."""

    from kvrelay.launcher import Launcher
    from kvrelay.settings import UpSettings

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)), raising=False)

    def threads(**kw):
        return Launcher(UpSettings(**kw)).cpu_threads()

    assert threads() == 8
    assert threads(prefill_replicas=2, decode_replicas=3) == 3
    assert threads(mode="colocated", decode_replicas=2) == 8  # colocated: one process a replica, no prefill ones
    assert threads(prefill_replicas=20, decode_replicas=20) == 1
    assert threads(cpu_threads=5) == 5
