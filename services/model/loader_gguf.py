"""Convert a llama.cpp GGUF file into an HF-layout directory (config.json, model.safetensors, tokenizer files).

Serving from GGUF directly would dequantize on every start; converting once lets later starts mmap safetensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from kvrelay.model_config import ModelConfigError
from services.model.gguf_tokenizer import tokenizer_files_from_gguf

# GGUF architecture -> HF architectures entry
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# GGUF tensor name (blk.N. prefix stripped) -> HF name (model.layers.N. prefix added)
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader: gguf.GGUFReader) -> dict:
    """An HF config.json dict from the GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelConfigError(f"unknown GGUF architecture {arch!r}; kvrelay converts {', '.join(ARCHITECTURES)}")
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    vocab = _field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "bfloat16",
    }
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": float(_field(reader, f"{arch}.rope.scaling.factor"))}
    return config


def _permute_back(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's convert-time Q/K row permutation.

    llama.cpp stores each head's rows as (half, pair) interleaved; HF keeps the two rotary halves as (pair, half).
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def state_dict_from_gguf(reader: gguf.GGUFReader, config: dict, progress: bool = True) -> dict[str, torch.Tensor]:
    """Dequantize every tensor to float32 and rename it to HF's names, Q/K rows back in HF's rotary order."""
    state: dict[str, torch.Tensor] = {}
    unpermute = config["model_type"] == "llama"  # llama.cpp permutes Q/K only for the llama architecture
    for tensor in tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", disable=not progress):
        match = re.fullmatch(r"blk\.(\d+)\.(.+)", tensor.name)
        if match:
            suffix = LAYER_NAMES.get(match.group(2))
            name = suffix and f"model.layers.{match.group(1)}.{suffix}"
        else:
            name = GLOBAL_NAMES.get(tensor.name)
        if name is None:
            continue  # rope_freqs and other llama.cpp-only tensors
        # ggml lists dims innermost first; dequantize returns the row-major [out, in] array HF uses
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        array = array.reshape([int(d) for d in reversed(tensor.shape)])
        if unpermute and name.endswith(("q_proj.weight", "q_proj.bias")):
            array = _permute_back(array, config["num_attention_heads"])
        elif unpermute and name.endswith(("k_proj.weight", "k_proj.bias")):
            array = _permute_back(array, config["num_key_value_heads"])
        state[name] = torch.from_numpy(np.ascontiguousarray(array))
    return state


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Write an HF-layout directory for the GGUF file; written to a temp dir and renamed so a crash leaves nothing."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ModelConfigError(f"no such GGUF file: {gguf_path}")
    reader = gguf.GGUFReader(str(gguf_path))
    config = config_from_gguf(reader)
    tokenizer_json, tokenizer_config = tokenizer_files_from_gguf(reader)
    state = state_dict_from_gguf(reader, config, progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": gguf_path.name})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
