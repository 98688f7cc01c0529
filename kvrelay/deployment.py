"""A real deployment for end-to-end tests: `kvrelay up` as a child process (kvstore, prefill, decode, gateway)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from kvstore.sessions import SessionStore, WorkerInfo
from kvstore.shm import shm_path

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


def wait_or_kill(proc: subprocess.Popen, timeout_s: float) -> None:
    """Wait for a process that was asked to stop; kill it if it takes longer than timeout_s."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def free_port_run(n: int) -> int:
    """The first of n consecutive free ports."""
    for _ in range(200):
        base = random.randint(20000, 40000)
        if all(port_is_free(base + i) for i in range(n)):
            return base
    raise RuntimeError("no free port range")


@dataclass(frozen=True)
class Process:
    pid: int
    role: str  # kvstore, prefill, decode, colocated, gateway, redis: the module's package, or the program's name
    args: str


def role_of(args: str) -> str:
    """`python -m services.decode.server ...` -> decode; `gateway.server` -> gateway; `redis-server ...` -> redis."""
    argv = args.split()
    if "-m" in argv[:-1]:
        module = argv[argv.index("-m") + 1].split(".")
        return module[-2] if len(module) > 1 else module[0]
    return Path(argv[0]).name.removesuffix("-server") if argv else ""


def live_processes(*select: str) -> list[tuple[int, str]]:
    """(pid, command line) of the processes `ps` selects (e.g. "--ppid", "123" or "-e"), zombies left out. -ww: never
    cut a command line (without a terminal ps cuts at 80 columns, inside a worker's --port under a long path)."""
    ps = subprocess.run(["ps", "-ww", "-o", "pid=,stat=,args=", *select], capture_output=True, text=True).stdout
    out = []
    for line in ps.splitlines():
        pid, stat, args = line.strip().split(None, 2)
        if not stat.startswith("Z"):
            out.append((int(pid), args))
    return out


class Deployment:
    def __init__(
        self,
        *extra: str,
        decode_replicas: int = 1,
        prefill_replicas: int = 1,
        env: dict[str, str] | None = None,
        redis_url: str = REDIS_URL,
    ) -> None:
        """extra: flags of `kvrelay up`; env: variables for every process on top of this one's (e.g. a preset
        KVRELAY_DEPLOYMENT_SECRET, KVRELAY_API_KEYS, or a gateway setting `kvrelay up` has no flag for:
        {"KVRELAY_MAX_PROMPT_BYTES": "4000000"}); redis_url: the Redis it uses (a test's own, to fault it)."""
        self.redis_url = redis_url
        # KVRELAY_TEST_RUN (set by tests/conftest.py) marks everything one test run creates, so that its leftover check
        # sees its own things only, even beside another run or a live deployment
        self.name = f"kvtest{os.environ.get('KVRELAY_TEST_RUN', '')}{uuid.uuid4().hex[:8]}"
        self.base_port = free_port_run(2 + decode_replicas + prefill_replicas)
        self.port = free_port_run(1)
        self.address = f"127.0.0.1:{self.port}"
        argv = [
            sys.executable,
            "-m",
            "kvrelay.cli",
            "up",
            "--name",
            self.name,
            "--port",
            str(self.port),
            "--base-port",
            str(self.base_port),
            "--redis-url",
            redis_url,
            "--decode-replicas",
            str(decode_replicas),
            "--prefill-replicas",
            str(prefill_replicas),
            *extra,
        ]
        # the log lives as long as the deployment (stop() removes it; a failed start shows its tail first)
        self.log = Path(tempfile.gettempdir()) / f"{self.name}.log"
        self._output = ""
        self.proc = subprocess.Popen(
            argv, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=os.environ | (env or {})
        )
        deadline = time.monotonic() + 300
        while "kvrelay is up" not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"kvrelay up failed:\n{self.output()[-3000:]}")
            time.sleep(0.2)

    def processes(self) -> list[Process]:
        """The live child processes of this deployment's `kvrelay up`, read from the process table (so a process it
        restarted shows with its new pid). Zombies (exited, not yet reaped) are left out."""
        return [Process(pid, role_of(args), args) for pid, args in live_processes("--ppid", str(self.proc.pid))]

    def pids(self, role: str) -> list[int]:
        return sorted(p.pid for p in self.processes() if p.role == role)

    def audit(self, timeout_s: float = 10.0):
        """Poll until every block is free and no session is active (cancellations land asynchronously)."""

        async def poll():
            async with SessionStore(self.redis_url, self.name) as store:
                deadline = time.monotonic() + timeout_s
                while True:
                    report = await store.audit()
                    stats = await store.stats()
                    if (report.ok and stats.used == 0) or time.monotonic() > deadline:
                        return report, stats
                    await asyncio.sleep(0.1)  # the audit reads every key: do not hammer a shared Redis

        return asyncio.run(poll())

    def stop(self) -> int:
        """Stop every process, then remove what the deployment leaves on purpose (its Redis keys: the kvstore keeps
        them for a restart) and its log."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            wait_or_kill(self.proc, 60)
        self.drop_keys()
        self.output()  # keep the text: the file goes
        self.log.unlink(missing_ok=True)
        return self.proc.returncode

    def output(self) -> str:
        """Everything the deployment printed so far (also after stop(), which removes the file)."""
        if self.log.exists():
            self._output = self.log.read_text()
        return self._output

    def drop_keys(self) -> None:
        import redis

        client = redis.Redis.from_url(self.redis_url)
        try:
            keys = list(client.scan_iter(match=f"{self.name}:*", count=1000))
            if keys:
                client.unlink(*keys)
        finally:
            client.close()

    def leftovers(self) -> list[str]:
        """Processes or /dev/shm files of this deployment still around after stop()."""
        out = [str(p) for p in (shm_path(f"{self.name}-weights"), shm_path(f"{self.name}-pool")) if p.exists()]
        ps = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
        out += [line for line in ps.splitlines() if self.name in line or f"127.0.0.1:{self.base_port}" in line]
        return out

    # -- processes, for fault tests ----------------------------------------------------------------------------------

    def worker_pids(self, role: str) -> dict[int, int]:
        """Port -> pid of this deployment's live `role` processes (prefill, decode, colocated, gateway, kvstore),
        from the process table."""
        out = {}
        for pid, args in live_processes("-e"):
            argv = args.split()
            if f"{role}.server" in args and self.name in argv and "--port" in argv:
                out[int(argv[argv.index("--port") + 1])] = pid
        return out

    def pid_of(self, worker: WorkerInfo) -> int:
        """The pid of a registered worker (by the port of its address)."""
        port = int(worker.address.rsplit(":", 1)[1])
        return self.worker_pids(worker.role)[port]

    def session_owner(self, *, request_id: str | None = None, session_id: str | None = None) -> WorkerInfo | None:
        """The registered worker that owns the session of `session_id`, or the one serving `request_id` (the record's
        `owner`, looked up in the worker registry); None while nobody (or no live worker) owns it."""

        async def find() -> WorkerInfo | None:
            async with SessionStore(self.redis_url, self.name) as store:
                sids = [session_id] if session_id else await store._redis.smembers(store.key("sessions"))
                for sid in sids:
                    record = await store.get(sid)
                    if record is None or (request_id is not None and record.request_id != request_id):
                        continue
                    workers = {w.worker_id: w for w in await store.list_workers()}
                    return workers.get(record.owner or "")
                return None

        return asyncio.run(find())

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> list[str]:
        """Sends `sig` to a process of the deployment; returns its argv, so that respawn() can start it again."""
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        env = dict(
            item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if "=" in item
        )
        self._argv_env[tuple(argv)] = env
        os.kill(pid, sig)
        return argv

    def respawn(self, argv: list[str]) -> subprocess.Popen:
        """Starts a killed process again, with its argv and environment, as the supervisor would (a child of this
        process, stopped by supervisor_paused's end).

        No preexec_fn: a fork that runs Python in the child runs gRPC's fork handlers in the parent, which hang while
        a closed channel is still shutting down; without one, subprocess uses vfork. setpriv gives the child its
        SIGTERM when this process dies instead (no orphans)."""
        env = self._argv_env[tuple(argv)]
        setpriv = shutil.which("setpriv")
        wrapped = [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else argv
        # its own log: the launcher's children share one file offset, and would write over its lines
        with self._respawn_log.open("a") as log:
            proc = subprocess.Popen(wrapped, env=env, stdout=log, stderr=subprocess.STDOUT)
        self._respawned.append(proc)
        return proc

    def respawned_output(self) -> str:
        """What the processes started by respawn() printed (also after supervisor_paused, which removes the file)."""
        if getattr(self, "_respawn_log", None) is not None and self._respawn_log.exists():
            self._respawn_output = self._respawn_log.read_text()
        return getattr(self, "_respawn_output", "")

    @contextlib.contextmanager
    def supervisor_paused(self) -> Iterator[None]:
        """Stops (SIGSTOP) the `kvrelay up` process for the block, so that the processes the test kills stay dead
        (or are started again by respawn()) and nothing else changes behind its back: the launcher would stop the
        deployment at a child's exit (or restart it itself). Afterwards the deployment is stopped: the respawned
        processes, then `kvrelay up` (SIGTERM then SIGCONT, so that it wakes into its orderly stop). Call stop()
        after, for the keys and the log."""
        self._argv_env: dict[tuple[str, ...], dict[str, str]] = {}
        self._respawned: list[subprocess.Popen] = []
        self._respawn_log = self.log.with_name(f"{self.name}-respawned.log")
        self._respawn_output = ""
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            for proc in self._respawned:
                proc.terminate()
            for proc in self._respawned:
                wait_or_kill(proc, 30)
            self.respawned_output()  # keep the text: the file goes
            self._respawn_log.unlink(missing_ok=True)
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGCONT)
            wait_or_kill(self.proc, 120)
