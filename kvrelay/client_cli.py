"""`kvrelay generate` (stream an answer to the terminal) and `kvrelay status`."""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc
from google.protobuf.json_format import MessageToDict

from kvrelay.client import Client
from kvrelay.errors import UsageError
from kvrelay.rpc.auth import SecurityConfigError
from kvrelay.v1 import common_pb2

API_KEY_ENV = "KVRELAY_API_KEY"


def _client(args: argparse.Namespace) -> Client:
    """A client for the CLI's connection flags (kvrelay/cli.py add_connection_args) and KVRELAY_API_KEY."""
    try:
        return Client(
            args.address,
            api_key=os.environ.get(API_KEY_ENV) or None,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except SecurityConfigError as exc:
        raise UsageError(str(exc)) from None


def _rpc_error(exc: grpc.RpcError, address: str) -> UsageError:
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return UsageError(
            f"no gateway answers at {address} (start one with `kvrelay up`; a TLS gateway wants --tls or --tls-ca): "
            f"{exc.details()}"
        )
    if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
        return UsageError(f"UNAUTHENTICATED: {exc.details()} (the kvrelay command sends {API_KEY_ENV})")
    return UsageError(f"{exc.code().name}: {exc.details()}")


def generate_command(args: argparse.Namespace) -> int:
    messages = [] if args.system is None else [{"role": "system", "content": args.system}]
    user = [{"role": "user", "content": args.prompt}]
    kwargs = {"prompt": args.prompt} if args.raw else {"messages": messages + user}
    finish = None
    tokens: list[int] = []
    text = []
    with _client(args) as client:
        try:
            for chunk in client.generate(
                timeout=args.timeout,
                max_tokens=args.max_tokens,
                stop=args.stop,
                session_id=args.session_id,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                seed=args.seed,
                **kwargs,
            ):
                tokens.extend(chunk.token_ids)
                text.append(chunk.text)
                if not args.json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                if chunk.HasField("finish"):
                    finish = chunk.finish
        except grpc.RpcError as exc:
            raise _rpc_error(exc, args.address) from exc
    if args.json:
        record = {"text": "".join(text), "token_ids": tokens, "finish": MessageToDict(finish) if finish else None}
        print(json.dumps(record, ensure_ascii=False))
    else:
        reason = common_pb2.FinishReason.Name(finish.reason).removeprefix("FINISH_REASON_").lower() if finish else "?"
        t = finish.timings if finish else None
        print()
        if t is not None:
            print(
                f"[{finish.completion_tokens} tokens, {reason}; ttft {t.ttft_ms:.0f} ms, total {t.total_ms:.0f} ms]",
                file=sys.stderr,
            )
    return 0


def status_command(args: argparse.Namespace) -> int:
    with _client(args) as client:
        try:
            status = client.status()
        except grpc.RpcError as exc:
            raise _rpc_error(exc, args.address) from exc
    if args.json:
        print(json.dumps(MessageToDict(status, always_print_fields_with_no_presence=True)))
        return 0
    print(
        f"blocks: {status.blocks_used} used, {status.blocks_free} free of {status.num_blocks}; "
        f"active sessions: {status.active_sessions}"
    )
    for w in status.workers:
        print(
            f"  {w.role:<8} {w.worker_id:<40} {w.address:<22} active {w.active_sessions:<4} queued {w.queued:<4} "
            f"heartbeat {w.last_heartbeat_ms_ago:.0f} ms ago"
        )
    return 0
