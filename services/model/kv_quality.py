"""Teacher-forced quality of a KV format: how often the top-1 next token matches an unquantized run, and perplexity.

Used by bench/kv_quality.py (the table in the README) and by the tests that hold the format thresholds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from kvstore.formats import bytes_per_token
from services.model.engine import Engine, EngineConfig


@dataclass(frozen=True)
class KVQuality:
    kv_dtype: str
    bytes_per_token: int
    top1_agreement: float  # fraction of positions whose argmax equals the reference run's argmax
    perplexity: float  # of the text itself under this run


def perplexity(logits: torch.Tensor, token_ids: list[int]) -> float:
    # logits [n, vocab] predict token_ids[1:]
    targets = torch.tensor(token_ids[1:], device=logits.device)
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), targets, reduction="mean")
    return math.exp(nll.item())


def measure(
    model_dir: Path,
    token_ids: list[int],
    kv_dtypes: list[str],
    dtype: str = "float32",
    device: str | None = None,
    fp8: torch.dtype | None = None,
) -> tuple[float, list[KVQuality]]:
    """(reference perplexity, one row per KV format). The reference keeps K/V in the model's own dtype. fp8: the e4m3
    flavour of the fp8 rows (torch.float8_e4m3fnuz: the MI300X's, on any device), default this platform's."""
    engine = Engine(EngineConfig(model_dir=model_dir, dtype=dtype, kv_dtype="auto", device=device), progress=False)
    ref_logits = engine.score(token_ids)
    ref_top1 = ref_logits.argmax(-1)
    rows = []
    c = engine.model_config
    for kv in kv_dtypes:
        engine.set_kv_dtype(kv, fp8)  # same weights, only the pool's format changes
        logits = engine.score(token_ids)
        rows.append(
            KVQuality(
                kv_dtype=str(engine.kv_spec),
                bytes_per_token=bytes_per_token(engine.kv_spec, c.num_layers, c.num_kv_heads, c.head_dim),
                top1_agreement=(logits.argmax(-1) == ref_top1).float().mean().item(),
                perplexity=perplexity(logits, token_ids),
            )
        )
    return perplexity(ref_logits, token_ids), rows
