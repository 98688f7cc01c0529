"""The `kvrelay` command. Each subcommand lives in its own module; this file only parses and dispatches.

Bad arguments end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from services.model.config import DTYPES


class UsageError(Exception):
    """A problem with what the user asked for: printed as one line, exit code 2."""


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights/activations dtype")
    parser.add_argument("--kv-dtype", default="auto", help="KV format: auto, bf16, int8, fp8 or k=int8,v=bf16")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvrelay", description="Disaggregated LLM serving on one GPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="generate offline in one process (batched over several prompts)")
    add_model_args(run)
    run.add_argument("--prompt", action="append", default=[], help="chat message (chat template applied); repeatable")
    run.add_argument("--raw", action="store_true", help="send --prompt text as is, without the chat template")
    run.add_argument("--prompt-ids", action="append", default=[], help="token ids as given, e.g. 1,2,3; repeatable")
    run.add_argument("--max-tokens", type=int, default=128)
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--min-p", type=float, default=0.0)
    run.add_argument("--repetition-penalty", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--max-batch-tokens", type=int, default=2048, help="prefill token budget per forward pass")
    run.add_argument("--json", action="store_true", help="one JSON object per prompt")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            from gateway.offline import run_command

            return run_command(args)
    except UsageError as exc:
        print(f"kvrelay {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
