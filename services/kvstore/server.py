"""The kvstore process: owns the memory. Loads the weights once, allocates the KV pool, exports both; computes nothing.

    python -m services.kvstore.server --model PATH --port 50070 --name kvrelay

Workers call GetLayout and map the two regions. The process keeps them alive as long as it runs and removes the
/dev/shm files when it stops, so it must outlive every worker (the launcher stops it last).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os

import torch

from kvrelay.internal.v1 import kvstore_pb2, kvstore_pb2_grpc
from kvrelay.model_config import ModelConfig
from kvrelay.rpc.grpc_server import install_uvloop, set_serving, start_server, stop_server
from kvrelay.rpc.lifecycle import stop_event_on_signals
from kvstore.formats import bytes_per_token, parse_kv_dtype
from kvstore.pool import KVPool, PoolGeometry
from kvstore.sessions import SessionStore
from kvstore.sharing import create_cuda_region, create_shm_region, pack_layout, remove_region, write_tensors
from services.model.default_model import resolve_model
from services.model.engine import resolve_dtype
from services.model.loader import load_weights

log = logging.getLogger("kvrelay.kvstore")
SERVICE = "kvrelay.internal.v1.KVStore"


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


def build_regions(args) -> tuple[kvstore_pb2.Layout, list]:
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


async def serve(args) -> None:
    # Health answers NOT_SERVING while the weights load, so start the server first and fill the layout in later.
    servicer = KVStoreServicer(kvstore_pb2.Layout())
    server, health = await start_server(
        [(kvstore_pb2_grpc.add_KVStoreServicer_to_server, servicer)], [SERVICE], args.port, args.host
    )
    handles = []
    stop = stop_event_on_signals()
    try:
        servicer.layout, handles = await asyncio.to_thread(build_regions, args)
        # Fresh memory: any session a previous run left in Redis points at K/V that no longer exist.
        async with SessionStore(args.redis_url, args.name) as store:
            await store.init_pool(servicer.layout.pool.num_blocks, servicer.layout.pool.block_size, reset=True)
        await set_serving(health, [SERVICE], True)
        await stop.wait()
    finally:
        await stop_server(server, health)
        for handle in handles:
            remove_region(handle)


def add_kvstore_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-blocks", type=int, default=None, help="KV blocks in the pool (default: --kv-cache-mb)")
    parser.add_argument("--kv-cache-mb", type=int, default=1024, help="pool size when --num-blocks is not given")


def main() -> None:
    parser = argparse.ArgumentParser(description="kvrelay kvstore: owns the weights and the KV pool")
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--kv-dtype", default="auto")
    parser.add_argument("--block-size", type=int, default=16)
    add_kvstore_args(parser)
    parser.add_argument("--device", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50070)
    parser.add_argument("--name", default="kvrelay", help="deployment name: /dev/shm file and Redis key prefix")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    install_uvloop()
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
