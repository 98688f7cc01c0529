"""`kvrelay run`: tokenize, generate in this process with the offline engine, print text or JSON."""

from __future__ import annotations

import argparse
import json
import sys

from kvrelay.errors import UsageError
from kvrelay.model_config import ModelConfigError
from kvrelay.sampling import SamplingParams
from kvrelay.tokenizer import Tokenizer
from kvstore.allocator import OutOfBlocks
from services.model.default_model import resolve_model
from services.model.engine import Engine, EngineConfig, PromptTooLongError


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError as exc:
        raise UsageError(f"--prompt-ids wants comma-separated integers, got {text!r}") from exc
    if not ids:
        raise UsageError("--prompt-ids is empty")
    return ids


def run_command(args: argparse.Namespace) -> int:
    if not args.prompt and not args.prompt_ids:
        raise UsageError("give at least one --prompt or --prompt-ids")
    try:
        params = SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            repetition_penalty=args.repetition_penalty,
            seed=args.seed,
            max_tokens=args.max_tokens,
        )
        if args.block_size <= 0:
            raise ValueError(f"--block-size must be > 0, got {args.block_size}")
        model_dir = resolve_model(args.model)
        tokenizer = Tokenizer.from_dir(model_dir)
        cfg = EngineConfig(
            model_dir=model_dir,
            dtype=args.dtype,
            kv_dtype=args.kv_dtype,
            block_size=args.block_size,
            max_batch_tokens=args.max_batch_tokens,
        )
        engine = Engine(cfg)
        prompts = [
            tokenizer.encode(p) if args.raw else tokenizer.encode_chat([{"role": "user", "content": p}])
            for p in args.prompt
        ] + [parse_ids(ids) for ids in args.prompt_ids]
        eos = set(tokenizer.eos_token_ids) | set(engine.model_config.eos_token_ids)
        results = engine.generate(prompts, params, eos_token_ids=tuple(eos))
    except (ModelConfigError, PromptTooLongError, OutOfBlocks, ValueError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    for result in results:
        text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
        if args.json:
            record = {
                "prompt_token_ids": result.prompt_token_ids,
                "token_ids": result.token_ids,
                "text": text,
                "finish_reason": result.finish_reason,
            }
            print(json.dumps(record, ensure_ascii=False))
        else:
            print(text)
            if len(results) > 1:
                print("-" * 40)
    sys.stdout.flush()
    return 0
