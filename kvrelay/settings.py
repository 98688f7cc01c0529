"""Typed settings, one frozen class per process: every field is a command-line flag and a `KVRELAY_*` variable.

    settings = parse(DecodeSettings)          # sys.argv[1:] and os.environ
    settings.max_decode_batch                  # typed, immutable

A field `max_batch_tokens` is `--max-batch-tokens` on the command line and `KVRELAY_MAX_BATCH_TOKENS` in the
environment; a flag wins over the variable, the variable over the default. A bool field is `--x` / `--no-x` and
`KVRELAY_X=1|0`. `redis_url` also reads `REDIS_URL`, the name the Redis world uses. The README's settings table is
printed by `python -m kvrelay.settings` (tests/kvrelay/test_settings.py checks that it is current).

Why not pydantic-settings: the GPU machines this project benchmarks on have no package registry, and these ~150
lines cover what kvrelay needs (typed fields, flags, variables, choices, help) with the standard library alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

ENV_PREFIX = "KVRELAY_"
T = TypeVar("T")


def setting(default: Any, help: str, *, choices: Sequence[str] | None = None, env: Sequence[str] = ()) -> Any:
    """A settings field. env: extra variable names read after KVRELAY_<NAME> (e.g. REDIS_URL)."""
    return field(default=default, metadata={"help": help, "choices": choices, "env": tuple(env)})


SLO_TTFT_HELP = (
    "TTFT SLO (ms): a prompt predicted to miss it behind the queue is refused (RESOURCE_EXHAUSTED); the split's target "
    "(default: 2000 on a GPU, off on the CPU; 0: off)"
)
SLO_ITL_HELP = (
    "ITL SLO (ms), on a request's mean: the split keeps decode's ITL under 0.8 of it (default: 20 on a GPU, off on the "
    "CPU)"
)

# --- the processes --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSettings:
    """What every long-running process has: where it listens, which Redis and which deployment it belongs to."""

    host: str = setting("127.0.0.1", "listen address")
    port: int = setting(0, "listen port")
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0", "Redis URL (credentials and TLS in it: rediss://user:pass@host)", env=["REDIS_URL"]
    )
    name: str = setting("kvrelay", "deployment name: the Redis key prefix and the /dev/shm file names")


@dataclass(frozen=True)
class ModelSettings:
    """Which checkpoint, in which dtypes, with which KV format (the kvstore, `kvrelay up` and `kvrelay run`)."""

    model: str | None = setting(None, "HF directory or .gguf file (default: SmolLM2-135M-Instruct)")
    dtype: str = setting("auto", "weights/activations dtype", choices=["auto", "bfloat16", "float16", "float32"])
    kv_dtype: str = setting("auto", "KV format: auto, bf16, int8, fp8 or k=int8,v=bf16")
    block_size: int = setting(16, "tokens per KV block")


@dataclass(frozen=True)
class KVStoreSettings(ModelSettings, ServerSettings):
    """The kvstore process: loads the weights once, allocates the KV pool, exports both."""

    port: int = setting(50070, "listen port")
    num_blocks: int | None = setting(None, "KV blocks in the pool (default: from kv_cache_mb)")
    kv_cache_mb: int = setting(1024, "KV pool size in MiB when num_blocks is not given")
    device: str | None = setting(None, "where the weights and the pool live (default: cuda if present, else cpu)")


@dataclass(frozen=True)
class WorkerSettings(ServerSettings):
    """What prefill, decode and colocated workers share."""

    kvstore: str = setting("127.0.0.1:50070", "kvstore address")
    worker_id: str | None = setting(None, "id in the worker registry (default: role-host-pid-random)")
    max_model_len: int | None = setting(None, "context limit (default: the model's)")
    max_batch_tokens: int = setting(2048, "token budget of one prefill forward pass (longer prompts are chunked)")
    cpu_threads: int = setting(0, "torch CPU threads in this process (0: torch's default; `kvrelay up` splits cores)")
    session_ttl: float = setting(
        3600.0, "seconds an idle session (its KV and token ids) is kept after its last turn (0: until evicted)"
    )
    split: bool | None = setting(
        None, "adapt the prefill/decode split to the measured load at run time (default: on a GPU; --no-split: fixed)"
    )
    slo_itl_ms: float | None = setting(None, SLO_ITL_HELP)


@dataclass(frozen=True)
class PrefillSettings(WorkerSettings):
    port: int = setting(50071, "listen port")
    slo_ttft_ms: float | None = setting(None, SLO_TTFT_HELP)
    prefill_graph_tokens: int = setting(
        256, "one-sequence chunks of up to this many new tokens replay a CUDA graph (0: always eager)"
    )
    block_wait_s: float = setting(10.0, "how long a prompt waits for KV blocks before RESOURCE_EXHAUSTED")


@dataclass(frozen=True)
class DecodeSettings(WorkerSettings):
    port: int = setting(50072, "listen port")
    max_decode_batch: int = setting(128, "largest decode batch captured in a CUDA graph")
    overlap: bool = setting(
        True,
        "queue step n+1 before reading step n's tokens (--no-overlap waits for each step: for comparisons)",
        env=["KVRELAY_DECODE_OVERLAP"],
    )


@dataclass(frozen=True)
class ColocatedSettings(DecodeSettings, PrefillSettings):
    """One process that prefills and decodes (the baseline every disaggregation claim is measured against)."""

    port: int = setting(50071, "listen port")


@dataclass(frozen=True)
class GatewaySettings(ServerSettings):
    port: int = setting(50051, "listen port")
    kvstore: str = setting("127.0.0.1:50070", "kvstore address (the gateway reads the model directory from it)")
    max_model_len: int | None = setting(None, "context limit (default: the model's)")
    model_name: str | None = setting(None, "name clients may send in GenerateRequest.model (default: the directory's)")
    tls_cert: str | None = setting(None, "TLS certificate chain (PEM) of the public port; with --tls-key: TLS only")
    tls_key: str | None = setting(None, "TLS private key (PEM) of --tls-cert")
    tls_client_ca: str | None = setting(None, "require client certificates signed by this CA (PEM): mutual TLS")
    api_keys_file: str | None = setting(
        None, "API keys, one a line ('#' comments); with these or KVRELAY_API_KEYS (comma-separated) a key is required"
    )
    local_socket: str | None = setting(
        None, "also listen on this Unix socket, plaintext (`kvrelay up` health-checks a TLS gateway through one)"
    )
    max_prompt_bytes: int = setting(
        1 << 20, "longest prompt (or all messages together) in UTF-8 bytes; longer is INVALID_ARGUMENT"
    )
    tokenize_threads: int = setting(2, "threads that tokenize and apply chat templates, off the event loop")


@dataclass(frozen=True)
class UpSettings(ModelSettings):
    """`kvrelay up`: the whole deployment as child processes of one launcher."""

    num_blocks: int | None = setting(None, "KV blocks in the pool (default: from kv_cache_mb)")
    kv_cache_mb: int = setting(1024, "KV pool size in MiB when num_blocks is not given")
    max_model_len: int | None = setting(None, "context limit (default: the model's)")
    max_batch_tokens: int = setting(2048, "token budget of one prefill forward pass")
    prefill_replicas: int = setting(1, "prefill worker processes")
    decode_replicas: int = setting(1, "decode worker processes")
    mode: str = setting(
        "disaggregated",
        "colocated: one process per replica prefills and decodes (the baseline)",
        choices=["disaggregated", "colocated"],
    )
    decode_overlap: bool = setting(True, "decode workers overlap steps (--no-decode-overlap: for comparisons)")
    cpu_threads: int = setting(0, "torch threads of each prefill/decode process (0: the cores split among them)")
    slo_ttft_ms: float | None = setting(None, SLO_TTFT_HELP)
    slo_itl_ms: float | None = setting(None, SLO_ITL_HELP)
    split: bool | None = setting(
        None, "adapt the prefill/decode split to the measured load at run time (default: on a GPU; --no-split: fixed)"
    )
    mps: bool | None = setting(
        None,
        "NVIDIA: run the services under the MPS daemon, concurrently (default: when nvidia-cuda-mps-control is "
        "on PATH and the mode is disaggregated)",
    )
    prefill_sm_pct: int = setting(100, "with mps: cap on prefill's SM share (percent; an override, the split adapts)")
    decode_sm_pct: int = setting(100, "with mps: cap on decode's SM share (percent; an override)")
    prefill_cu_mask: str = setting("", "AMD: HSA_CU_MASK for prefill (e.g. 0:0-151)")
    decode_cu_mask: str = setting("", "AMD: HSA_CU_MASK for decode (e.g. 0:152-303)")
    host: str = setting("127.0.0.1", "gateway listen address")
    port: int = setting(50051, "gateway port")
    base_port: int = setting(50070, "kvstore port; workers take the ports after it")
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0", "Redis URL; none answering: a private redis-server is started", env=["REDIS_URL"]
    )
    name: str = setting("kvrelay", "deployment name: the Redis key prefix and the /dev/shm file names")
    start_timeout: float = setting(600.0, "seconds each process may take to be healthy")
    session_ttl: float = setting(
        3600.0, "seconds an idle session (its KV and token ids) is kept after its last turn (0: until evicted)"
    )
    tls_cert: str | None = setting(None, "gateway: TLS certificate chain (PEM); with --tls-key the gateway is TLS only")
    tls_key: str | None = setting(None, "gateway: TLS private key (PEM) of --tls-cert")
    tls_client_ca: str | None = setting(None, "gateway: require client certificates signed by this CA (PEM)")
    api_keys_file: str | None = setting(
        None, "gateway: API keys, one a line; with these or KVRELAY_API_KEYS (comma-separated) a key is required"
    )
    max_restarts: int = setting(
        5,
        "a worker or the gateway that exits is restarted; this many times in a row (none healthy for 60 s) and "
        "`kvrelay up` gives up and stops (0: stop at the first exit)",
    )


# Secrets come from the environment only, never from a flag: `ps` shows every user of the machine the command lines,
# while a process's environment is its owner's. kvrelay/rpc/auth.py reads them. (process, variable, what): rows of the
# README's table.
SECRET_VARIABLES = (
    (
        "kvrelay up, kvstore, prefill, decode, colocated, gateway",
        "KVRELAY_DEPLOYMENT_SECRET",
        "internal calls must carry it (`kvrelay up` makes one per deployment); unset: internal services are open",
    ),
    ("kvrelay up, gateway", "KVRELAY_API_KEYS", "API keys, comma-separated (beside --api-keys-file)"),
)

PROCESSES: dict[str, type] = {
    "kvrelay up": UpSettings,
    "gateway": GatewaySettings,
    "kvstore": KVStoreSettings,
    "prefill": PrefillSettings,
    "decode": DecodeSettings,
    "colocated": ColocatedSettings,
}


# --- parsing ----------------------------------------------------------------------------------------------------------


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_names(f: dataclasses.Field) -> tuple[str, ...]:
    return (ENV_PREFIX + f.name.upper(), *f.metadata.get("env", ()))


def _base_type(hint: Any) -> type:
    """int | None -> int; str -> str."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _convert(raw: str, kind: type, what: str) -> Any:
    if kind is bool:
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"{what}={raw!r}: expected 1/0, true/false, yes/no or on/off")
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{what}={raw!r}: expected {kind.__name__}") from None


def add_arguments(parser: argparse.ArgumentParser, cls: type, env: Mapping[str, str] | None = None) -> None:
    """One flag per field of cls; defaults come from the environment (KVRELAY_<NAME>) or the field's default.
    A malformed variable is a usage error (argparse exits 2 with one line)."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _base_type(hints[f.name])
        optional = type(None) in typing.get_args(hints[f.name])
        default = f.default
        for var in env_names(f):
            if var in env:
                try:
                    # an empty variable leaves an optional setting unset (compose's ${MODEL:-} when MODEL is not set)
                    default = None if optional and env[var] == "" else _convert(env[var], kind, var)
                except ValueError as exc:
                    parser.error(str(exc))
                break
        help_text = f"{f.metadata.get('help', '')} (env {env_names(f)[0]}; default: %(default)s)"
        if kind is bool:
            parser.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=help_text)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(flag(f.name), type=kind, default=default, choices=choices, help=help_text)


def from_namespace(cls: type[T], args: argparse.Namespace) -> T:
    """The settings object of an argparse namespace built by add_arguments (extra attributes are ignored)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def parse(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().splitlines()[0])
    add_arguments(parser, cls)
    return from_namespace(cls, parser.parse_args(argv))


def to_argv(settings: Any, cls: type | None = None, skip: Sequence[str] = ()) -> list[str]:
    """Flags that reproduce `settings` (only the fields cls also has, when given; never those in skip): how the
    launcher passes its settings on to a child process. A None field is left out (the child's default)."""
    names = {f.name for f in dataclasses.fields(cls)} if cls is not None else None
    argv: list[str] = []
    for f in dataclasses.fields(settings):
        if (names is not None and f.name not in names) or f.name in skip:
            continue
        value = getattr(settings, f.name)
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag(f.name) if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [flag(f.name), str(value)]
    return argv


def markdown_table() -> str:
    """The README's settings table: every process, every field, its flag, its variable and its default."""
    rows = ["| process | flag | environment | default | what |", "|---|---|---|---|---|"]
    for process, cls in PROCESSES.items():
        for f in dataclasses.fields(cls):
            default = "" if f.default is None else f.default
            envs = " / ".join(f"`{e}`" for e in env_names(f))
            rows.append(f"| {process} | `{flag(f.name)}` | {envs} | `{default}` | {f.metadata.get('help', '')} |")
    for process, var, what in SECRET_VARIABLES:
        rows.append(f"| {process} | (none: a secret) | `{var}` | | {what} |")
    return "\n".join(rows)


if __name__ == "__main__":
    sys.stdout.write(markdown_table() + "\n")
