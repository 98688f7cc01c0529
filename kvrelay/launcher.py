"""`kvrelay up`: start redis (if needed), kvstore, prefill and decode workers and the gateway as child processes;
wait until each is healthy; then supervise them. A worker or the gateway that exits is started again (same argv,
environment and port) after a backoff while the other replicas keep serving; so is a private Redis (same port,
config and password; its append-only file brings the state back). The deployment stops when the kvstore dies, when
one process keeps dying (the crash-loop limit), or on Ctrl-C / SIGTERM, and then stops every process, in order (no
orphans, no /dev/shm leftovers).
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from kvrelay.errors import UsageError
from kvrelay.rpc.auth import (
    SECRET_ENV,
    ApiKeys,
    SecurityConfigError,
    deployment_secret,
    new_deployment_secret,
    server_tls_credentials,
)
from kvrelay.settings import KVStoreSettings, UpSettings, to_argv
from kvstore.ipc_env import ipc_env
from kvstore.sessions import SessionStore, masked
from kvstore.shm import shm_path

# UpSettings fields a child process also has but must not inherit as they are: the launcher sets them per child.
LAUNCHER_ONLY = ("host", "port", "redis_url", "name")
REDIS_HINT = "no Redis answers at {url}: install it (apt-get install redis-server) or pass --redis-url/REDIS_URL"
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None

# Restart backoff. The first restart comes quickly (a process killed by the OOM killer or a stray signal usually runs
# again at once); each further one in a row waits twice as long, so that a process that keeps dying does not keep the
# machine busy loading the model, up to a cap so that a process whose cause went away is back within half a minute.
FIRST_RESTART_DELAY_S = 0.5
MAX_RESTART_DELAY_S = 30.0
# A process that stayed healthy this long has recovered: its next exit starts a new streak (first delay again, the
# crash-loop count from zero). Healthy time, not time since the start: a large model takes minutes to load, and a
# process that dies at every start must still count as crash-looping.
STABLE_AFTER_S = 60.0
# How often the supervisor looks at its children: an exit is noticed, logged and its restart planned within this.
POLL_S = 0.2
# The gateway's settings about who may call it, passed on as they are (files as absolute paths).
GATEWAY_SECURITY = ("tls_cert", "tls_key", "tls_client_ca", "api_keys_file")
# Roles that register in the worker registry (colocated processes are named decode-i).
WORKER_ROLES = ("prefill", "decode")
KVSTORE_EXIT = (
    "the kvstore owns the weights and the KV pool: a new one would allocate a fresh pool, which invalidates the KV of "
    "every session (Redis holds their block ids into this one)"
)


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


def use_mps(a: UpSettings) -> bool:
    """--mps / --no-mps as given; by default on where it can run and pays: an NVIDIA host with the MPS daemon and a
    disaggregated deployment (without MPS, processes on one GPU time-slice: the split's processes could not overlap)."""
    if a.mps is not None:
        return a.mps
    return a.mode == "disaggregated" and shutil.which("nvidia-cuda-mps-control") is not None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def say(message: str) -> None:
    print(f"kvrelay: {message}", file=sys.stderr, flush=True)


@dataclass
class Restarts:
    """When to start one process again after it exited, and when to give up on it. Pure (the caller measures how
    long the process was healthy), so the policy is tested without processes."""

    limit: int  # restarts in a row before giving up (UpSettings.max_restarts)
    streak: int = 0  # exits in a row, none after a run healthy for STABLE_AFTER_S
    total: int = 0  # restarts so far (the log counts them)

    def after_exit(self, healthy_for_s: float | None) -> float | None:
        """Seconds to wait before starting the process again, or None to give up (a crash loop).

        healthy_for_s: how long the process had been healthy when it exited (None: it never became healthy)."""
        if healthy_for_s is not None and healthy_for_s >= STABLE_AFTER_S:
            self.streak = 0
        self.streak += 1
        if self.streak > self.limit:
            return None
        self.total += 1
        return min(MAX_RESTART_DELAY_S, FIRST_RESTART_DELAY_S * 2 ** (self.streak - 1))


@dataclass
class Child:
    """One process of the deployment: how to start it again (the same argv, environment and port) and how to tell
    that it serves."""

    name: str  # e.g. decode-1; its role is the part before the dash
    argv: list[str]
    env: dict[str, str]  # on top of the launcher's environment
    proc: subprocess.Popen
    restarts: Restarts
    address: str = ""  # host:port of its gRPC health service ("": none, e.g. redis)
    service: str = ""  # the service its health must report SERVING
    essential: str = ""  # why its exit ends the deployment ("": it is restarted instead)
    healthy_since: float | None = None  # time.monotonic() when it last became healthy; None while it starts
    restart_at: float | None = None  # when a dead one starts again; None while it runs

    @property
    def role(self) -> str:
        return self.name.split("-")[0]


class Launcher:
    def __init__(self, settings: UpSettings) -> None:
        self.settings = settings
        self.children: list[Child] = []
        self.stopping = False
        self._tmp: str | None = None
        self.gpu_env: dict = {}
        self.mps: str | None = None
        self.redis_url = ""  # the one the children use (a private Redis's has a password: log masked(redis_url))

    def gateway_security(self) -> list[str]:
        """The gateway's TLS and API-key flags, checked here first: a missing file or a keys file without keys stops
        `kvrelay up` before any process starts (the gateway would fail the same way after the model loaded)."""
        a, argv = self.settings, []
        try:
            server_tls_credentials(a.tls_cert, a.tls_key, a.tls_client_ca)
            ApiKeys.load(a.api_keys_file)
        except SecurityConfigError as exc:
            raise UsageError(str(exc)) from None
        for name in GATEWAY_SECURITY:
            if getattr(a, name):
                argv += ["--" + name.replace("_", "-"), os.path.abspath(getattr(a, name))]
        return argv

    @property
    def tmp(self) -> str:
        """The launcher's private folder (0700): the MPS daemon's pipes, the private Redis's config, log and AOF.
        Made on first use, so that a Launcher built only to be asked something (tests) leaves no folder behind."""
        if self._tmp is None:
            self._tmp = tempfile.mkdtemp(prefix=f"kvrelay-{self.settings.name}-")  # named: a leftover says whose
        return self._tmp

    def spawn(
        self,
        name: str,
        argv: list[str],
        env: dict | None = None,
        *,
        address: str = "",
        service: str = "",
        essential: str = "",
    ) -> Child:
        """Start a child; address and service: its health check; essential: why its exit ends the deployment."""
        env = env or {}
        restarts = Restarts(self.settings.max_restarts)
        child = Child(name, argv, env, self.popen(argv, env), restarts, address, service, essential)
        self.children.append(child)
        return child

    def popen(self, argv: list[str], env: dict) -> subprocess.Popen:
        # Only ever from the main thread: PR_SET_PDEATHSIG fires when the *thread* that forked the child ends, so a
        # child started from a short-lived thread would be sent SIGTERM as soon as that thread finished.
        # Every child: the kvstore exports the weights and the pool by CUDA/HIP IPC and the workers map them, which
        # needs expandable segments off and ROCr's default IPC mode (kvstore/ipc_env.py says why).
        full_env = ipc_env(os.environ | self.gpu_env | env)
        return subprocess.Popen(argv, preexec_fn=_die_with_parent, start_new_session=True, env=full_env)

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
            raise UsageError(REDIS_HINT.format(url=masked(url)))
        port, password = free_port(), secrets.token_urlsafe(24)
        # A password, because any local user can reach a port on 127.0.0.1. It goes in a file only this user can read
        # (the folder is 0700), not on the command line, where `ps` shows it to everyone. Append-only persistence:
        # every write is in the folder's AOF before Redis answers it (appendfsync always: a write a worker saw
        # succeed is never lost, so a restarted redis-server holds exactly what its clients believe), and the
        # supervisor restarts a redis-server that exits on the same config. Should the file be lost anyway, the
        # kvstore re-creates the pool and the workers re-assert what they hold (kvstore/lua/recover_pool.lua).
        conf = os.path.join(self.tmp, "redis.conf")
        with open(os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(
                f'port {port}\nbind 127.0.0.1\nrequirepass "{password}"\ndir "{self.tmp}"\n'
                f'logfile "{os.path.join(self.tmp, "redis.log")}"\nsave ""\nappendonly yes\nappendfsync always\n'
            )
        self.spawn("redis", ["redis-server", conf])
        url = f"redis://:{password}@127.0.0.1:{port}/0"
        for _ in range(100):
            if redis_answers(url):
                none_at = masked(self.settings.redis_url)
                print(f"kvrelay: started a private redis-server at {masked(url)} (none answered at {none_at})")
                return url
            time.sleep(0.1)
        raise UsageError(f"redis-server did not start (log: {self.tmp}/redis.log)")

    async def until_healthy(self, child: Child, timeout_s: float) -> None:
        """Return once the child reports SERVING (and note when). RuntimeError if it exits first; TimeoutError after
        timeout_s, or at once when the launcher is stopping."""
        from kvrelay.rpc.health import wait_healthy

        proc, deadline = child.proc, time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{child.name} exited with code {proc.returncode} before it was healthy")
            if not child.address:  # the private Redis: healthy once it answers the deployment's password
                if await asyncio.to_thread(redis_answers, self.redis_url):
                    if child.proc is proc:
                        child.healthy_since = time.monotonic()
                    return
                if time.monotonic() > deadline or self.stopping:
                    raise TimeoutError(f"{child.name} did not answer within {timeout_s:g} s")
                await asyncio.sleep(0.1)
                continue
            try:
                await wait_healthy(child.address, child.service, timeout_s=1.0)
                if child.proc is proc:  # not a successor on the same port, started after this one died
                    child.healthy_since = time.monotonic()
                return
            except TimeoutError:
                if time.monotonic() > deadline or self.stopping:
                    raise

    def wait_healthy(self, child: Child) -> None:
        asyncio.run(self.until_healthy(child, self.settings.start_timeout))

    def start(self) -> str:
        a = self.settings
        security = self.gateway_security()
        self.redis_url = self.ensure_redis()
        if use_mps(a):
            self.start_mps()
        py = [sys.executable, "-m"]
        common = ["--name", a.name]
        # The Redis URL goes in the environment, not on the command line: it may hold a password (a private Redis's
        # always does), and `ps` shows every user the command lines, while a process's environment is its owner's.
        # The deployment secret travels the same way, for the same reason: internal services answer only calls that
        # carry it (kvrelay/rpc/auth.py). One per deployment, never printed; one already set is kept (so that a
        # process started by hand can join the deployment).
        redis_env = {"KVRELAY_REDIS_URL": self.redis_url, SECRET_ENV: deployment_secret() or new_deployment_secret()}
        kv_port = a.base_port
        # the model, pool and KV settings the kvstore shares with `kvrelay up`, by name (kvrelay/settings.py)
        pool = to_argv(dataclasses.replace(a, num_blocks=a.num_blocks or None), KVStoreSettings, skip=LAUNCHER_ONLY)
        kvstore = self.spawn(
            "kvstore",
            py + ["services.kvstore.server", "--port", str(kv_port), *common, *pool],
            redis_env,
            address=f"127.0.0.1:{kv_port}",
            service="kvrelay.internal.v1.KVStore",
            essential=KVSTORE_EXIT,
        )
        self.wait_healthy(kvstore)
        worker = ["--kvstore", f"127.0.0.1:{kv_port}", *common, "--max-batch-tokens", str(a.max_batch_tokens)]
        worker += ["--cpu-threads", str(self.cpu_threads()), "--session-ttl", str(a.session_ttl)]
        worker += ["--max-model-len", str(a.max_model_len)] if a.max_model_len else []
        worker += [] if a.split is None else ["--split" if a.split else "--no-split"]
        worker += ["--slo-itl-ms", str(a.slo_itl_ms)] if a.slo_itl_ms is not None else []
        decode_only = [] if a.decode_overlap else ["--no-overlap"]
        prefill_only = ["--slo-ttft-ms", str(a.slo_ttft_ms)] if a.slo_ttft_ms is not None else []
        waits = []
        port = kv_port
        if a.mode == "colocated":  # the baseline: each replica is one process that prefills and decodes
            for i in range(a.decode_replicas):
                port += 1
                argv = py + ["services.colocated.server", "--port", str(port), *worker, *decode_only, *prefill_only]
                service = "kvrelay.internal.v1.Decode"
                waits.append(self.spawn(f"decode-{i}", argv, redis_env, address=f"127.0.0.1:{port}", service=service))
        for role, count in (("prefill", a.prefill_replicas), ("decode", a.decode_replicas)):
            for i in range(count if a.mode == "disaggregated" else 0):
                port += 1
                argv = py + [f"services.{role}.server", "--port", str(port), *worker]
                argv += decode_only if role == "decode" else prefill_only
                service = f"kvrelay.internal.v1.{role.capitalize()}"
                env = redis_env | self.service_env(role)
                waits.append(self.spawn(f"{role}-{i}", argv, env, address=f"127.0.0.1:{port}", service=service))
        for child in waits:
            self.wait_healthy(child)
        address = f"{'127.0.0.1' if a.host in ('0.0.0.0', '::') else a.host}:{a.port}"
        health_at = address
        if a.tls_cert:
            # A TLS gateway (maybe wanting client certificates) is health-checked over a plaintext Unix socket in the
            # private folder instead: only this user can reach it.
            socket_path = os.path.join(self.tmp, "gateway.sock")
            security += ["--local-socket", socket_path]
            health_at = f"unix:{socket_path}"
        gateway = self.spawn(
            "gateway",
            py
            + ["gateway.server", "--kvstore", f"127.0.0.1:{kv_port}", *common, "--host", a.host, "--port", str(a.port)]
            + (["--max-model-len", str(a.max_model_len)] if a.max_model_len else [])
            + security,
            redis_env,
            address=health_at,
            service="kvrelay.v1.Gateway",
        )
        self.wait_healthy(gateway)
        return address

    # --- supervision ------------------------------------------------------------------------------------------------

    async def supervise(self) -> int:
        """Watch the children until a stop signal (0) or an exit that ends the deployment (1). Runs in the main thread
        (restarts are started here: see popen); a restarted process's health is awaited beside it, in a task, so that
        one slow start never delays noticing another exit."""
        waits: set[asyncio.Task] = set()
        try:
            while not self.stopping:
                for child in self.children:
                    if child.restart_at is None and child.proc.poll() is not None:
                        if not await self.exited(child):
                            return 1
                    elif child.restart_at is not None and time.monotonic() >= child.restart_at:
                        child.proc, child.restart_at = self.popen(child.argv, child.env), None
                        task = asyncio.create_task(self.healthy_again(child))
                        waits.add(task)
                        task.add_done_callback(waits.discard)
                await asyncio.sleep(POLL_S)
            return 0
        finally:
            for task in waits:
                task.cancel()

    async def exited(self, child: Child) -> bool:
        """Plan the restart of a child that exited; False when its exit ends the deployment (said why)."""
        code = child.proc.returncode
        if child.essential:
            say(f"{child.name} exited with code {code}; {child.essential}: stopping everything")
            return False
        healthy_for = None if child.healthy_since is None else time.monotonic() - child.healthy_since
        delay = child.restarts.after_exit(healthy_for)
        if delay is None:
            limit = child.restarts.limit
            why = (
                "restarts are off (--max-restarts 0)"
                if limit == 0
                else f"that is {limit} restarts in a row without {STABLE_AFTER_S:g} s healthy (--max-restarts)"
            )
            say(f"{child.name} exited with code {code}; {why}: giving up on it and stopping everything")
            return False
        child.healthy_since = None
        await self.forget(child)
        child.restart_at = time.monotonic() + delay
        say(f"{child.name} exited with code {code}; restarting in {delay:g} s (restart {child.restarts.total})")
        return True

    async def forget(self, child: Child) -> None:
        """Drop a dead worker's registry entries at once: gateways would route to it until the entries expire
        (WORKER_TTL_MS, 5 s), while the other replicas could serve. Its sessions are left alone: their leases run
        out and another worker adopts or reclaims them. Done before the restart, so only the dead process's entries
        have its address."""
        if child.role not in WORKER_ROLES:
            return

        async def drop() -> None:
            async with SessionStore(self.redis_url, self.settings.name) as store:
                for worker in await store.list_workers():
                    if worker.address == child.address:
                        await store.deregister_worker(worker.worker_id)

        try:
            await asyncio.wait_for(drop(), timeout=2.0)
        except Exception as exc:  # Redis away or slow: the entries expire by themselves
            say(f"could not drop {child.name}'s registry entry ({type(exc).__name__}); it expires within seconds")

    async def healthy_again(self, child: Child) -> None:
        """Wait for a restarted child to serve; kill it if it does not within --start-timeout (its exit then counts
        towards the crash-loop limit like any other)."""
        proc, started, restart = child.proc, time.monotonic(), child.restarts.total
        try:
            await self.until_healthy(child, self.settings.start_timeout)
        except RuntimeError:  # it exited again: supervise sees that
            return
        except TimeoutError:
            if not self.stopping and proc.poll() is None:
                timeout = self.settings.start_timeout
                say(f"{child.name} was not healthy {timeout:g} s after restart {restart}; killing it")
                proc.kill()
            return
        say(f"{child.name} is healthy again ({time.monotonic() - started:.1f} s after restart {restart})")

    def stop(self) -> None:
        """Gateway first (no new work), then workers, then kvstore (it owns the memory), then redis."""
        self.stopping = True
        order = ["gateway", "prefill", "decode", "kvstore", "redis"]
        for prefix in order:
            procs = [c.proc for c in self.children if c.name.startswith(prefix) and c.proc.poll() is None]
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
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)


def up_command(args: UpSettings) -> int:
    """args.model must already be an HF directory (kvrelay/cli.py resolves it, converting a GGUF once with its
    progress bar, before any child starts)."""
    launcher = Launcher(args)
    starting = [True]

    def on_signal(signum, frame):
        launcher.stopping = True
        if starting[0]:  # interrupt the start wherever it waits; supervise and stop see `stopping` themselves
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        address = launcher.start()
        redis = masked(launcher.redis_url)
        tls = " --tls-ca CA.pem" if args.tls_cert else ""
        keys = "KVRELAY_API_KEY=<key> " if len(ApiKeys.load(args.api_keys_file)) else ""
        print(f"kvrelay is up: gateway at {address} (Redis {redis}, deployment {args.name!r})")
        print(f'  try: {keys}kvrelay generate --address {address}{tls} "Tell me a joke about GPUs."')
        print("  stop: Ctrl-C")
        sys.stdout.flush()
        starting[0] = False
        return asyncio.run(launcher.supervise())
    except KeyboardInterrupt:
        return 0
    except (RuntimeError, TimeoutError) as exc:
        print(f"kvrelay up: {exc}", file=sys.stderr)
        return 1
    finally:
        starting[0] = False  # a signal now only repeats the request: stop() runs to its end (it is bounded)
        if launcher.children:
            print("kvrelay: stopping...", file=sys.stderr)
        launcher.stop()
