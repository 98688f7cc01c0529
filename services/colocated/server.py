"""The colocated baseline: one process that is both a prefill and a decode worker, on one model and one stream.

    python -m services.colocated.server --kvstore 127.0.0.1:50070 --port 50071

Its prefill loop (chunked under --max-batch-tokens) and decode loop take turns on the GPU, so a long prompt stalls
the running decode batch by one chunk at a time: the honest baseline every disaggregation claim is measured against.
The gateway sees it as one prefill and one decode worker at the same address.
"""

from __future__ import annotations

import asyncio
import logging

from kvrelay.internal.v1 import decode_pb2_grpc, prefill_pb2_grpc
from kvrelay.rpc.grpc_server import install_uvloop, set_serving, start_server, stop_server
from kvrelay.rpc.health import wait_healthy
from kvrelay.rpc.lifecycle import stop_event_on_signals, unless_stopped
from kvstore.sessions import SessionStore
from services.common.attach import attach, fetch_layout
from services.common.worker import WORKER_TTL_MS, OwnStream, set_cpu_threads, worker_args
from services.decode.server import SERVICE as DECODE
from services.decode.server import DecodeWorker, add_decode_args
from services.prefill.server import SERVICE as PREFILL
from services.prefill.server import PrefillWorker, add_prefill_args

log = logging.getLogger("kvrelay.colocated")


async def serve(args) -> None:
    prefill, decode = PrefillWorker(args), DecodeWorker(args)
    names = [PREFILL, DECODE]
    server, health = await start_server(
        [
            (prefill_pb2_grpc.add_PrefillServicer_to_server, prefill),
            (decode_pb2_grpc.add_DecodeServicer_to_server, decode),
        ],
        names,
        args.port,
        args.host,
    )
    stop = stop_event_on_signals()
    prefill.stopping = decode.stopping = stop
    tasks: list[asyncio.Task] = []
    stores: list[SessionStore] = []

    async def startup() -> None:
        await wait_healthy(args.kvstore, "kvrelay.internal.v1.KVStore", timeout_s=600)
        attached = await asyncio.to_thread(attach, await fetch_layout(args.kvstore), args.max_model_len)
        gpu = OwnStream(attached.runner.device)  # shared: its lock makes the two loops take turns
        store = await SessionStore.connect(args.redis_url, args.name)
        stores.append(store)
        for worker in (prefill, decode):
            worker.attached, worker.gpu, worker.store = attached, gpu, store
        await asyncio.to_thread(gpu.run, decode.prepare)
        await asyncio.to_thread(gpu.run, prefill.prepare)
        for worker in (prefill, decode):
            await store.register_worker(worker.worker_id, worker.role, worker.address, WORKER_TTL_MS, {"colocated": 1})
            tasks.append(asyncio.create_task(worker.heartbeat_loop()))
        tasks.extend([asyncio.create_task(loop) for loop in [prefill.batch_loop(), *decode.loops()]])
        await set_serving(health, names, True)
        log.info("colocated worker serving on %s", prefill.address)

    try:
        if await unless_stopped(startup(), stop):
            await stop.wait()
    finally:
        await stop_server(server, health, grace_s=2.0)
        for task in tasks:
            task.cancel()
        for store in stores:
            for worker in (prefill, decode):
                await store.deregister_worker(worker.worker_id)
            await store.close()


def main() -> None:
    parser = worker_args("kvrelay colocated worker (prefill + decode in one process: the baseline)", 50071)
    add_prefill_args(parser)
    add_decode_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    set_cpu_threads(args.cpu_threads)
    install_uvloop()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
