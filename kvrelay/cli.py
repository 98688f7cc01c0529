"""The `kvrelay` command. Each subcommand lives in its own module; this file only parses and dispatches.

Bad arguments end with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from kvrelay.errors import UsageError
from kvrelay.model_config import DTYPES
from kvrelay.settings import UpSettings, add_arguments, from_namespace


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="weights/activations dtype")
    parser.add_argument("--kv-dtype", default="auto", help="KV format: auto, bf16, int8, fp8 or k=int8,v=bf16")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per KV block")


def resolve_model_dir(model: str | None) -> str:
    """The model as an HF directory, converting a GGUF once (with its progress bar) before any process starts.
    It runs the model code, so it is imported here, lazily: the rest of the CLI stays torch-free."""
    if model is not None and os.path.isdir(model):
        return model
    from services.model.default_model import resolve_model

    try:
        return str(resolve_model(model))
    except Exception as exc:
        raise UsageError(str(exc)) from exc


def add_connection_args(parser: argparse.ArgumentParser) -> None:
    """How to reach a gateway: its address, TLS; the API key comes from KVRELAY_API_KEY only (a flag would show it in
    `ps` to every user of the machine)."""
    parser.add_argument("--address", default=os.environ.get("KVRELAY_ADDRESS", "127.0.0.1:50051"))
    parser.add_argument("--tls", action="store_true", help="TLS, trusting the system's roots (see --tls-ca)")
    parser.add_argument(
        "--tls-ca", default=os.environ.get("KVRELAY_TLS_CA"), help="TLS, trusting this CA (PEM; env KVRELAY_TLS_CA)"
    )
    parser.add_argument(
        "--tls-cert", default=os.environ.get("KVRELAY_TLS_CERT"), help="client certificate (PEM), for mutual TLS"
    )
    parser.add_argument("--tls-key", default=os.environ.get("KVRELAY_TLS_KEY"), help="client certificate's key (PEM)")


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

    up = sub.add_parser("up", help="start kvstore, prefill, decode and gateway processes; Ctrl-C stops them all")
    add_arguments(up, UpSettings)

    gen = sub.add_parser("generate", help="stream an answer from a running gateway")
    gen.add_argument("prompt", help="user message (chat template applied unless --raw)")
    add_connection_args(gen)
    gen.add_argument("--raw", action="store_true")
    gen.add_argument("--system", default=None, help="system message")
    gen.add_argument("--max-tokens", type=int, default=256)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--session-id", default="")
    gen.add_argument("--timeout", type=float, default=300, help="deadline in seconds")
    gen.add_argument("--json", action="store_true", help="one JSON object at the end instead of streamed text")

    ckpt = sub.add_parser("make-checkpoint", help="write a random-weight HF checkpoint of a real model's shape")
    ckpt.add_argument("--preset", required=True, help="llama3-8b, llama3.2-1b, qwen2.5-0.5b, mistral-7b, tiny-llama3")
    ckpt.add_argument("--out", required=True)
    ckpt.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ckpt.add_argument("--seed", type=int, default=0)
    ckpt.add_argument("--device", default="cpu", help="where to draw the random numbers (cuda is much faster)")

    from kvrelay.loadgen.args import add_bench_serve_args

    bench = sub.add_parser("bench", help="benchmarks against a running gateway")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    add_bench_serve_args(bench_sub.add_parser("serve", help="load generator: TTFT, ITL, throughput, goodput"))

    status = sub.add_parser("status", help="workers, sessions, blocks used and free")
    add_connection_args(status)
    status.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            from services.offline import run_command

            return run_command(args)
        if args.command == "up":
            from kvrelay.launcher import up_command

            settings = from_namespace(UpSettings, args)
            return up_command(dataclasses.replace(settings, model=resolve_model_dir(settings.model)))
        if args.command == "make-checkpoint":
            from services.model.make_checkpoint import make_checkpoint

            try:
                print(make_checkpoint(args.preset, args.out, args.dtype, args.seed, args.device))
            except ValueError as exc:
                raise UsageError(str(exc)) from exc
            return 0
        if args.command == "bench" and args.bench_command == "serve":
            from kvrelay.loadgen.run import bench_serve_command

            return bench_serve_command(args)
        if args.command in ("generate", "status"):
            from kvrelay.client_cli import generate_command, status_command

            return generate_command(args) if args.command == "generate" else status_command(args)
    except UsageError as exc:
        print(f"kvrelay {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
