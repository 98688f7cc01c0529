"""The kvstore process: owns the memory. Loads the weights once, allocates the KV pool, exports both; computes nothing.

    python -m services.kvstore.server --model PATH --port 50070 --name kvrelay

Workers call GetLayout and map the two regions. The process keeps them alive as long as it runs and removes the
/dev/shm files when it stops, so it must outlive every worker (the launcher stops it last).

It also watches Redis for lost state (a restart without persistence, a FLUSHALL): the pool's record gone, it
re-creates it with the same geometry and lets the live workers re-assert what they hold before the rest is free
(kvstore/lua/recover_pool.lua). Its health says NOT_SERVING while Redis does not answer.
"""

from __future__ import annotations

import asyncio
import logging

import torch

from kvrelay.internal.v1 import kvstore_pb2, kvstore_pb2_grpc
from kvrelay.model_config import ModelConfig
from kvrelay.rpc.grpc_server import install_uvloop
from kvrelay.rpc.lifecycle import Health, serve
from kvrelay.settings import KVStoreSettings, parse
from kvstore.formats import bytes_per_token, parse_kv_dtype
from kvstore.pool import KVPool, PoolGeometry
from kvstore.sessions import SessionStore
from kvstore.sharing import create_cuda_region, create_shm_region, pack_layout, remove_region, write_tensors
from services.model.default_model import resolve_model
from services.model.engine import resolve_dtype
from services.model.loader import load_weights

log = logging.getLogger("kvrelay.kvstore")
SERVICE = "kvrelay.internal.v1.KVStore"
WATCH_S = 0.5  # how often the pool's record in Redis is checked: a lost one is re-created within this


def size_pool(config: ModelConfig, spec, block_size: int, num_blocks: int | None, kv_cache_mb: int) -> int:
    if num_blocks:
        return num_blocks
    per_block = bytes_per_token(spec, config.num_layers, config.num_kv_heads, config.head_dim) * block_size
    return max(1, kv_cache_mb * 2**20 // per_block)


KEEP_ALIVE: list[torch.Tensor] = []


def _region_proto(h) -> kvstore_pb2.SharedRegion:
    return kvstore_pb2.SharedRegion(
        kind=h.kind, path=h.path, nbytes=h.nbytes, ipc_handle=h.ipc_handle, device_uuid=h.device_uuid
    )


class KVStoreServicer(kvstore_pb2_grpc.KVStoreServicer):
    def __init__(self, layout: kvstore_pb2.Layout) -> None:
        self.layout = layout

    async def GetLayout(self, request, context):  # noqa: N802 (gRPC method name)
        return self.layout


def build_regions(args: KVStoreSettings) -> tuple[kvstore_pb2.Layout, list]:
    model_dir = resolve_model(args.model)
    config = ModelConfig.from_dir(model_dir)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, config, device)
    weights = load_weights(model_dir, config, dtype, "cpu")
    slices, nbytes = pack_layout(weights)
    spec = parse_kv_dtype(args.kv_dtype, dtype)
    num_blocks = size_pool(config, spec, args.block_size, args.num_blocks, args.kv_cache_mb)
    geometry = PoolGeometry(config.num_layers, num_blocks, args.block_size, config.num_kv_heads, config.head_dim)
    if device.type == "cpu":
        weights_region, weights_handle = create_shm_region(f"{args.name}-weights", nbytes)
        pool_region, pool_handle = create_shm_region(f"{args.name}-pool", KVPool.nbytes(geometry, spec))
    else:
        weights_region, weights_handle = create_cuda_region(nbytes, device)
        pool_region, pool_handle = create_cuda_region(KVPool.nbytes(geometry, spec), device)
    write_tensors(weights_region, weights, slices)
    del weights
    KEEP_ALIVE.extend([weights_region, pool_region])  # importers map this memory: it lives as long as we do
    layout = kvstore_pb2.Layout(
        model_dir=str(model_dir),
        dtype=str(dtype).removeprefix("torch."),
        kv_dtype=str(spec),
        pool=kvstore_pb2.PoolGeometry(**geometry.__dict__),
        weights=_region_proto(weights_handle),
        pool_region=_region_proto(pool_handle),
        tensors=[kvstore_pb2.TensorSlice(name=s.name, dtype=s.dtype, shape=s.shape, offset=s.offset) for s in slices],
    )
    log.info(
        "kvstore: %s, %d KV blocks of %d tokens (%s), weights %.1f MB",
        model_dir.name,
        num_blocks,
        args.block_size,
        spec,
        nbytes / 2**20,
    )
    return layout, [weights_handle, pool_handle]


async def watch_pool(store: SessionStore, num_blocks: int, block_size: int, health: Health) -> None:
    """Re-create the pool when Redis lost it, close the recovery window in time (recover_pool), and report Redis'
    absence in health."""
    away = False
    while True:
        try:
            what = await store.recover_pool(num_blocks, block_size)
            if what == "recreated":
                log.warning(
                    "the session store lost its state (Redis restarted without persistence, or was flushed): "
                    "re-created the pool of %d blocks; live workers re-assert what they hold",
                    num_blocks,
                )
            elif what == "recovered":
                stats = await store.stats()
                log.warning(
                    "pool recovered: %d blocks held by %d live session(s), %d free",
                    stats.used,
                    stats.active_sessions,
                    stats.free,
                )
            if away:
                log.warning("the session store answers again")
            away = False
            await health.dependency(True)
        except Exception as exc:  # Redis away (the store retried already): say so once, keep watching
            if not away:
                log.warning("the session store is unreachable: %s: %s", type(exc).__name__, exc)
            away = True
            await health.dependency(False, str(exc))
        await asyncio.sleep(WATCH_S)


async def run(settings: KVStoreSettings) -> None:
    # Health answers NOT_SERVING while the weights load, so the server starts first and the layout is filled in later.
    servicer = KVStoreServicer(kvstore_pb2.Layout())
    handles = []
    health = Health()
    stores: list[SessionStore] = []
    tasks: list[asyncio.Task] = []

    async def startup(stop: asyncio.Event) -> None:
        servicer.layout, regions = await asyncio.to_thread(build_regions, settings)
        handles.extend(regions)
        # Fresh memory: any session a previous run left in Redis points at K/V that no longer exist.
        store = SessionStore(settings.redis_url, settings.name, retry_s=WATCH_S)
        stores.append(store)
        pool = servicer.layout.pool
        await store.init_pool(pool.num_blocks, pool.block_size, reset=True)
        tasks.append(asyncio.create_task(watch_pool(store, pool.num_blocks, pool.block_size, health)))

    async def shutdown() -> None:
        for task in tasks:
            task.cancel()
        for store in stores:
            await store.close()
        for handle in handles:
            remove_region(handle)

    servicers = [(kvstore_pb2_grpc.add_KVStoreServicer_to_server, servicer)]
    await serve(servicers, [SERVICE], settings.host, settings.port, startup, shutdown, grace_s=5.0, health=health)


def main() -> None:
    settings = parse(KVStoreSettings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    install_uvloop()
    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
