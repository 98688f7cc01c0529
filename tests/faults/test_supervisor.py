"""`kvrelay up` is a supervisor, not a tripwire: a worker or the gateway killed with -9 comes back on its port while
the deployment keeps answering, and so does a private Redis (its state back from its append-only file); a dead
kvstore stops everything, loudly and cleanly; the restart policy (backoff, crash-loop limit) and the private Redis's
password are checked without a deployment.

Real processes (kvrelay.deployment.Deployment runs `kvrelay up` as a child); each test stops its own deployment and
leaves nothing behind. A killed worker's sessions are not resumed here (mid-stream failover is the gateway's side):
what is checked is that their blocks come back once their lease runs out.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest
import redis

from kvrelay.client import Client
from kvrelay.deployment import REDIS_URL, Deployment, free_port_run
from kvrelay.launcher import FIRST_RESTART_DELAY_S, MAX_RESTART_DELAY_S, STABLE_AFTER_S, Launcher, Restarts
from kvrelay.settings import UpSettings
from kvstore.sessions import SessionStore, masked
from services.common.worker import HANDOFF_LEASE_MS, LEASE_MS

NUM_BLOCKS = "64"
# A restart (a new Python process mapping the model from the kvstore) takes 10-30 s on a busy 2-core machine.
RESTART_S = 180.0
# Long enough for a killed worker's sessions to be reclaimed: a DECODING session's lease (LEASE_MS) or, at worst, a
# hand-off nobody adopted (HANDOFF_LEASE_MS), plus a few heartbeats (reclaim runs on every one).
RECLAIM_S = (max(LEASE_MS, HANDOFF_LEASE_MS) + 10_000) / 1000
PROMPT = "Count from one to ten:"
EXITED = re.compile(r"kvrelay: (\S+) exited with code -9; restarting in ([\d.]+) s \(restart (\d+)\)")


def wait_until(what: str, predicate, timeout_s: float = RESTART_S, every_s: float = 0.3):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout_s:g} s for {what}")
        time.sleep(every_s)


def kill(d: Deployment, pid: int) -> tuple[str, float, int]:
    """kill -9 a child of the deployment; once the supervisor logged the exit: (its name, the delay, the restart)."""
    seen = len(d.output())
    os.kill(pid, signal.SIGKILL)
    found = wait_until(f"the launcher to log the exit of {pid}", lambda: EXITED.search(d.output(), seen), 30)
    return found.group(1), float(found.group(2)), int(found.group(3))


def healthy_again(d: Deployment, name: str, restart: int) -> None:
    line = re.compile(rf"kvrelay: {re.escape(name)} is healthy again \(.* after restart {restart}\)")
    wait_until(f"{name} healthy after restart {restart}", lambda: line.search(d.output()))


def answer(client: Client, retry_s: float = RESTART_S) -> list[int]:
    """Greedy token ids of a short completion. UNAVAILABLE is retried: a request that reached the gateway while the
    process it needed was down (or before the gateway's view of the registry caught up) fails with it, and
    retrying such a request inside the gateway is another task's (failover)."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return list(client.complete(prompt=PROMPT, max_tokens=4, temperature=0.0, timeout=60).token_ids)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def registered(d: Deployment, role: str) -> dict[str, str]:
    """worker id -> address, of the live registrations of one role."""

    async def read():
        async with SessionStore(REDIS_URL, d.name) as store:
            return {w.worker_id: w.address for w in await store.list_workers(role)}

    return asyncio.run(read())


def new_registration(d: Deployment, role: str, before: dict[str, str]) -> dict[str, str]:
    """Waits until a worker id of that role that was not in `before` is registered; returns the registrations."""
    return wait_until(f"a new {role} registration", lambda: (now := registered(d, role)).keys() - before.keys() and now)


def pid_at(d: Deployment, role: str, address: str) -> int:
    """The child of that role listening at address (the launcher gives each its --port)."""
    return d.worker_pids(role)[int(address.rsplit(":", 1)[1])]


def session_owners(d: Deployment) -> list[str]:
    """The owners of the deployment's sessions (`{prefix}:sessions` indexes them: ARCHITECTURE.md, Redis schema)."""
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        session_ids = client.smembers(f"{d.name}:sessions")
    finally:
        client.close()

    async def owners():
        async with SessionStore(REDIS_URL, d.name) as store:
            records = [await store.get(sid) for sid in session_ids]
            return [r.owner for r in records if r is not None and r.owner]

    return asyncio.run(owners())


def assert_clean(d: Deployment, timeout_s: float = RECLAIM_S) -> None:
    report, stats = d.audit(timeout_s=timeout_s)
    assert report.ok, report
    assert stats.used == 0, stats


def assert_stopped_cleanly(d: Deployment, code: int = 0) -> None:
    assert d.stop() == code, d.output()[-3000:]
    assert d.leftovers() == []


# --- workers and the gateway are restarted ---------------------------------------------------------------------------


def test_a_killed_decode_worker_comes_back_while_the_other_serves():
    d = Deployment("--num-blocks", NUM_BLOCKS, decode_replicas=2)
    try:
        with Client(d.address) as client:
            reference = answer(client, retry_s=0)
            before = registered(d, "decode")
            assert len(before) == 2
            victim_id, address = sorted(before.items())[0]
            victim = pid_at(d, "decode", address)
            name, delay, restart = kill(d, victim)
            assert name.startswith("decode-") and (delay, restart) == (FIRST_RESTART_DELAY_S, 1)
            # the supervisor dropped its registration before it logged the exit (the entry's TTL is 5 s)
            assert victim_id not in registered(d, "decode")
            # the other replica answers meanwhile
            assert [answer(client) for _ in range(3)] == [reference] * 3
            healthy_again(d, name, 1)
            after = new_registration(d, "decode", before)
            assert sorted(after.values()) == sorted(before.values())  # two replicas again, on the same ports
            assert pid_at(d, "decode", address) != victim
            assert answer(client, retry_s=0) == reference
            assert_clean(d, timeout_s=10)

            # Mid-stream: kill the decode worker that holds the session. The client's stream may fail (resuming it
            # on the other worker is the gateway's failover, not this task); the session's blocks must come back.
            stream = client.generate(prompt=PROMPT, max_tokens=300, ignore_eos=True, temperature=0.0, timeout=120)
            victim, seen, tokens = None, len(d.output()), 0
            try:
                for chunk in stream:
                    tokens += len(chunk.token_ids)
                    if victim is None and tokens >= 3:  # the first came from prefill; these, from a decode worker
                        (owner,) = session_owners(d)
                        victim = pid_at(d, "decode", registered(d, "decode")[owner])
                        os.kill(victim, signal.SIGKILL)
            except grpc.RpcError:
                pass
            assert victim is not None, "the stream ended before its decode worker could be killed"
            found = wait_until("the second exit logged", lambda: EXITED.search(d.output(), seen), 30)
            assert_clean(d)  # the dead worker's session: its lease ran out and a live worker reclaimed it
            healthy_again(d, found.group(1), int(found.group(3)))
            assert answer(client) == reference
            assert_clean(d, timeout_s=10)
    finally:
        assert_stopped_cleanly(d)


def test_b_a_killed_prefill_worker_comes_back_and_serves():
    d = Deployment("--num-blocks", NUM_BLOCKS)
    try:
        with Client(d.address) as client:
            reference = answer(client, retry_s=0)
            before = registered(d, "prefill")
            (victim,) = d.pids("prefill")
            assert kill(d, victim) == ("prefill-0", FIRST_RESTART_DELAY_S, 1)
            healthy_again(d, "prefill-0", 1)
            after = new_registration(d, "prefill", before)
            assert list(after.values()) == list(before.values())  # one prefill worker, on its port
            (new,) = d.pids("prefill")
            assert new != victim
            assert answer(client) == reference
            assert_clean(d)
    finally:
        assert_stopped_cleanly(d)


def test_c_a_killed_gateway_comes_back_on_its_port():
    d = Deployment("--num-blocks", NUM_BLOCKS)
    try:
        with Client(d.address) as client:  # one client, one channel, from before the kill to after the restart
            reference = answer(client, retry_s=0)
            (victim,) = d.pids("gateway")
            assert kill(d, victim) == ("gateway", FIRST_RESTART_DELAY_S, 1)
            healthy_again(d, "gateway", 1)
            (new,) = d.pids("gateway")
            assert new != victim
            assert answer(client) == reference  # the channel reconnected to the same address
            assert_clean(d)
    finally:
        assert_stopped_cleanly(d)


# --- what ends the deployment ---------------------------------------------------------------------------------------


def test_d_a_killed_kvstore_stops_everything_with_a_reason():
    d = Deployment("--num-blocks", NUM_BLOCKS)
    try:
        (victim,) = d.pids("kvstore")
        children = [p.pid for p in d.processes()]
        os.kill(victim, signal.SIGKILL)
        d.proc.wait(timeout=120)
        out = d.output()
        assert "kvrelay: kvstore exited with code -9; the kvstore owns the weights and the KV pool" in out
        assert "invalidates the KV of every session" in out and "stopping everything" in out
        assert "restarting" not in out
        assert d.proc.returncode == 1
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()]
    finally:
        assert_stopped_cleanly(d, code=1)


def test_a_killed_private_redis_comes_back_with_its_state_and_its_password_never_shows():
    dead = free_port_run(1)  # nothing answers there: the launcher starts a private redis-server
    d = Deployment("--num-blocks", NUM_BLOCKS, "--redis-url", f"redis://127.0.0.1:{dead}/0")
    try:
        (victim,) = d.pids("redis")
        # redis-server works in the launcher's private folder (its `dir`), where its config holds the password
        conf = (Path(os.readlink(f"/proc/{victim}/cwd")) / "redis.conf").read_text()
        (password,) = re.findall(r'^requirepass "(.+)"$', conf, re.MULTILINE)
        (port,) = re.findall(r"^port (\d+)$", conf, re.MULTILINE)
        private = f"redis://:{password}@127.0.0.1:{port}/0"
        assert all(password not in p.args for p in d.processes())  # not on any command line (ps shows them all)
        with Client(d.address) as client:
            reference = answer(client, retry_s=0)
            assert kill(d, victim) == ("redis", FIRST_RESTART_DELAY_S, 1)
            healthy_again(d, "redis", 1)
            (new,) = d.pids("redis")
            assert new != victim
            assert answer(client) == reference  # the same deployment serves on: its state came back from the AOF

            async def audit():
                async with SessionStore(private, d.name) as store:
                    return await store.audit(), await store.stats()

            report, stats = asyncio.run(audit())
            assert report.ok and stats.used == 0, (report, stats)
        out = d.output()
        assert "stopping everything" not in out and "lost its state" not in out  # nothing was lost: no recovery
        assert "redis://:***@127.0.0.1:" in out and password not in out
    finally:
        assert_stopped_cleanly(d)


# --- the policy and the private Redis, without a deployment -----------------------------------------------------------


def test_a_launcher_that_starts_nothing_leaves_no_folder():
    Launcher(UpSettings(name="kvtest-nothing")).stop()
    Launcher(UpSettings(name="kvtest-nothing")).cpu_threads()  # never stopped: the tests of the GPU split do this


def test_e_backoff_doubles_to_a_cap_and_a_crash_loop_gives_up():
    r = Restarts(limit=5)
    # never healthy (or briefly): each exit waits twice as long, and the sixth in a row gives up
    assert [r.after_exit(None) for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert r.after_exit(STABLE_AFTER_S - 1) is None
    assert r.total == 5

    r = Restarts(limit=20)
    delays = [r.after_exit(1.0) for _ in range(10)]
    assert delays[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, MAX_RESTART_DELAY_S]
    assert set(delays[6:]) == {MAX_RESTART_DELAY_S}


def test_e_a_stable_run_starts_the_count_over():
    r = Restarts(limit=2)
    assert [r.after_exit(None), r.after_exit(5.0)] == [0.5, 1.0]
    assert r.after_exit(STABLE_AFTER_S) == 0.5  # healthy for a minute: a new streak, not the third in a row
    assert r.after_exit(None) == 1.0
    assert r.after_exit(None) is None
    assert r.total == 4


def test_e_no_restarts_means_the_first_exit_stops():
    assert Restarts(limit=0).after_exit(3600.0) is None


def test_e_the_supervisor_gives_up_on_a_crash_loop(capsys):
    """The loop itself, on a process that exits at once: two restarts, then the deployment stops (no model)."""
    launcher = Launcher(UpSettings(max_restarts=2, name="kvtest-loop", start_timeout=30))
    nowhere = f"127.0.0.1:{free_port_run(1)}"  # its health is never asked: it is gone before
    try:
        launcher.spawn("gateway", [sys.executable, "-c", "raise SystemExit(3)"], address=nowhere, service="x")
        started = time.monotonic()
        assert asyncio.run(launcher.supervise()) == 1
        assert time.monotonic() - started >= FIRST_RESTART_DELAY_S * 3  # 0.5 s, then 1 s
    finally:
        launcher.stop()
    err = capsys.readouterr().err
    assert "kvrelay: gateway exited with code 3; restarting in 0.5 s (restart 1)" in err
    assert "kvrelay: gateway exited with code 3; restarting in 1 s (restart 2)" in err
    assert (
        "kvrelay: gateway exited with code 3; that is 2 restarts in a row without 60 s healthy (--max-restarts): "
        "giving up on it and stopping everything"
    ) in err


def test_masked_urls_hide_only_the_password():
    assert masked("redis://:s3cret@127.0.0.1:6390/0") == "redis://:***@127.0.0.1:6390/0"
    assert masked("rediss://user:s3cret@host:6380/1") == "rediss://user:***@host:6380/1"
    assert masked("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_the_private_redis_has_a_password_and_an_append_only_file(capsys):
    dead = free_port_run(1)
    launcher = Launcher(UpSettings(redis_url=f"redis://127.0.0.1:{dead}/0", name="kvtest-private"))
    try:
        url = launcher.ensure_redis()
        password = urlsplit(url).password
        assert len(password) >= 24
        out = capsys.readouterr().out
        assert "started a private redis-server at redis://:***@127.0.0.1:" in out and password not in out
        with redis.Redis.from_url(url) as client:
            assert client.ping()
            assert client.config_get("appendonly") == {"appendonly": "yes"}
            assert client.config_get("dir")["dir"] == os.path.realpath(launcher.tmp)
        with redis.Redis.from_url(url.replace(f":{password}@", "")) as anonymous:
            with pytest.raises(redis.AuthenticationError):
                anonymous.ping()
        (child,) = launcher.children
        assert password not in Path(f"/proc/{child.proc.pid}/cmdline").read_text()
        folder = Path(launcher.tmp)
        assert folder.stat().st_mode & 0o077 == 0 and (folder / "redis.conf").stat().st_mode & 0o077 == 0
    finally:
        launcher.stop()
    assert not folder.exists()
