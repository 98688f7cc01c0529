"""`kvrelay bench serve`'s flags, apart from the load generator so that building the CLI's parser stays light
(no gRPC, numpy or plotting imports for `kvrelay run` or `make-checkpoint`)."""

from __future__ import annotations

import argparse
import os


def add_bench_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("KVRELAY_ADDRESS", "127.0.0.1:50051"),
        help="the gateway (host:port); nothing else is called",
    )
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: Poisson arrivals, requests per second")
    load.add_argument("--concurrency", type=int, help="closed loop: this many requests in flight, always")
    parser.add_argument("--prompt-len", default="2048", help="prompt tokens: N or LOW:HIGH (uniform), random ids")
    parser.add_argument("--output-len", default="256", help="output tokens: N or LOW:HIGH (ignore_eos, exact)")
    parser.add_argument(
        "--dataset",
        default=None,
        help='JSONL of {"messages": [...]} | {"prompt": "..."} | {"prompt_token_ids": [...]}, optional "output_len"; '
        "replaces --prompt-len",
    )
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of arrivals left out of the numbers")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of measured arrivals")
    parser.add_argument(
        "--drain-timeout", type=float, default=60.0, help="seconds the requests still open after --duration may take"
    )
    parser.add_argument("--seed", type=int, default=0, help="arrivals, lengths and prompts")
    parser.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput: TTFT limit (unset: none)")
    parser.add_argument("--slo-itl-ms", type=float, default=None, help="goodput: limit of a request's mean ITL")
    parser.add_argument("--label", default="default", help="names the run (e.g. colocated, disaggregated)")
    parser.add_argument("--out", default="bench/results", help="folder for serve_<label>.json and the PNG plots")
    parser.add_argument("--no-plots", action="store_true", help="JSON and table only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
