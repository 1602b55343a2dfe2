"""The lab's DaemonSet controller: one detached process that keeps every node's agent running.

Why a process of its own: `trellis lab` commands are short-lived, yet an agent that exits or
is killed must be back within a second or two, as kubelet restarts a DaemonSet's pod. `lab up`
starts this supervisor in a session of its own; it starts each node's `trellis agent` inside
the node's namespace and records the agent's PID and start time in nodes/<node>/agent.json
(what `lab status` shows and `lab down` kills). With the etcd datastore it first starts the
lab's etcd server in the fabric namespace (recorded in etcd.json) and waits until it is healthy.

It does nothing but wait for signals: SIGCHLD (a child exited: start it again), SIGHUP (the
lab's nodes changed, or its etcd is to be held stopped or released: `outage.py`) and SIGTERM
(stop the agents, then etcd, then exit). On every wake-up it
reads the lab's state and keeps exactly its nodes' agents, so `lab node add` and `node remove`
only change the state and send SIGHUP; an agent of a node no longer in the state is never
started again, whatever the order of the signals. A child that keeps dying soon after starting
is restarted after a growing delay, up to 5 s, as kubelet's crash-loop back-off does.

Why it waits for a go-ahead on stdin: the command that starts it must record its PID in the
state before it does anything, or `lab down` could not find it. If that command dies first,
the supervisor reads end-of-file instead of the go-ahead and exits having started nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trellis.lab import store
from trellis.lab.errors import LabError
from trellis.lab.process import ProcessRef, in_netns, wait_until
from trellis.lab.state import LAB_ROOT, LabPaths, LabState, Node, load, write_json_atomic

log = logging.getLogger(__name__)

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}
SIGNALS = {signal.SIGCHLD, signal.SIGHUP, *STOP_SIGNALS}
STABLE_S = 10.0
"""A child that ran this long before exiting is restarted at once (seconds)."""
BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)
"""Delays before restarting a child that exited sooner, after 1, 2, ... such exits in a row (seconds)."""
STOP_GRACE_S = 5.0
ETCD_READY_S = 30.0
"""How long the first start of etcd may take to answer its health check (seconds)."""
GO_AHEAD = b"go\n"


def trellis_executable() -> Path:
    """The `trellis` command of this installation (the venv's, beside its python)."""
    return Path(sys.executable).parent / "trellis"


def agent_command(paths: LabPaths, state: LabState, node: Node) -> list[str]:
    return [
        str(trellis_executable()),
        "agent",
        "--node",
        node.name,
        "--socket",
        str(paths.agent_socket(node.name)),
        "--state-dir",
        str(paths.node_dir(node.name)),
        "--datastore",
        state.datastore,
        "--datastore-location",
        store.location(paths, state),
        "--backend",
        state.backend,
    ]


def read_record(path: Path) -> dict[str, Any]:
    """What the supervisor last wrote about a child (empty before its first start)."""
    try:
        record: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return record


def current_process(record: Path) -> ProcessRef | None:
    """The child recorded in `record` if it is running now."""
    ref = ProcessRef.from_json(read_record(record).get("process"))
    return ref if ref is not None and ref.alive() else None


def current_agent(paths: LabPaths, node: str) -> ProcessRef | None:
    """The node's agent process if it is running now."""
    return current_process(paths.agent_record(node))


@dataclass
class _Child:
    """One supervised process: a node's agent, or the lab's etcd server."""

    label: str
    """Who it is, in log lines: `agent of node-1`, `etcd`."""
    netns: str
    command: list[str]
    log_path: Path
    record_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    quick_exits: int = 0
    due: float | None = 0.0
    """Monotonic time at which to start the child; None while it runs (or is held)."""
    held: bool = False
    """Kept stopped on purpose (the lab's `datastore stop`): not started until released."""

    def start(self) -> None:
        try:
            with self.log_path.open("ab") as out:
                self.proc = subprocess.Popen(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    preexec_fn=in_netns(self.netns),  # noqa: PLW1509 (the supervisor has one thread)
                )
        except (OSError, subprocess.SubprocessError) as err:  # the latter: preexec_fn failed
            delay = self._schedule(ran_s=0.0)
            log.error("%s: cannot start (%s); trying again in %.1f s", self.label, err, delay)
            self._record(process=None, error=str(err))
            return
        self.started = time.monotonic()
        self.due = None
        try:
            self._record(process=ProcessRef.of(self.proc.pid).to_json())
        except ProcessLookupError:  # exited already: SIGCHLD is pending, and check() handles it
            self._record(process=None)
        log.info("%s: started, pid %d", self.label, self.proc.pid)

    def _schedule(self, ran_s: float) -> float:
        """Set when to start the child again, given how long it ran; returns the delay (s)."""
        self.quick_exits = 0 if ran_s >= STABLE_S else self.quick_exits + 1
        delay = BACKOFF_S[min(self.quick_exits, len(BACKOFF_S)) - 1] if self.quick_exits else 0.0
        self.due = time.monotonic() + delay
        return delay

    def _record(self, **extra: Any) -> None:
        # A removed node's directory goes while its agent is stopped: then there is nothing to record.
        with contextlib.suppress(FileNotFoundError):
            write_json_atomic(self.record_path, {"name": self.label, "restarts": self.restarts, **extra})

    def check(self) -> None:
        """Schedule a restart if the child exited."""
        if self.proc is None or (code := self.proc.poll()) is None:
            return
        ran_s = time.monotonic() - self.started
        delay = self._schedule(ran_s)
        log.warning(
            "%s: pid %d exited with %d after %.1f s; restarting in %.1f s",
            self.label,
            self.proc.pid,
            code,
            ran_s,
            delay,
        )
        self.proc = None
        self.restarts += 1
        self._record(process=None, last_exit=code)

    def hold(self, held: bool) -> None:
        """Kill the child (SIGKILL: a crash, no clean shutdown) and keep it stopped while
        `held`; once released, start it again at the next wake-up."""
        if held and not self.held:
            if self.proc is not None:
                log.warning("%s: held stopped: SIGKILL to pid %d", self.label, self.proc.pid)
                self.proc.kill()
                self.proc.wait()
                self._record(process=None, last_exit=self.proc.returncode)
                self.proc = None
            self.due = None
        elif self.held and not held:
            log.info("%s: released", self.label)
            self.due = time.monotonic()
        self.held = held

    def terminate(self) -> None:
        if self.proc is not None:
            self.proc.terminate()

    def reap(self, deadline: float) -> None:
        """Wait for the terminated child until `deadline` (monotonic), then kill it."""
        if self.proc is None:
            return
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._record(process=None, last_exit=self.proc.returncode)
        self.proc = None


def _agent(paths: LabPaths, state: LabState, node: Node) -> _Child:
    return _Child(
        f"agent of {node.name}",
        node.netns,
        agent_command(paths, state, node),
        paths.agent_log(node.name),
        paths.agent_record(node.name),
    )


def _etcd(paths: LabPaths, state: LabState) -> _Child:
    return _Child(
        "etcd", state.fabric_netns, store.etcd_command(paths, state), paths.etcd_log, paths.etcd_record
    )


def _stop(children: list[_Child]) -> None:
    for child in children:
        child.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for child in children:
        child.reap(deadline)


def _follow(paths: LabPaths, agents: dict[str, _Child], etcd: list[_Child]) -> None:
    """Keep `agents` (by node) exactly the agents of the nodes the lab's state holds now, and
    `etcd` held stopped or not as the state says.

    Then record the state's revision: a command that removed a node and waits for that
    revision knows its agent is stopped and will not be started again.
    """
    state = load(paths)
    for child in etcd:
        child.hold(state.datastore_stopped)
    wanted = {node.name: node for node in state.nodes}
    gone = [agents.pop(name) for name in list(agents) if name not in wanted]
    if gone:
        log.info("nodes left the lab: stopping %s", ", ".join(child.label for child in gone))
        _stop(gone)
    for name in wanted.keys() - agents.keys():
        agents[name] = _agent(paths, state, wanted[name])
    write_json_atomic(paths.supervisor_record, {"followed": state.revision})


def followed(paths: LabPaths) -> int:
    """The revision of the lab's state the supervisor last acted on (0 before it did)."""
    return int(read_record(paths.supervisor_record).get("followed", 0))


def _start_etcd(paths: LabPaths, state: LabState) -> _Child:
    """Start the lab's etcd and return once it is healthy; LabError if it is not within ETCD_READY_S."""
    etcd = _etcd(paths, state)
    etcd.start()

    def ready() -> bool:
        if etcd.proc is None or etcd.proc.poll() is not None:
            raise LabError(f"etcd exited at once (see {paths.etcd_log})")
        return store.etcd_healthy(state)

    try:
        if not wait_until(ready, ETCD_READY_S, poll_s=0.05):
            raise LabError(f"etcd not healthy after {ETCD_READY_S:.0f} s (see {paths.etcd_log})")
    except BaseException:
        _stop([etcd])
        raise
    log.info("etcd healthy at %s", store.location(paths, state))
    return etcd


def supervise(paths: LabPaths) -> None:
    """Keep the lab's etcd (if any) and every node's agent running until SIGTERM or SIGINT."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    state = load(paths)
    etcd = [_start_etcd(paths, state)] if state.datastore == "etcd" else []
    agents: dict[str, _Child] = {}
    log.info("supervising lab %s", state.name)
    try:
        while True:
            _follow(paths, agents, etcd)
            children = [*etcd, *agents.values()]
            now = time.monotonic()
            for child in children:
                if child.due is not None and child.due <= now:
                    child.start()
            pending = [c.due for c in children if c.due is not None]
            if pending:
                info = signal.sigtimedwait(SIGNALS, max(0.0, min(pending) - time.monotonic()))
            else:
                info = signal.sigwaitinfo(SIGNALS)
            if info is not None and info.si_signo in STOP_SIGNALS:
                log.info("signal %d: stopping", info.si_signo)
                return
            for child in children:
                child.check()
    finally:
        _stop(list(agents.values()))  # before etcd: a stopping agent may still talk to it
        _stop(etcd)


def start_supervisor(paths: LabPaths, record: Callable[[ProcessRef], None]) -> ProcessRef:
    """Start the supervisor of lab `paths`, detached (its own session), logging to supervisor.log.

    `record` must save the supervisor in the lab's state; only then is it let go. If `record`
    fails, or this process dies first, the supervisor exits without starting anything.
    """
    command = [sys.executable, "-m", __name__, "--name", paths.name, "--root", str(paths.root)]
    with paths.supervisor_log.open("ab") as out:
        proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=out, stderr=out, start_new_session=True
        )
    assert proc.stdin is not None
    with proc.stdin:
        try:
            ref = ProcessRef.of(proc.pid)
        except ProcessLookupError:
            proc.wait()
            raise LabError(
                f"lab {paths.name}: the supervisor exited at once (see {paths.supervisor_log})"
            ) from None
        record(ref)
        with contextlib.suppress(BrokenPipeError):  # it died: whoever waits for it finds out
            proc.stdin.write(GO_AHEAD)
    return ref


def main() -> None:
    parser = argparse.ArgumentParser(description="supervise the agents of a trellis lab")
    parser.add_argument("--name", required=True)
    parser.add_argument("--root", type=Path, default=LAB_ROOT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s supervisor: %(message)s")
    if sys.stdin.buffer.readline() != GO_AHEAD:
        log.warning("lab %s: the command that started this supervisor ended first: exiting", args.name)
        return
    try:
        supervise(LabPaths(args.name, args.root))
    except LabError as err:
        log.error("%s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
