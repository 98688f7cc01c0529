"""Rebuild HF tokenizer files (tokenizer.json, tokenizer_config.json) from a llama.cpp GGUF file's metadata.

A GGUF stores the vocabulary, merges and special ids, but not the pre-tokenizer: only its llama.cpp name in
`tokenizer.ggml.pre`. The ids a model was trained on depend on that pre-tokenizer, so each name maps here to the
regexes llama.cpp runs for it (`llm_tokenizer_bpe` in llama-vocab.cpp), written as an HF pre-tokenizer.

transformers' own GGUF conversion does not know `smollm` and falls back to plain GPT-2 rules; SmolLM2 was trained
with every digit split on its own first, so those ids differ (e.g. "x =   42": GPT-2 rules give "  " + " 4",
llama.cpp and SmolLM2's own tokenizer.json give "   " + "4").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf

# llama.cpp token types (gguf.TokenType)
TOKEN_NORMAL = 1
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

# The GPT-2 split as llama.cpp writes it. HF's ByteLevel(use_regex=True) runs the same regex with a trailing "|\s+";
# the two split alike because llama.cpp keeps unmatched text as its own piece, and the only text this regex leaves
# unmatched is a single whitespace character before a non-space, which "\s+" would take alone too.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's spelling of the Llama 3 regex: "(?i:'s|...)" written as explicit classes, so it matches the same
# strings under any regex engine (Unicode case folding would let "(?i:'s)" match "'ſ" too).
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# HF pre-tokenizer steps. "Isolated" Split keeps both the matches and the text between them as pieces, which is
# what llama.cpp's unicode_regex_split does with each regex of a pre-type, in order.
_DIGITS = {"type": "Digits", "individual_digits": True}
_BYTE_LEVEL_GPT2 = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_BYTE_LEVEL_ONLY = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}


def _split(pattern: str) -> dict[str, Any]:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


_GPT2_STEPS = [_BYTE_LEVEL_GPT2]
# "\p{N}" then GPT-2: the same steps as SmolLM2's and StarCoder's published tokenizer.json (Digits splits every
# character of general category N alone, as "\p{N}" does).
_DIGITS_GPT2_STEPS = [_DIGITS, _BYTE_LEVEL_GPT2]
_LLAMA3_STEPS = [_split(_LLAMA3_SPLIT), _BYTE_LEVEL_ONLY]
_QWEN2_STEPS = [_split(_QWEN2_SPLIT), _BYTE_LEVEL_ONLY]
# llama.cpp's fallback for a BPE vocabulary whose file names no (or the "default") pre-tokenizer.
_DEFAULT_STEPS = [
    _split(r"[\p{P}\$\+<=>\^~\|]+"),
    _split(_GPT2_SPLIT),
    _split(r"\p{N}+"),
    _split(r"[0-9][0-9][0-9]"),
    _BYTE_LEVEL_ONLY,
]

# tokenizer.ggml.pre -> pre-tokenizer steps; names grouped as llama.cpp groups them.
PRE_TOKENIZERS: dict[str, list[dict[str, Any]]] = {
    "default": _DEFAULT_STEPS,
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "exaone4"], _GPT2_STEPS),
    **dict.fromkeys(
        ["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"], _DIGITS_GPT2_STEPS
    ),
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx", "smaug-bpe"], _LLAMA3_STEPS
    ),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "megrez", "stablelm2"], _QWEN2_STEPS),
}
# Pre-types where llama.cpp looks a whole piece up in the vocabulary before merging (`ignore_merges`), and where
# it adds BOS unless the file says otherwise.
_IGNORE_MERGES = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"}
_ADD_BOS_DEFAULT = _IGNORE_MERGES

# llama.cpp also ends generation on any token spelled like one of these (llama_vocab::impl::load, "special_eog_ids"):
# SmolLM2-Instruct's eos is <|im_end|>, but a small model may still write <|endoftext|>.
EOG_TEXTS = (
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
)


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def tokenizer_files_from_gguf(reader: gguf.GGUFReader) -> tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) contents for the byte-level BPE tokenizer the file describes.

    Raises ValueError for a tokenizer model other than "gpt2" (byte-level BPE) or a pre-tokenizer name not in
    PRE_TOKENIZERS, rather than guess: wrong splitting still gives plausible text, only with ids the model never saw.
    """
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"GGUF tokenizer.ggml.model={model!r} is not supported: only 'gpt2' (byte-level BPE) can be converted"
        )
    pre = _field(reader, "tokenizer.ggml.pre") or "default"  # llama.cpp treats a missing name as "default"
    if pre not in PRE_TOKENIZERS:
        known = ", ".join(sorted(PRE_TOKENIZERS))
        raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported; known pre-tokenizers: {known}")
    tokens: list[str] = _field(reader, "tokenizer.ggml.tokens")
    merges: list[str] | None = _field(reader, "tokenizer.ggml.merges")
    if not tokens or not merges:
        raise ValueError("GGUF file has no tokenizer.ggml.tokens or tokenizer.ggml.merges")
    token_types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)

    # Vocabulary as the file spells it (byte-level characters); llama.cpp renames empty tokens the same way.
    # On a duplicated spelling the later id wins, as in llama.cpp's token_to_id.
    tokens = [token or f"[EMPTY_{i}]" for i, token in enumerate(tokens)]
    vocab = {token: i for i, token in enumerate(tokens)}

    def token_id(key: str) -> int | None:
        index = _field(reader, key)
        return index if index is not None and 0 <= index < len(tokens) else None

    def token_at(key: str) -> str | None:
        index = token_id(key)
        return None if index is None else tokens[index]

    # Control tokens are matched whole anywhere in the text (llama.cpp tokenizes with parse_special) and dropped by
    # skip_special_tokens. User-defined ones (like <think>) are matched whole too, but are text: llama.cpp prints
    # them even when it hides control tokens, so they are not special.
    added_tokens = [
        {
            "id": i,
            "content": tokens[i],
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": token_type == TOKEN_CONTROL,
        }
        for i, token_type in enumerate(token_types)
        if token_type in (TOKEN_CONTROL, TOKEN_USER_DEFINED)
    ]

    bos_id, eos_id = token_id("tokenizer.ggml.bos_token_id"), token_id("tokenizer.ggml.eos_token_id")
    bos_token, eos_token = token_at("tokenizer.ggml.bos_token_id"), token_at("tokenizer.ggml.eos_token_id")
    add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", pre in _ADD_BOS_DEFAULT)) and bos_token is not None
    add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token", False)) and eos_token is not None

    # HF applies BOS/EOS through the post-processor; kvrelay's Tokenizer adds them itself from the config flags.
    def template(sequence: str, type_id: int) -> list[dict]:
        bos = [{"SpecialToken": {"id": bos_token, "type_id": type_id}}] if add_bos else []
        eos = [{"SpecialToken": {"id": eos_token, "type_id": type_id}}] if add_eos else []
        return [*bos, {"Sequence": {"id": sequence, "type_id": type_id}}, *eos]

    special = {
        tokens[i]: {"id": tokens[i], "ids": [i], "tokens": [tokens[i]]} for i in (bos_id, eos_id) if i is not None
    }
    post_processor = {
        "type": "TemplateProcessing",
        "single": template("A", 0),
        "pair": template("A", 0) + template("B", 1),
        "special_tokens": special,
    }

    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added_tokens,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": PRE_TOKENIZERS[pre]},
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": pre in _IGNORE_MERGES,
            "vocab": vocab,
            # "left right", the file's own spelling; byte-level tokens never contain a space.
            "merges": list(merges),
        },
    }

    eos_ids = [token_id(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")]
    eos_ids += [i for i, token in enumerate(tokens) if token in EOG_TEXTS]
    eos_token_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))

    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos_token,
        "eos_token": eos_token,
        "unk_token": token_at("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_at("tokenizer.ggml.padding_token_id"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        # Decoded text is the exact bytes; "cleaning" spaces before punctuation would also break streaming.
        "clean_up_tokenization_spaces": False,
        "chat_template": _field(reader, "tokenizer.chat_template"),
        # Not an HF key: every id that ends generation, eos first.
        "eos_token_ids": eos_token_ids,
        "gguf_pre_tokenizer": pre,
    }
    return tokenizer_json, tokenizer_config


def write_tokenizer_files(reader: gguf.GGUFReader, directory: str | Path) -> None:
    """Write tokenizer.json and tokenizer_config.json for the GGUF file into `directory`."""
    tokenizer_json, tokenizer_config = tokenizer_files_from_gguf(reader)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json, ensure_ascii=False), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config, indent=2, ensure_ascii=False), encoding="utf-8"
    )
