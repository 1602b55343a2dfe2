"""Security with real permissions and real packets: the agent's socket and state are root's
alone, and a pod sends only from its own address (anti-spoofing on its host veth).

Permissions are tried, not only read: a process running as `nobody` tries to connect to the
agent's socket and to open its files. It reaches each one through a descriptor that root opened
with O_PATH and handed over (/proc/self/fd/N), so only the permissions of that very object (or
of the one directory named) stand in its way, not the private directories pytest makes above.
The same attempts as root succeed, so a refusal is the object's doing.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import wait_until
from tests.privileged.nodes import AGENT, AGENT_READY_TIMEOUT_S, NODE_ADDRESS, NODE_NAME, Node, Pod, run
from trellis.bgp.bird import Bird
from trellis.dataplane.kernel.netns import enter
from trellis.dataplane.render.nft import FAMILY, PREROUTING, TABLE
from trellis.model.node import STATUS_FILE

pytestmark = pytest.mark.privileged

SYSTEM_PYTHON = "/usr/bin/python3"
"""Debian's interpreter: `nobody` can run it (the venv's lies under directories only root may enter)."""
AGENT_FILES = ("trellis.db", "trellis.db-wal", "trellis.db-shm", STATUS_FILE)
"""What the agent writes in its state directory (with the bgp backend, BIRD_FILES too)."""
BIRD_FILES = ("bird.conf", "bird.ctl", "bird.pid", "bird.log")
ATTEMPT = """
import errno, os, socket, sys
for attempt in sys.argv[1:]:
    kind, _, path = attempt.partition("=")
    try:
        if kind == "connect":
            socket.socket(socket.AF_UNIX).connect(path)
        elif kind == "list":
            os.listdir(path)
        else:
            os.close(os.open(path, os.O_RDONLY if kind == "read" else os.O_WRONLY))
        print("ok")
    except OSError as err:
        print(errno.errorcode[err.errno])
"""
"""Each argument `KIND=PATH` (connect, list, read, write): prints `ok` or the errno's name."""
SPOOF_PORT = 5001
FORGED_PER_SOURCE = 3
ANTI_SPOOFING = "anti-spoofing"
"""How the comment of the anti-spoofing rule begins."""


def attempt(user: str, attempts: list[tuple[str, Path, str]]) -> list[str]:
    """Run each (kind, object, name) as `user`: the object is reached through an O_PATH
    descriptor, and `name`, if any, is looked up in it (a directory). Returns what each gave."""
    account = pwd.getpwnam(user)
    fds = [os.open(obj, os.O_PATH) for _, obj, _ in attempts]
    try:
        args = [
            f"{kind}=/proc/self/fd/{fd}" + (f"/{name}" if name else "")
            for (kind, _, name), fd in zip(attempts, fds, strict=True)
        ]
        done = subprocess.run(
            [SYSTEM_PYTHON, "-I", "-S", "-c", ATTEMPT, *args],
            pass_fds=fds,
            user=account.pw_uid,
            group=account.pw_gid,
            extra_groups=[],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        for fd in fds:
            os.close(fd)
    return done.stdout.split()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_the_agent_socket_and_state_are_roots_alone(node: Node) -> None:
    """Socket 0600 in a 0700 directory, the state files 0600, all root's; `nobody` can neither
    connect (through the socket itself, or by name through its directory) nor open a file nor
    list the directory, while root can."""
    node.wait_programmed()  # status.json is written
    socket, state = node.socket, node.dir
    assert stat.S_ISSOCK(socket.lstat().st_mode)
    assert (mode(socket), mode(socket.parent), mode(state)) == (0o600, 0o700, 0o700)
    files = [state / name for name in AGENT_FILES]
    assert {f.name: oct(mode(f)) for f in files} == {f.name: "0o600" for f in files}
    assert {path.lstat().st_uid for path in [socket, state, *files]} == {0}
    tries = [
        ("connect", socket, ""),
        ("connect", socket.parent, socket.name),
        ("list", state, ""),
        *(("read", f, "") for f in files),
        *(("write", f, "") for f in files),
    ]
    assert attempt("root", tries) == ["ok"] * len(tries)
    assert attempt("nobody", tries) == ["EACCES"] * len(tries)


def test_bird_files_of_a_bgp_agent_are_roots_alone(node: Node) -> None:
    """With the bgp backend the agent's BIRD (its child) writes its config, control socket, pid
    file and log in the state directory: all root's, none open to others (nor, but for BIRD's
    socket, to the group), and `nobody` can neither talk to BIRD nor read its config."""
    node.stop_agent(signal.SIGTERM)
    bird_files = [node.dir / name for name in BIRD_FILES]
    with (node.dir / "agent.log").open("ab") as log:
        agent = subprocess.Popen(
            [*agent_command(node), "--backend", "bgp"],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=functools.partial(enter, node.netns),  # noqa: PLW1509 (setns before exec only)
        )
    try:
        wait_until(lambda: all(f.exists() for f in bird_files), AGENT_READY_TIMEOUT_S, "BIRD's files")
        # BIRD itself makes its control socket 0660, for group root: no one else.
        closed = {f.name: 0o007 if f.name == "bird.ctl" else 0o077 for f in bird_files}
        assert {f.name: oct(mode(f) & closed[f.name]) for f in bird_files} == {
            f.name: "0o0" for f in bird_files
        }
        assert {(f.lstat().st_uid, f.lstat().st_gid) for f in bird_files} == {(0, 0)}
        tries = [("connect", node.dir / "bird.ctl", ""), ("read", node.dir / "bird.conf", "")]
        assert attempt("root", tries) == ["ok", "ok"]
        assert attempt("nobody", tries) == ["EACCES", "EACCES"]
    finally:
        agent.terminate()  # it stops its BIRD
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()
        Bird(node.dir).stop()  # in case the agent could not


def agent_command(node: Node) -> list[str]:
    """The node's agent command line, as `Node.start_agent` runs it."""
    return [
        str(AGENT),
        "agent",
        "--node",
        NODE_NAME,
        "--socket",
        str(node.socket),
        "--state-dir",
        str(node.dir),
    ]


def _antispoofing_counter(node: Node) -> tuple[int, int]:
    """(handle, packets) of the anti-spoofing rule in the node's table: a new handle means the
    agent replaced the table (its counters start again from zero)."""
    chain = json.loads(node.exec_in_node("nft", "-j", "list", "chain", FAMILY, TABLE, PREROUTING))
    (rule,) = [
        item["rule"]
        for item in chain["nftables"]
        if "rule" in item and item["rule"].get("comment", "").startswith(ANTI_SPOOFING)
    ]
    (counter,) = [expr["counter"] for expr in rule["expr"] if "counter" in expr]
    return int(rule["handle"]), int(counter["packets"])


RECEIVE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, (source, _) = s.recvfrom(256)
    print(data.decode(), source, flush=True)
    if data == b"real":
        break
"""
"""Prints every datagram (`PAYLOAD SOURCE`) until `real` arrives."""
SEND = """
import socket, sys
destination, port, real, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
for source in sys.argv[5:]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((source, 0))
        for _ in range(count):
            s.sendto(b"forged", (destination, port))
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.bind((real, 0))
    s.sendto(b"real", (destination, port))
"""
"""Sends `count` datagrams from each forged source, then one from the real one, in that order."""


def _spoof_round(node: Node, sender: Pod, real: str, forged: list[str]) -> tuple[list[str], int] | None:
    """What the node received from `sender` sending from `forged` then `real`, and by how much
    the anti-spoofing counter grew; None when the agent replaced its table meanwhile."""
    receiver = subprocess.Popen(
        ["ip", "netns", "exec", node.netns, sys.executable, "-I", "-c", RECEIVE, str(NODE_ADDRESS.ip),
         str(SPOOF_PORT)],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert receiver.stdout is not None
        assert receiver.stdout.readline().strip() == "ready"
        before = _antispoofing_counter(node)
        run("ip", "netns", "exec", sender.netns, sys.executable, "-I", "-c", SEND, str(NODE_ADDRESS.ip),
            str(SPOOF_PORT), real, str(FORGED_PER_SOURCE), *forged)  # fmt: skip
        out, _ = receiver.communicate(timeout=30)
        after = _antispoofing_counter(node)
    finally:
        receiver.kill()
        receiver.wait()
    if after[0] != before[0]:
        return None
    return out.splitlines(), after[1] - before[1]


def test_a_pod_cannot_send_from_an_address_that_is_not_its_own(node: Node) -> None:
    """Pod a holds, besides its own, the address of pod c and one from no pool on its eth0 and
    sends from each to the node, then once from its own. Only the last arrives, and the rule
    that drops the others counts exactly them. The forged datagrams leave first on the same
    path: had any passed, the node would have received it before the real one."""
    sender, neighbour = node.new_pods(2)
    real = node.runtime.add(sender.container_id, sender.path)["ips"][0]["address"].split("/")[0]
    stolen = node.runtime.add(neighbour.container_id, neighbour.path)["ips"][0]["address"].split("/")[0]
    node.wait_programmed()  # both addresses are in the anti-spoofing set
    forged = [stolen, "198.51.100.7"]
    for address in forged:
        run("ip", "-n", sender.netns, "addr", "add", f"{address}/32", "dev", sender.ifname)
    for _ in range(3):  # the agent replaces its table every 30 s: then measure again
        measured = _spoof_round(node, sender, real, forged)
        if measured is not None:
            break
    assert measured is not None, "the agent replaced its table during each of 3 rounds"
    received, dropped = measured
    assert received == [f"real {real}"]
    assert dropped == FORGED_PER_SOURCE * len(forged)
