"""Model configuration read from an HF config.json (Llama family: Llama 2/3/3.1, Mistral, Qwen2, SmolLM2)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# architectures name -> whether q/k/v projections carry a bias by default (Qwen2 does, the rest do not)
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": False,
    "MistralForCausalLM": False,
    "Qwen2ForCausalLM": True,
}

# The weight/activation dtypes a checkpoint may be run in, by name (services/model/engine.py maps them to torch's).
DTYPES = ("bfloat16", "float16", "float32")


class ModelConfigError(ValueError):
    """The checkpoint is missing, malformed, or of an architecture kvrelay does not run."""


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    # None or an HF rope-scaling dict ({"rope_type": "llama3", "factor": ..., ...})
    rope_scaling: dict | None = field(default=None, hash=False, compare=False)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    # Mistral's sliding window; None means full attention
    sliding_window: int | None = None

    @classmethod
    def from_dict(cls, raw: dict) -> ModelConfig:
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            got = ", ".join(archs) or raw.get("model_type", "none")
            raise ModelConfigError(
                f"unknown architecture {got!r}; kvrelay runs {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        try:
            num_heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            rope_theta, scaling = _rope(raw)
            eos = raw.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            window = raw.get("sliding_window") if raw.get("use_sliding_window", arch == "MistralForCausalLM") else None
            return cls(
                architecture=arch,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=num_heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
                head_dim=int(raw.get("head_dim") or hidden // num_heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=rope_theta,
                max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                attention_bias=bool(raw.get("attention_bias", SUPPORTED_ARCHITECTURES[arch])),
                rope_scaling=scaling,
                bos_token_id=raw.get("bos_token_id"),
                eos_token_ids=eos_ids,
                torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
                sliding_window=int(window) if window else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelConfigError(f"malformed config.json: {exc!r}") from exc

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelConfigError(f"no config.json in {model_dir}")
        return cls.from_dict(json.loads(path.read_text()))


def _rope(raw: dict) -> tuple[float, dict | None]:
    """transformers < 5 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters with theta inside."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or params
    theta = float(raw.get("rope_theta") or params.get("rope_theta") or 10000.0)
    rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if rope_type in (None, "default"):
        return theta, None
    if rope_type not in ("llama3", "linear"):
        raise ModelConfigError(f"rope scaling {rope_type!r} is not supported (llama3 and linear are)")
    return theta, {k: v for k, v in scaling.items() if k not in ("rope_theta", "type")} | {"rope_type": rope_type}
