"""The colocated baseline: one process that is both a prefill and a decode worker, on one model and one stream.

    python -m services.colocated.server --kvstore 127.0.0.1:50070 --port 50071

Its prefill loop (chunked under --max-batch-tokens) and decode loop take turns on the GPU, so a long prompt stalls
the running decode batch by one chunk at a time: the honest baseline every disaggregation claim is measured against.
The gateway sees it as one prefill and one decode worker at the same address.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from kvrelay.internal.v1 import decode_pb2_grpc, prefill_pb2_grpc
from kvrelay.rpc.grpc_server import install_uvloop
from kvrelay.rpc.lifecycle import serve
from kvrelay.settings import ColocatedSettings, parse
from services.common.worker import Runtime, set_cpu_threads
from services.decode.server import SERVICE as DECODE
from services.decode.server import DecodeWorker
from services.prefill.server import SERVICE as PREFILL
from services.prefill.server import PrefillWorker

log = logging.getLogger("kvrelay.colocated")


async def run(settings: ColocatedSettings) -> None:
    # Both roles take turns on one stream: there is no split to adapt (the SLO admission still applies).
    settings = dataclasses.replace(settings, split=False)
    prefill, decode = PrefillWorker(settings), DecodeWorker(settings)
    decode.health = prefill.health  # one process, one health: both heartbeats report Redis to it
    tasks: list[asyncio.Task] = []
    runtimes: list[Runtime] = []

    async def startup(stop: asyncio.Event) -> None:
        runtime = await Runtime.start(settings, "colocated")  # one stream: its lock makes the two loops take turns
        runtimes.append(runtime)
        for worker in (prefill, decode):
            worker.adopt_runtime(runtime)
        await asyncio.to_thread(runtime.gpu.run, decode.prepare)
        await asyncio.to_thread(runtime.gpu.run, prefill.prepare)
        for worker in (prefill, decode):
            tasks.extend(await worker.register(stop, {"colocated": 1}))
        tasks.extend(asyncio.create_task(loop) for loop in [*prefill.loops(), *decode.loops()])
        log.info("colocated worker serving on %s", prefill.address)

    async def shutdown() -> None:
        for task in tasks:
            task.cancel()
        for worker in (prefill, decode):
            await worker.deregister()
        for runtime in runtimes:
            await runtime.close()

    servicers = [
        (prefill_pb2_grpc.add_PrefillServicer_to_server, prefill),
        (decode_pb2_grpc.add_DecodeServicer_to_server, decode),
    ]
    await serve(servicers, [PREFILL, DECODE], settings.host, settings.port, startup, shutdown, health=prefill.health)


def main() -> None:
    settings = parse(ColocatedSettings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_cpu_threads(settings.cpu_threads)
    install_uvloop()
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
