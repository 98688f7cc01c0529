"""The kvstore's published layout (model directory, dtypes, pool geometry, shared regions), fetched over gRPC.

Torch-free: the gateway reads the model directory and the pool geometry from it without mapping any memory.
"""

from __future__ import annotations

from kvrelay.internal.v1 import kvstore_pb2, kvstore_pb2_grpc
from kvrelay.rpc.grpc_server import internal_channel


async def fetch_layout(kvstore_address: str) -> kvstore_pb2.Layout:
    """The kvstore's Layout; the call carries the deployment secret (the layout names the shared regions)."""
    async with internal_channel(kvstore_address) as channel:
        return await kvstore_pb2_grpc.KVStoreStub(channel).GetLayout(kvstore_pb2.GetLayoutRequest(), timeout=30)
