"""Datastore outages on purpose: `trellis lab datastore stop` and `start` (etcd only).

Why through the supervisor: it restarts an etcd that exits within a second, as systemd would,
so a kill from outside is hardly an outage. `stop` records in the lab's state that etcd is held
stopped and wakes the supervisor, which kills the server by its PID with SIGKILL (a crash: no
clean shutdown, its write-ahead log is replayed at the next start) and does not start it again;
`start` clears that, and the supervisor starts it on the same data directory, as after a
machine's reboot. Each returns once done: `stop` once no etcd process of the lab runs, `start`
once the server answers its health check.

What the agents do meanwhile is theirs to show (docs/design/datastore.md, "Outages"): the
kernel keeps what it holds, and CNI ADD answers "try again later".
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from trellis.lab import store
from trellis.lab.errors import LabError
from trellis.lab.process import ProcessRef, log_tail, wait_until
from trellis.lab.report import Report, quiet
from trellis.lab.state import LAB_ROOT, LabPaths, LabState, locked_state, save
from trellis.lab.supervisor import ETCD_READY_S, current_process, followed

FOLLOW_TIMEOUT_S = 10.0
"""How long the supervisor may take to act on a changed state (seconds)."""
STOP_TIMEOUT_S = 10.0
"""How long a killed etcd may take to be gone (seconds)."""


def stop_datastore(name: str, root: Path = LAB_ROOT, report: Report = quiet) -> None:
    """Kill lab `name`'s etcd and keep it down until `start_datastore`; returns once it is gone."""
    paths = LabPaths(name, root)
    with locked_state(paths) as state:
        _check_etcd(state)
        server = current_process(paths.etcd_record)
        _hold(paths, state, held=True)
        if server is not None and not wait_until(lambda: not server.alive(), STOP_TIMEOUT_S):
            raise LabError(f"lab {name}: etcd pid {server.pid} still runs after SIGKILL")
    killed = "already down" if server is None else f"pid {server.pid} killed"
    report(f"lab {name}: etcd stopped ({killed}); down until `trellis lab datastore start`")


def start_datastore(name: str, root: Path = LAB_ROOT, report: Report = quiet) -> ProcessRef:
    """Start lab `name`'s etcd again on its data directory; returns it once it answers its health check."""
    paths = LabPaths(name, root)
    with locked_state(paths) as state:
        _check_etcd(state)
        started = time.monotonic()
        _hold(paths, state, held=False)
        if not wait_until(lambda: store.etcd_healthy(state), ETCD_READY_S, poll_s=0.05):
            raise LabError(
                f"lab {name}: etcd not healthy {ETCD_READY_S:.0f} s after its start "
                f"({paths.etcd_log}: {log_tail(paths.etcd_log)})"
            )
        server = current_process(paths.etcd_record)
        if server is None:
            raise LabError(f"lab {name}: etcd answers, yet the supervisor records no etcd process")
    report(f"lab {name}: etcd started (pid {server.pid}), healthy in {time.monotonic() - started:.1f} s")
    return server


def _check_etcd(state: LabState) -> None:
    if state.datastore != "etcd":
        raise LabError(
            f"lab {state.name} uses datastore {state.datastore}: it has no server to stop or start"
        )


def _hold(paths: LabPaths, state: LabState, held: bool) -> None:
    """Record whether etcd is held stopped; return once the supervisor has acted on it."""
    supervisor = state.supervisor
    if supervisor is None or not supervisor.alive():
        raise LabError(f"lab {state.name}: its supervisor is not running ({log_tail(paths.supervisor_log)})")
    state.datastore_stopped = held
    save(paths, state)
    supervisor.signal(signal.SIGHUP)
    if not wait_until(lambda: followed(paths) >= state.revision, FOLLOW_TIMEOUT_S):
        raise LabError(
            f"lab {state.name}: the supervisor did not act on the change within {FOLLOW_TIMEOUT_S:.0f} s "
            f"({log_tail(paths.supervisor_log)})"
        )
