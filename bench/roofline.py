"""MI300X roofline: predicted decode time per step and prefill time from published model configs. Predictions only:
no MI300X has run kvrelay. Pure arithmetic (no torch, no GPU), so the table is reproducible and tested.

    python -m bench.roofline

Decode at batch B, context C: a step reads every weight its tokens route to once (bf16) plus each sequence's K/V
(int8, one float32 scale per token and head, as the pool stores it) over the bandwidth. An MoE layer reads the experts
its B tokens route to: E * (1 - (1 - k/E)^B) of E on average under uniform routing (k at batch 1), shared experts
always. The embedding is a row lookup (not counted); the LM head is read whole. Prefill: 2 FLOPs per active parameter
per token (the LM head for the last token only) plus causal attention, 2 * 2 * layers * heads * head_dim * L^2 / 2,
over the bf16 matmul rate.
"""

from __future__ import annotations

from dataclasses import dataclass

SPEC_BW = 5.3e12  # bytes/s, MI300X HBM3 (AMD's figure)
BW = 4.0e12  # assumed achievable (BENCHMARKS.md "MI300X roofline" says why)
SPEC_BF16 = 1307e12  # FLOP/s, MI300X dense bf16 (AMD's figure)
BF16 = 0.6 * SPEC_BF16  # assumed achievable
BF16_BYTES, KV_BYTES, SCALE_BYTES = 2, 1, 4

# Published configs (Hugging Face config.json of each model), the fields the arithmetic needs.
SHAPES: dict[str, dict] = {
    "llama3-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=128256, ffn=14336),
    "mixtral-8x7b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, vocab=32000, ffn=14336,
                         experts=8, top_k=2),
    "qwen1.5-moe-a2.7b": dict(hidden=2048, layers=24, heads=16, kv_heads=16, head_dim=128, vocab=151936, ffn=1408,
                              experts=60, top_k=4, shared_ffn=5632),
    "qwen2-57b-a14b": dict(hidden=3584, layers=28, heads=28, kv_heads=4, head_dim=128, vocab=151936, ffn=2560,
                           experts=64, top_k=8, shared_ffn=20480),
    "qwen3-30b-a3b": dict(hidden=2048, layers=48, heads=32, kv_heads=4, head_dim=128, vocab=151936, ffn=768,
                          experts=128, top_k=8),
    "olmoe-1b-7b": dict(hidden=2048, layers=16, heads=16, kv_heads=16, head_dim=128, vocab=50304, ffn=1024,
                        experts=64, top_k=8),
}  # fmt: skip


@dataclass(frozen=True)
class Params:
    """Parameter counts of one shape (norms and biases left out: under 0.01% of any shape here)."""

    attention: int  # per layer: q, k, v, o
    expert: int  # per expert (a dense FFN is one expert chosen always): gate, up, down
    shared: int  # per layer: shared experts and their gate, always read
    router: int  # per layer
    lm_head: int
    embedding: int
    layers: int
    experts: int
    top_k: int

    @property
    def total(self) -> int:
        per_layer = self.attention + self.experts * self.expert + self.shared + self.router
        return self.layers * per_layer + self.lm_head + self.embedding

    def experts_read(self, batch: int) -> float:
        """Experts a step of `batch` tokens reads per layer, on average under uniform routing."""
        if self.experts == self.top_k:
            return float(self.experts)
        return self.experts * (1 - (1 - self.top_k / self.experts) ** batch)

    def read(self, batch: int) -> float:
        """Weights a decode step reads (the embedding's rows not counted)."""
        per_layer = self.attention + self.experts_read(batch) * self.expert + self.shared + self.router
        return self.layers * per_layer + self.lm_head

    @property
    def active(self) -> int:
        """Weights one token computes with, the LM head included (the embedding not)."""
        per_layer = self.attention + self.top_k * self.expert + self.shared + self.router
        return self.layers * per_layer + self.lm_head


def params(c: dict) -> Params:
    h, q, kv = c["hidden"], c["heads"] * c["head_dim"], c["kv_heads"] * c["head_dim"]
    experts = c.get("experts", 1)
    shared = 3 * h * c["shared_ffn"] + h if "shared_ffn" in c else 0  # Qwen's shared expert has a 1-wide gate
    return Params(
        attention=h * q + 2 * h * kv + q * h,
        expert=3 * h * c["ffn"],
        shared=shared,
        router=h * experts if experts > 1 else 0,
        lm_head=c["vocab"] * h,
        embedding=c["vocab"] * h,
        layers=c["layers"],
        experts=experts,
        top_k=c.get("top_k", 1),
    )


def kv_bytes_per_token(c: dict) -> int:
    """int8 K and V and their float32 scales, per token of context, all layers."""
    return c["layers"] * 2 * c["kv_heads"] * (c["head_dim"] * KV_BYTES + SCALE_BYTES)


def decode_ms(c: dict, batch: int, context: int = 1024, bw: float = BW) -> float:
    p = params(c)
    nbytes = p.read(batch) * BF16_BYTES + batch * context * kv_bytes_per_token(c)
    return nbytes / bw * 1e3


def prefill_ms(c: dict, tokens: int, rate: float = BF16) -> float:
    p = params(c)
    flops = 2 * (p.active - p.lm_head) * tokens + 2 * p.lm_head
    flops += 2 * 2 * c["layers"] * c["heads"] * c["head_dim"] * tokens * tokens / 2
    return flops / rate * 1e3


def table() -> str:
    rows = [
        "| shape | params (B) | active (B) | weights read, batch 1 / 64 (GB) | decode ms/step batch 1: spec, assumed"
        " | batch 64: spec, assumed | tokens/s batch 64 (assumed) | prefill 2k tokens (ms, assumed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, c in SHAPES.items():
        p = params(c)
        b1, b64 = decode_ms(c, 1), decode_ms(c, 64)
        rows.append(
            f"| {name} | {p.total / 1e9:.2f} | {p.active / 1e9:.2f} | {p.read(1) * 2 / 1e9:.2f} / "
            f"{p.read(64) * 2 / 1e9:.2f} | {decode_ms(c, 1, bw=SPEC_BW):.2f}, **{b1:.2f}** | "
            f"{decode_ms(c, 64, bw=SPEC_BW):.2f}, **{b64:.2f}** | {64 / b64 * 1e3:,.0f} | {prefill_ms(c, 2048):.1f} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
