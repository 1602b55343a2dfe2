"""BIRD supervised by the agent: started, restarted when it exits, reconfigured in place,
and stopped without withdrawing a route.

Why this shape (docs/design/bgp.md):
- one BIRD per node, a child of the agent in the agent's network namespace, with its config,
  control socket, pid file and log in the agent's state directory;
- a new config is checked (`bird -p`), written atomically, then applied with `configure`:
  BIRD keeps every session whose options are unchanged, so a node joining or leaving touches
  only its own sessions. BIRD is never restarted to apply a config;
- every start after the first on a node is a graceful restart (`-R`): with the kernel
  protocol's `persist` and `graceful restart`, BIRD keeps the routes the previous BIRD left
  in the kernel until its sessions have sent everything again, and peers keep this node's
  routes meanwhile;
- `stop()` sends BIRD's `graceful restart` command: sessions close without a notification,
  so peers keep the node's routes for the graceful restart time, and the kernel keeps its
  routes; the next agent picks up from there. If BIRD does not answer it is killed, which
  peers see the same way;
- `stop(leaving=True)`, for a node that leaves the cluster for good, sends `down` instead:
  every session closes with a Cease notification and peers drop the node's routes at once,
  external routers too, which know nothing of the datastore;
- an agent that dies without `stop()` leaves BIRD running (no parent-death signal, its own
  session so a terminal's Ctrl-C does not reach it): routing goes on, and the next agent adopts
  that BIRD through the pid file instead of starting a second one.
The control socket is spoken to directly, as `birdc` does: every reply line carries a code,
so a refusal (8xxx, 9xxx) is told by its code, never by its text.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from trellis.bgp.render import render_bird
from trellis.calc.bgp import DesiredBGP

log = logging.getLogger(__name__)

BINARY = "bird"
"""BIRD's executable, found on PATH (Debian's bird2)."""
START_TIMEOUT_S = 10.0
"""How long a new BIRD may take to answer on its control socket."""
STOP_TIMEOUT_S = 10.0
"""How long BIRD may take to exit after `graceful restart` or `down` before it is killed."""
CONTROL_TIMEOUT_S = 5.0
"""How long BIRD may take to answer one command on its control socket."""
WATCH_INTERVAL_S = 0.5
"""How often the watcher looks up from waiting on BIRD to see whether it should stop."""
MAX_SOCKET_PATH = 107
"""sun_path holds 108 bytes with the terminating NUL."""
REPLY_ERROR = 8000
"""Reply codes from here on are refusals (8xxx run-time errors, 9xxx parse errors)."""
REPLY_PROTOCOLS = 1002
"""The code of `show protocols` rows."""


class BirdError(Exception):
    """BIRD refused a command or a configuration, or could not be started."""


@dataclass(frozen=True)
class ProtocolState:
    """One row of `show protocols`."""

    name: str
    proto: str
    """BGP, Kernel, Static, Device."""
    table: str
    state: str
    """up, start, down, flush."""
    since: str
    info: str
    """For BGP the session state, such as `Established`, `Active` or `Passive`, with the last error."""

    @property
    def established(self) -> bool:
        return self.info.startswith("Established")


@dataclass(frozen=True)
class BirdStatus:
    pid: int | None
    """None when BIRD is not running."""
    protocols: tuple[ProtocolState, ...] = ()


class BirdControl:
    """BIRD's CLI protocol over its unix socket: one connection per command."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def command(self, line: str) -> list[tuple[int, str]]:
        """Every reply line as (code, text); BirdError on a refusal, OSError when BIRD is not there."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(CONTROL_TIMEOUT_S)
            sock.connect(str(self.path))
            with sock.makefile("rwb") as stream:
                _read_reply(stream)  # the greeting, "0001 BIRD 2.0.12 ready."
                stream.write(line.encode() + b"\n")
                stream.flush()
                reply = _read_reply(stream)
        code, text = reply[-1]
        if code >= REPLY_ERROR:
            raise BirdError(f"BIRD refused {line!r}: {text}")
        return reply


def _read_reply(stream: io.BufferedIOBase) -> list[tuple[int, str]]:
    """Lines up to the final one (`NNNN text`); `NNNN-text` and ` text` continue a reply."""
    lines: list[tuple[int, str]] = []
    code = 0
    while True:
        raw = stream.readline()
        if not raw:
            raise ConnectionError("BIRD closed its control socket mid-reply")
        text = raw.decode(errors="replace").rstrip("\n")
        if text[:4].isdigit() and text[4:5] in ("-", " "):
            code = int(text[:4])
            lines.append((code, text[5:]))
            if text[4] == " ":
                return lines
        else:
            lines.append((code, text[1:]))


def parse_protocols(reply: list[tuple[int, str]]) -> tuple[ProtocolState, ...]:
    rows = []
    for code, text in reply:
        if code != REPLY_PROTOCOLS:
            continue
        fields = text.split(maxsplit=5)
        if len(fields) >= 5:
            name, proto, table, state, since = fields[:5]
            info = fields[5].strip() if len(fields) > 5 else ""
            rows.append(ProtocolState(name, proto, table, state, since, info))
    return tuple(rows)


@dataclass(frozen=True)
class _Process:
    """A running BIRD: our child (`popen`), or one a previous agent left (adopted, `popen` None)."""

    pid: int
    pidfd: int
    popen: subprocess.Popen[bytes] | None

    def exited(self, timeout_s: float) -> bool:
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        return bool(poller.poll(int(timeout_s * 1000)))

    def kill(self) -> None:
        """SIGKILL through the pidfd, which never reaches another process that reused the PID."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def reap(self) -> int | None:
        """Close the handle; the exit status of a child (None for an adopted BIRD)."""
        os.close(self.pidfd)
        return self.popen.wait() if self.popen is not None else None


class Bird:
    """The node's BIRD: `apply(desired)` starts or reconfigures it, `status()`, `stop()`."""

    def __init__(
        self,
        state_dir: Path,
        *,
        netns: str | None = None,
        restart_delay_s: float = 1.0,
    ) -> None:
        """`netns`: a network namespace path to run BIRD in instead of the agent's own (tests)."""
        self.config = state_dir / "bird.conf"
        self.socket = state_dir / "bird.ctl"
        self.pidfile = state_dir / "bird.pid"
        self.logfile = state_dir / "bird.log"
        if len(str(self.socket)) > MAX_SOCKET_PATH:
            raise ValueError(f"BIRD control socket path {self.socket} is longer than {MAX_SOCKET_PATH} bytes")
        self.control = BirdControl(self.socket)
        self.restart_delay_s = restart_delay_s
        self._prefix = ["nsenter", f"--net={netns}"] if netns else []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._process: _Process | None = None
        self._watcher: threading.Thread | None = None
        self._applied: str | None = None
        self._recover = self.config.exists()  # a BIRD ran here before and may have left routes

    # -- the agent's interface -------------------------------------------------------------

    def apply(self, desired: DesiredBGP) -> bool:
        """Make BIRD run `desired`: start (or adopt) it the first time, else `configure` it.

        Returns whether the configuration changed. Raises BirdError when BIRD refuses it or
        cannot be started.
        """
        text = render_bird(desired)
        with self._lock:
            if self._stopping.is_set():
                raise BirdError("BIRD supervisor is stopped")
            if text == self._applied:
                return False
            self._write_config(text)
            if self._watcher is None:
                self._process = self._adopt()
                if self._process is None:
                    self._process = self._spawn()
                else:
                    self._configure()
                self._watcher = threading.Thread(target=self._watch, name="bird", daemon=True)
                self._watcher.start()
            elif self._process is not None:
                self._configure()
            # else BIRD is being restarted by the watcher, which reads the new file
            self._applied = text
        return True

    def status(self) -> BirdStatus:
        """BIRD's PID and its protocols (sessions with their state); no protocols when it does
        not answer."""
        process = self._process
        if process is None:
            return BirdStatus(None)
        try:
            return BirdStatus(process.pid, parse_protocols(self.control.command("show protocols")))
        except (OSError, BirdError) as err:
            log.debug("BIRD (pid %d) did not answer show protocols: %s", process.pid, err)
            return BirdStatus(process.pid)

    def stop(self, leaving: bool = False) -> None:
        """Stop BIRD without withdrawing routes (see the module's note); idempotent.

        `leaving`: the node leaves the cluster for good, so BIRD does withdraw them: it closes
        its sessions with a notification and peers drop its routes at once instead of keeping
        them for a restart.
        Also stops a BIRD a previous agent left running, so it cleans up after a killed agent.
        """
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.join()
        with self._lock:
            process, self._process = self._process, None
            if process is None:
                process = self._adopt()
            if process is not None:
                self._shut_down(process, leaving)

    # -- the process -----------------------------------------------------------------------

    def _write_config(self, text: str) -> None:
        """Check `text` with `bird -p`, then replace the config file in one rename (mode 0600:
        it may hold passwords)."""
        staged = self.config.with_name(self.config.name + ".new")
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        check = subprocess.run([BINARY, "-p", "-c", str(staged)], capture_output=True, text=True, check=False)
        if check.returncode != 0:
            raise BirdError(f"BIRD refused the rendered configuration: {check.stderr.strip()}")
        os.replace(staged, self.config)

    def _spawn(self) -> _Process:
        """Start BIRD, and wait until it answers.

        Every start but a fresh node's first is a graceful restart (`-R`): BIRD then holds the
        kernel's routes until its sessions have sent everything again, or for
        `render.RECOVERY_WAIT_S`. A fresh node has nothing to keep, and need not wait for a
        peer that is down.
        """
        command = [
            *self._prefix,
            BINARY,
            "-f",
            *(["-R"] if self._recover else []),
            "-c",
            str(self.config),
            "-s",
            str(self.socket),
            "-P",
            str(self.pidfile),
        ]
        with self.logfile.open("ab") as out:
            try:
                popen = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as err:
                raise BirdError(f"cannot start {BINARY}: {err}") from None
        process = _Process(popen.pid, os.pidfd_open(popen.pid), popen)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._answers():
            if process.exited(timeout_s=0.05):
                status = process.reap()
                raise BirdError(f"BIRD exited with status {status} on start: {self._log_tail()}")
            if time.monotonic() > deadline:
                self._shut_down(process)
                raise BirdError(f"BIRD did not answer on {self.socket} within {START_TIMEOUT_S} s")
        log.info("BIRD started (pid %d, recovery %s), config %s", process.pid, self._recover, self.config)
        self._recover = True
        return process

    def _adopt(self) -> _Process | None:
        """The BIRD a previous agent left running on this state directory, if it answers."""
        try:
            pid = int(self.pidfile.read_text().strip())
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            pidfd = os.pidfd_open(pid)
        except (OSError, ValueError):
            return None
        process = _Process(pid, pidfd, None)
        if Path(os.fsdecode(argv[0])).name != BINARY or str(self.socket).encode() not in argv:
            os.close(pidfd)
            return None
        if not self._answers():  # hung: it would keep the BGP port from the BIRD started next
            log.warning("BIRD (pid %d) left by a previous agent does not answer: killing it", pid)
            process.kill()
            process.exited(STOP_TIMEOUT_S)
            process.reap()
            return None
        log.info("adopted the running BIRD (pid %d)", pid)
        return process

    def _answers(self) -> bool:
        try:
            self.control.command("show status")
        except (OSError, BirdError):
            return False
        return True

    def _configure(self) -> None:
        try:
            self.control.command("configure")
        except OSError as err:  # BIRD just exited: the watcher starts it again, with the new file
            log.warning("BIRD did not take the new configuration (%s); it reads it when it restarts", err)
            return
        log.info("BIRD reconfigured from %s", self.config)

    def _shut_down(self, process: _Process, leaving: bool = False) -> None:
        """`graceful restart` (peers and the kernel keep the routes) or, when the node is
        `leaving`, `down` (every session closes with a Cease notification: peers drop the
        routes); SIGKILL when BIRD does not answer or exit, which peers take for a restart."""
        command = "down" if leaving else "graceful restart"
        try:
            self.control.command(command)
        except (OSError, BirdError) as err:
            log.warning("BIRD (pid %d) did not take %s (%s): killing it", process.pid, command, err)
            process.kill()
        if not process.exited(STOP_TIMEOUT_S):
            log.warning("BIRD (pid %d) still runs after %s: killing it", process.pid, command)
            process.kill()
            process.exited(STOP_TIMEOUT_S)
        process.reap()
        if leaving:
            outcome = "for good: its sessions closed, peers drop its routes"
        else:
            outcome = "for graceful restart: kernel and peers keep the routes"
        log.info("BIRD (pid %d) stopped %s", process.pid, outcome)

    def _watch(self) -> None:
        """Start BIRD again whenever it exits, until `stop()`."""
        while True:
            process = self._process
            if process is not None and not process.exited(WATCH_INTERVAL_S):
                if self._stopping.is_set():
                    return
                continue
            with self._lock:
                if self._stopping.is_set():
                    return
                if process is not None:
                    self._process = None
                    status = process.reap()
                    log.warning(
                        "BIRD (pid %d) exited (status %s); starting it again in %.1f s",
                        process.pid,
                        status,
                        self.restart_delay_s,
                    )
            if self._stopping.wait(self.restart_delay_s):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._process = self._spawn()
                except BirdError as err:
                    log.error("%s; trying again", err)

    def _log_tail(self) -> str:
        """The last lines of BIRD's log, on one line."""
        try:
            return " | ".join(self.logfile.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return "(no log)"
