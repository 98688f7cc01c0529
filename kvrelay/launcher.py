"""`kvrelay up`: start redis (if needed), kvstore, prefill and decode workers and the gateway as child processes;
wait until each is healthy; stop them all, in order, on Ctrl-C or SIGTERM (no orphans, no /dev/shm leftovers).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from urllib.parse import urlparse

from kvrelay.errors import UsageError
from kvrelay.settings import KVStoreSettings, UpSettings, to_argv
from kvstore.shm import shm_path

# UpSettings fields a child process also has but must not inherit as they are: the launcher sets them per child.
LAUNCHER_ONLY = ("host", "port", "redis_url", "name")
REDIS_HINT = "no Redis answers at {url}: install it (apt-get install redis-server) or pass --redis-url/REDIS_URL"
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """Children get SIGTERM if the launcher itself is killed (-9): no orphans holding the GPU or /dev/shm."""
    if _libc is not None:
        _libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
    except Exception:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Launcher:
    def __init__(self, settings: UpSettings) -> None:
        self.settings = settings
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.stopping = False
        self.tmp = ""  # the deployment's private folder (MPS pipes, a private Redis), made by start()
        self.gpu_env: dict = {}
        self.mps: str | None = None

    def spawn(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        full_env = os.environ | self.gpu_env | (env or {})
        proc = subprocess.Popen(argv, preexec_fn=_die_with_parent, start_new_session=True, env=full_env)
        self.children.append((name, proc))
        return proc

    def start_mps(self) -> None:
        """NVIDIA: processes on one GPU only run concurrently as clients of the MPS daemon; each service then gets
        its share of the SMs from CUDA_MPS_ACTIVE_THREAD_PERCENTAGE, fixed when the process starts (as in Semi-PD)."""
        exe = shutil.which("nvidia-cuda-mps-control")
        if exe is None:
            raise UsageError("--mps needs the NVIDIA MPS daemon (nvidia-cuda-mps-control), which is not on PATH")
        pipe, logs = os.path.join(self.tmp, "mps-pipe"), os.path.join(self.tmp, "mps-log")
        os.makedirs(pipe), os.makedirs(logs)
        self.gpu_env = {"CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_MPS_LOG_DIRECTORY": logs}
        subprocess.run([exe, "-d"], env=os.environ | self.gpu_env, check=True)
        self.mps = exe
        print(
            f"kvrelay: started the MPS daemon (pipe {pipe}); SM shares: prefill {self.settings.prefill_sm_pct}%, "
            f"decode {self.settings.decode_sm_pct}%"
        )

    def service_env(self, role: str) -> dict:
        """The compute split of one service: MPS thread percentage on NVIDIA, HSA_CU_MASK on AMD."""
        a, env = self.settings, {}
        if self.mps:
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(a.prefill_sm_pct if role == "prefill" else a.decode_sm_pct)
            if role == "prefill":
                # MPS client priority (drivers that know it; others ignore the variable): 1 = below normal, so the
                # hardware schedules decode's work first when both wait for SMs; decode's stream is also the
                # highest-priority one (services/common/worker.py OwnStream).
                env["CUDA_MPS_CLIENT_PRIORITY"] = "1"
        mask = a.prefill_cu_mask if role == "prefill" else a.decode_cu_mask
        if mask:
            env["HSA_CU_MASK"] = mask
        return env

    def cpu_threads(self) -> int:
        """torch threads of each compute process: the cores this launcher may use, split among them, so that what
        they compute on the CPU (the whole model, on a CPU machine) does not fight over the same cores
        (services/common/worker.py set_cpu_threads has the measurements)."""
        a = self.settings
        if a.cpu_threads > 0:
            return a.cpu_threads
        processes = a.decode_replicas + (a.prefill_replicas if a.mode == "disaggregated" else 0)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        return max(1, cores // max(1, processes))

    def ensure_redis(self) -> str:
        url = self.settings.redis_url
        if redis_answers(url):
            return url
        if not shutil.which("redis-server"):
            raise UsageError(REDIS_HINT.format(url=url))
        port = free_port()
        self.spawn(
            "redis",
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self.tmp,
                "--logfile",
                os.path.join(self.tmp, "redis.log"),
            ],
        )
        url = f"redis://127.0.0.1:{port}/0"
        for _ in range(100):
            if redis_answers(url):
                print(f"kvrelay: started a private redis-server at {url} (none answered at {self.settings.redis_url})")
                return url
            time.sleep(0.1)
        raise UsageError(f"redis-server did not start (log: {self.tmp}/redis.log)")

    def wait_healthy(self, name: str, address: str, service: str, proc: subprocess.Popen, timeout_s: float) -> None:
        from kvrelay.rpc.health import wait_healthy

        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode} before it was healthy")
            try:
                asyncio.run(wait_healthy(address, service, timeout_s=1.0))
                return
            except TimeoutError:
                if time.monotonic() > deadline or self.stopping:
                    raise

    def start(self) -> str:
        a = self.settings
        self.tmp = tempfile.mkdtemp(prefix=f"kvrelay-{a.name}-")  # named: a leftover says whose
        redis_url = self.ensure_redis()
        if a.mps:
            self.start_mps()
        py = [sys.executable, "-m"]
        common = ["--redis-url", redis_url, "--name", a.name]
        kv_port = a.base_port
        # the model, pool and KV settings the kvstore shares with `kvrelay up`, by name (kvrelay/settings.py)
        pool = to_argv(dataclasses.replace(a, num_blocks=a.num_blocks or None), KVStoreSettings, skip=LAUNCHER_ONLY)
        kvstore = self.spawn("kvstore", py + ["services.kvstore.server", "--port", str(kv_port), *common, *pool])
        self.wait_healthy("kvstore", f"127.0.0.1:{kv_port}", "kvrelay.internal.v1.KVStore", kvstore, a.start_timeout)
        worker = ["--kvstore", f"127.0.0.1:{kv_port}", *common, "--max-batch-tokens", str(a.max_batch_tokens)]
        worker += ["--cpu-threads", str(self.cpu_threads())]
        worker += ["--max-model-len", str(a.max_model_len)] if a.max_model_len else []
        decode_only = [] if a.decode_overlap else ["--no-overlap"]
        waits = []
        port = kv_port
        if a.mode == "colocated":  # the baseline: each replica is one process that prefills and decodes
            for i in range(a.decode_replicas):
                port += 1
                argv = py + ["services.colocated.server", "--port", str(port), *worker, *decode_only]
                proc = self.spawn(f"decode-{i}", argv)
                waits.append((f"colocated-{i}", f"127.0.0.1:{port}", "kvrelay.internal.v1.Decode", proc))
        for role, count in (("prefill", a.prefill_replicas), ("decode", a.decode_replicas)):
            for i in range(count if a.mode == "disaggregated" else 0):
                port += 1
                argv = py + [f"services.{role}.server", "--port", str(port), *worker]
                argv += decode_only if role == "decode" else []
                proc = self.spawn(f"{role}-{i}", argv, self.service_env(role))
                waits.append((f"{role}-{i}", f"127.0.0.1:{port}", f"kvrelay.internal.v1.{role.capitalize()}", proc))
        for name, address, service, proc in waits:
            self.wait_healthy(name, address, service, proc, a.start_timeout)
        gateway = self.spawn(
            "gateway",
            py
            + ["gateway.server", "--kvstore", f"127.0.0.1:{kv_port}", *common, "--host", a.host, "--port", str(a.port)]
            + (["--max-model-len", str(a.max_model_len)] if a.max_model_len else []),
        )
        address = f"{'127.0.0.1' if a.host in ('0.0.0.0', '::') else a.host}:{a.port}"
        self.wait_healthy("gateway", address, "kvrelay.v1.Gateway", gateway, a.start_timeout)
        return address

    def stop(self) -> None:
        """Gateway first (no new work), then workers, then kvstore (it owns the memory), then redis."""
        self.stopping = True
        order = ["gateway", "prefill", "decode", "kvstore", "redis"]
        for prefix in order:
            procs = [p for n, p in self.children if n.startswith(prefix) and p.poll() is None]
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.mps:
            subprocess.run([self.mps], input="quit\n", text=True, env=os.environ | self.gpu_env, check=False)
        for suffix in ("weights", "pool"):  # kvstore removes them itself; a killed one leaves them behind
            shm_path(f"{self.settings.name}-{suffix}").unlink(missing_ok=True)
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)


def up_command(args: UpSettings) -> int:
    """args.model must already be an HF directory (kvrelay/cli.py resolves it, converting a GGUF once with its
    progress bar, before any child starts)."""
    launcher = Launcher(args)
    stop_requested = []

    def on_signal(signum, frame):
        stop_requested.append(signum)
        launcher.stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        address = launcher.start()
        parsed = urlparse(args.redis_url)
        print(f"kvrelay is up: gateway at {address} (Redis {parsed.hostname}:{parsed.port}, deployment {args.name!r})")
        print(f'  try: kvrelay generate --address {address} "Tell me a joke about GPUs."')
        print("  stop: Ctrl-C")
        sys.stdout.flush()
        while True:
            for name, proc in launcher.children:
                if proc.poll() is not None:
                    print(f"kvrelay: {name} exited with code {proc.returncode}; stopping everything", file=sys.stderr)
                    return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"kvrelay up: {exc}", file=sys.stderr)
        return 1
    finally:
        if launcher.children:
            print("kvrelay: stopping...", file=sys.stderr)
        launcher.stop()
