"""A worker's view of the kvstore: the model built on the shared weights and the KV pool over the shared region."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrelay.internal.v1 import kvstore_pb2
from kvrelay.model_config import ModelConfig
from kvstore.formats import parse_kv_dtype
from kvstore.pool import KVPool, PoolGeometry
from kvstore.sharing import RegionHandle, TensorSlice, open_region, view_tensors
from services.model.llama import LlamaForCausalLM
from services.model.loader import build_model
from services.model.runner import ModelRunner


@dataclass
class Attached:
    layout: kvstore_pb2.Layout
    config: ModelConfig
    model: LlamaForCausalLM
    pool: KVPool
    runner: ModelRunner
    max_model_len: int


def _handle(region: kvstore_pb2.SharedRegion) -> RegionHandle:
    return RegionHandle(region.kind, region.nbytes, region.path, region.ipc_handle, region.device_uuid)


def attach(layout: kvstore_pb2.Layout, max_model_len: int | None = None) -> Attached:
    """Map the weights and the pool; no weight is copied (the model's parameters are views into the region)."""
    config = ModelConfig.from_dir(layout.model_dir)
    slices = [TensorSlice(t.name, t.dtype, tuple(t.shape), t.offset) for t in layout.tensors]
    weights = view_tensors(open_region(_handle(layout.weights)), slices)
    limit = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    model = build_model(config, weights, limit)
    g = layout.pool
    geometry = PoolGeometry(g.num_layers, g.num_blocks, g.block_size, g.num_kv_heads, g.head_dim)
    spec = parse_kv_dtype(layout.kv_dtype, getattr(torch, layout.dtype))
    pool = KVPool.from_buffer(geometry, spec, open_region(_handle(layout.pool_region)))
    return Attached(layout, config, model, pool, ModelRunner(model, pool), limit)
