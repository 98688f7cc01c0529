"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2) over a paged KV pool.

Parameter names match HF checkpoints, so a state dict loads without renaming. Modules are built on the meta device
and their parameters assigned from the loaded (or shared) tensors: the model never owns a second copy of the weights.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from kernels import ops
from kvrelay.model_config import ModelConfig
from kvstore.pool import KVPool
from services.model.attention_metadata import AttentionMetadata


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) whose product goes through kernels/ops.py."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # gate and up merged at load time (services/model/loader.py: merge_projections)
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.gate_up_proj(x))

    def down(self, gate_up: torch.Tensor) -> torch.Tensor:
        # [num_tokens, 2 * intermediate] -> silu(gate) * up [num_tokens, intermediate] -> [num_tokens, hidden]
        return ops.silu_mul_linear(gate_up, self.down_proj.weight, self.down_proj.bias)


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        # q, k and v merged at load time (services/model/loader.py: merge_projections)
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        positions: torch.Tensor,  # [num_tokens]
        cos_sin_cache: torch.Tensor,
        meta: AttentionMetadata,
        pool: KVPool,
    ) -> torch.Tensor:
        return self.attend(self.qkv_proj(x), positions, cos_sin_cache, meta, pool)

    def attend(self, qkv, positions, cos_sin_cache, meta: AttentionMetadata, pool: KVPool, project: bool = True):
        """Everything after the qkv projection: rotary, the K/V store, attention, o_proj (unless not `project`)."""
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # strided views into the fused output: the kernels take strides, so no copies
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        layer = pool.layer(self.layer_index)
        # Rotary, and the new K/V into the pool first (the rotated key is not written back): attention then reads
        # every key, cached or new, from the pool, so prefill and decode see exactly the same (possibly quantized)
        # keys and values. Decode does all of it in the attention kernel on a GPU (one launch a layer).
        if meta.is_prefill:
            q = ops.rotary_store_kv(positions, q, k, v, cos_sin_cache, layer, meta.slot_mapping)
            out = ops.paged_prefill_attention(
                q, layer, meta.block_tables, meta.cu_seqlens_q, meta.context_lens, self.scale, meta.max_query_len
            )
        else:
            out = ops.rotary_store_decode_attention(
                positions,
                q,
                k,
                v,
                cos_sin_cache,
                layer,
                meta.slot_mapping,
                meta.block_tables,
                meta.context_lens,
                self.scale,
                meta.max_context_len,
            )
        out = out.reshape(num_tokens, self.num_heads * self.head_dim)
        return self.o_proj(out) if project else out


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, make_mlp: Callable[[ModelConfig], nn.Module]) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_index)
        self.mlp = make_mlp(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, residual, positions, cos_sin_cache, meta, pool):
        # Each norm goes with the projection after it (ops.norm_linear): one kernel at batch 1 on a GPU.
        # x may be an ops.Summed (residual None): the previous layer's down_proj added the residual itself.
        qkv, residual = self._norm_linear(self.input_layernorm, x, residual, self.self_attn.qkv_proj)
        out = self.self_attn.attend(qkv, positions, cos_sin_cache, meta, pool, project=False)
        o_proj = self.self_attn.o_proj
        if isinstance(self.mlp, LlamaMLP):
            norm, mlp = self.post_attention_layernorm, self.mlp
            up, down = mlp.gate_up_proj, mlp.down_proj
            # batch 1 on a GPU: o_proj adds the residual and sums the squares, so no norm kernel runs (ops.Summed)
            summed = ops.linear_add(out, o_proj.weight, o_proj.bias, residual)
            x, residual = (summed, None) if summed is not None else (o_proj(out), residual)
            return ops.norm_mlp(x, residual, norm.weight, norm.eps, up.weight, up.bias, down.weight, down.bias)
        x, residual = self.post_attention_layernorm(o_proj(out), residual)
        return self.mlp(x), residual

    @staticmethod
    def _norm_linear(norm: RMSNorm, x, residual, linear: nn.Linear):
        return ops.norm_linear(x, residual, norm.weight, norm.eps, linear.weight, linear.bias)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, make_mlp: Callable[[ModelConfig], nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, make_mlp) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """forward() returns hidden states for every new token; compute_logits() only for the rows that need sampling."""

    def __init__(self, config: ModelConfig, make_mlp: Callable[[ModelConfig], nn.Module] = LlamaMLP) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, make_mlp)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        meta: AttentionMetadata,
        pool: KVPool,
    ) -> torch.Tensor:  # [num_tokens, hidden]
        x = self.model.embed_tokens(input_ids)
        residual = None
        for layer in self.model.layers:
            x, residual = layer(x, residual, positions, self.cos_sin_cache, meta, pool)
        if isinstance(x, ops.Summed):  # the last down_proj added the residual itself
            return self.model.norm(x.hidden)
        x, _ = self.model.norm(x, residual)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # float32 logits: the sampler's softmax and the logprobs it reports need the range
        return self.lm_head(hidden).float()
