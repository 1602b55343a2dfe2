"""The lab's DaemonSet controller: one detached process that keeps every node's agent running.

Why a process of its own: `trellis lab` commands are short-lived, yet an agent that exits or
is killed must be back within a second or two, as kubelet restarts a DaemonSet's pod. `lab up`
starts this supervisor in a session of its own; it starts each node's `trellis agent` inside
the node's namespace and records the agent's PID and start time in nodes/<node>/agent.json
(what `lab status` shows and `lab down` kills). It does nothing but wait for signals:
SIGCHLD (an agent exited: start it again) and SIGTERM (stop the agents, then exit). An agent
that keeps dying soon after starting is restarted after a growing delay, up to 5 s, as kubelet's
crash-loop back-off does, so a broken agent does not spin.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trellis.lab.errors import LabError
from trellis.lab.process import ProcessRef, in_netns
from trellis.lab.state import LAB_ROOT, LabPaths, LabState, Node, load, write_json_atomic

log = logging.getLogger(__name__)

SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
STABLE_S = 10.0
"""An agent that ran this long before exiting is restarted at once (seconds)."""
BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 5.0)
"""Delays before restarting an agent that exited sooner, after 1, 2, ... such exits in a row (seconds)."""
STOP_GRACE_S = 5.0


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
        str(paths.datastore),
        "--backend",
        state.backend,
    ]


def read_agent_record(paths: LabPaths, node: str) -> dict[str, Any]:
    """What the supervisor last wrote about the node's agent (empty before its first start)."""
    try:
        record: dict[str, Any] = json.loads(paths.agent_record(node).read_text())
    except FileNotFoundError:
        return {}
    return record


def current_agent(paths: LabPaths, node: str) -> ProcessRef | None:
    """The node's agent process if it is running now."""
    ref = ProcessRef.from_json(read_agent_record(paths, node).get("process"))
    return ref if ref is not None and ref.alive() else None


@dataclass
class _Agent:
    node: Node
    command: list[str]
    log_path: Path
    record_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    quick_exits: int = 0
    due: float | None = 0.0
    """Monotonic time at which to start the agent; None while it runs."""

    def start(self) -> None:
        try:
            with self.log_path.open("ab") as out:
                self.proc = subprocess.Popen(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    preexec_fn=in_netns(self.node.netns),  # noqa: PLW1509 (the supervisor has one thread)
                )
        except (OSError, subprocess.SubprocessError) as err:  # the latter: preexec_fn failed
            delay = self._schedule(ran_s=0.0)
            log.error("%s: cannot start the agent (%s); trying again in %.1f s", self.node.name, err, delay)
            self._record(process=None, error=str(err))
            return
        self.started = time.monotonic()
        self.due = None
        try:
            self._record(process=ProcessRef.of(self.proc.pid).to_json())
        except ProcessLookupError:  # exited already: SIGCHLD is pending, and check() handles it
            self._record(process=None)
        log.info("%s: agent started, pid %d", self.node.name, self.proc.pid)

    def _schedule(self, ran_s: float) -> float:
        """Set when to start the agent again, given how long it ran; returns the delay (s)."""
        self.quick_exits = 0 if ran_s >= STABLE_S else self.quick_exits + 1
        delay = BACKOFF_S[min(self.quick_exits, len(BACKOFF_S)) - 1] if self.quick_exits else 0.0
        self.due = time.monotonic() + delay
        return delay

    def _record(self, **extra: Any) -> None:
        write_json_atomic(self.record_path, {"node": self.node.name, "restarts": self.restarts, **extra})

    def check(self) -> None:
        """Schedule a restart if the agent exited."""
        if self.proc is None or (code := self.proc.poll()) is None:
            return
        ran_s = time.monotonic() - self.started
        delay = self._schedule(ran_s)
        log.warning(
            "%s: agent %d exited with %d after %.1f s; restarting in %.1f s",
            self.node.name,
            self.proc.pid,
            code,
            ran_s,
            delay,
        )
        self.proc = None
        self.restarts += 1
        self._record(process=None, last_exit=code)

    def terminate(self) -> None:
        if self.proc is not None:
            self.proc.terminate()

    def reap(self, deadline: float) -> None:
        """Wait for the terminated agent until `deadline` (monotonic), then kill it."""
        if self.proc is None:
            return
        try:
            self.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._record(process=None, last_exit=self.proc.returncode)
        self.proc = None


def supervise(paths: LabPaths, state: LabState) -> None:
    """Keep every node's agent running until SIGTERM, SIGINT or SIGHUP."""
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    agents = [
        _Agent(
            node,
            agent_command(paths, state, node),
            paths.agent_log(node.name),
            paths.agent_record(node.name),
        )
        for node in state.nodes
    ]
    log.info("supervising %d agents of lab %s", len(agents), state.name)
    try:
        while True:
            now = time.monotonic()
            for agent in agents:
                if agent.due is not None and agent.due <= now:
                    agent.start()
            pending = [a.due for a in agents if a.due is not None]
            if pending:
                info = signal.sigtimedwait(SIGNALS, max(0.0, min(pending) - time.monotonic()))
            else:
                info = signal.sigwaitinfo(SIGNALS)
            if info is not None and info.si_signo != signal.SIGCHLD:
                log.info("signal %d: stopping the agents", info.si_signo)
                return
            for agent in agents:
                agent.check()
    finally:
        for agent in agents:
            agent.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for agent in agents:
            agent.reap(deadline)


def start_supervisor(paths: LabPaths) -> ProcessRef:
    """Start the supervisor of lab `paths`, detached (its own session), logging to supervisor.log."""
    command = [sys.executable, "-m", __name__, "--name", paths.name, "--root", str(paths.root)]
    with paths.supervisor_log.open("ab") as out:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
    try:
        return ProcessRef.of(proc.pid)
    except ProcessLookupError:
        proc.wait()
        raise LabError(
            f"lab {paths.name}: the supervisor exited at once (see {paths.supervisor_log})"
        ) from None


def main() -> None:
    parser = argparse.ArgumentParser(description="supervise the agents of a trellis lab")
    parser.add_argument("--name", required=True)
    parser.add_argument("--root", type=Path, default=LAB_ROOT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s supervisor: %(message)s")
    paths = LabPaths(args.name, args.root)
    supervise(paths, load(paths))


if __name__ == "__main__":
    main()
