"""The probe engine against a real pod server on loopback, and the lab's process handling (no root).

The probe proper creates its sockets inside pod namespaces; here they are made in the test's
own namespace and aimed at 127.0.0.1, which exercises everything else: TCP handshakes, UDP
echoes, refusals, silence until the deadline, and the matrices' JSON.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from trellis.lab import podserver
from trellis.lab.probe import Attempt, Check, Matrix, checks_for, run_attempts
from trellis.lab.process import ProcessRef, stop, wait_until


@pytest.fixture
def server() -> Iterator[dict[str, int]]:
    """A pod server on 127.0.0.1 with one TCP and one UDP port; yields {protocol: port}."""
    proc = subprocess.Popen(
        [
            *(sys.executable, "-I", "-S", podserver.__file__, "--name", "x/a", "--address", "127.0.0.1"),
            *("--listen", "0/TCP", "--listen", "0/UDP"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        word, *bound = proc.stdout.readline().split()
        assert word == "ready"
        yield {proto: int(port) for port, proto in (b.split("/") for b in bound)}
    finally:
        proc.kill()
        proc.wait()


def free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def attempt(kind: socket.SocketKind, port: int) -> Attempt:
    return Attempt(socket.socket(socket.AF_INET, kind), ("127.0.0.1", port))


def test_tcp_and_udp_answers_count_as_reachable(server: dict[str, int]) -> None:
    attempts = [attempt(socket.SOCK_STREAM, server["TCP"]), attempt(socket.SOCK_DGRAM, server["UDP"])]
    run_attempts(attempts, timeout_s=5.0)
    assert [a.ok for a in attempts] == [True, True]


def test_the_tcp_server_names_its_pod_and_the_address_it_sees(server: dict[str, int]) -> None:
    with socket.create_connection(("127.0.0.1", server["TCP"]), timeout=5) as conn:
        assert conn.recv(64) == b"x/a 127.0.0.1\n"


def test_refusals_are_unreachable_at_once() -> None:
    attempts = [
        attempt(socket.SOCK_STREAM, free_port(socket.SOCK_STREAM)),
        attempt(socket.SOCK_DGRAM, free_port(socket.SOCK_DGRAM)),
    ]
    started = time.monotonic()
    run_attempts(attempts, timeout_s=5.0)
    assert [a.ok for a in attempts] == [False, False]
    assert time.monotonic() - started < 2.0


def test_silence_is_unreachable_at_the_deadline() -> None:
    """A UDP port that is bound but never answers: the attempt gives up after the timeout."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        attempts = [attempt(socket.SOCK_DGRAM, silent.getsockname()[1])]
        started = time.monotonic()
        run_attempts(attempts, timeout_s=0.3)
        elapsed = time.monotonic() - started
    assert not attempts[0].ok
    assert 0.3 <= elapsed < 1.5
    assert attempts[0].sock.fileno() == -1, "run_attempts closes every socket"


def test_checks_default_to_ports_80_and_81_over_tcp_and_udp() -> None:
    assert checks_for(None, None) == [Check(80, "TCP"), Check(81, "TCP"), Check(80, "UDP"), Check(81, "UDP")]
    assert checks_for(8080, None) == [Check(8080, "TCP"), Check(8080, "UDP")]
    assert checks_for(None, "UDP") == [Check(80, "UDP"), Check(81, "UDP")]


def test_matrix_json_has_the_documented_shape() -> None:
    matrix = Matrix(Check(80, "TCP"), {"x/a": {"x/b": True}, "x/b": {"x/a": False}})
    assert json.loads(json.dumps(matrix.to_json())) == {
        "port": 80,
        "protocol": "TCP",
        "matrix": {"x/a": {"x/b": True}, "x/b": {"x/a": False}},
    }
    assert (matrix.reachable, matrix.pairs) == (1, 2)


def test_stop_kills_a_process_that_ignores_sigterm() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            " print('ok', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ok\n"
        ref = ProcessRef.of(proc.pid)
        assert ref.alive()
        stop([ref, None], grace_s=0.2)
        assert not ref.alive()  # and reaped: stop() collects the exit status of its own children
    finally:
        proc.kill()
        proc.wait()


def test_a_reused_pid_is_not_the_recorded_process() -> None:
    """A PID with another start time is someone else: never signalled, never 'alive'."""
    me = ProcessRef.of(1)
    assert not ProcessRef(me.pid, me.start + 1).alive()
    stop([ProcessRef(me.pid, me.start + 1)], grace_s=0.1)  # would fail if it signalled PID 1


def test_wait_until_reports_whether_the_condition_came_true() -> None:
    assert wait_until(lambda: True, 0.1)
    assert not wait_until(lambda: False, 0.05)
