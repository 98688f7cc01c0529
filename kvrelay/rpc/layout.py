"""The kvstore's published layout (model directory, dtypes, pool geometry, shared regions), fetched over gRPC.

Torch-free: the gateway reads the model directory and the pool geometry from it without mapping any memory.
"""

from __future__ import annotations

import grpc

from kvrelay.internal.v1 import kvstore_pb2, kvstore_pb2_grpc
from kvrelay.rpc.grpc_server import channel_options


async def fetch_layout(kvstore_address: str) -> kvstore_pb2.Layout:
    async with grpc.aio.insecure_channel(kvstore_address, options=channel_options()) as channel:
        return await kvstore_pb2_grpc.KVStoreStub(channel).GetLayout(kvstore_pb2.GetLayoutRequest(), timeout=30)
