"""What the fault tests share: a deployment whose supervisor is paused (the test kills and restarts processes
itself), a clean-pool check once the dead worker's leases ran out, and the failover lines of the logs."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kvrelay.deployment import Deployment


def paused_deployment(*flags: str, **kwargs) -> Iterator[Deployment]:
    """A module fixture's body: `kvrelay up` with these flags, its supervisor paused while the tests run, stopped
    with exit code 0 and nothing left behind at the end."""
    d = Deployment(*flags, **kwargs)
    try:
        with d.supervisor_paused():
            yield d
    finally:
        code = d.stop()
    assert code == 0, d.output()[-3000:]
    assert d.leftovers() == []


def assert_clean(d: Deployment, *, no_sessions: bool = False) -> None:
    """No block held (and with no_sessions, no session at all); a dead worker's leftovers go with its lease (10 s) at
    the latest, so the audit waits up to 40 s for them."""
    report, stats = d.audit(timeout_s=40)
    if no_sessions:
        assert report.ok and stats.used == 0 and stats.active_sessions == 0, (report.message, stats)
    else:
        assert report.ok and stats.used == 0, (report.message, stats)


class LogTail:
    """Prints the lines naming any of `markers` that the deployment (and the processes the test restarted) logged
    since the last call."""

    def __init__(self, markers: Sequence[str]) -> None:
        self.markers = tuple(markers)
        self.seen = [0, 0]  # lines of the deployment's log, and of its respawned processes' log, already looked at

    def show(self, d: Deployment) -> None:
        for i, text in enumerate((d.output(), d.respawned_output())):
            lines = text.splitlines()
            for line in lines[self.seen[i] :]:
                if any(m in line for m in self.markers):
                    print("   ", line, flush=True)
            self.seen[i] = len(lines)
