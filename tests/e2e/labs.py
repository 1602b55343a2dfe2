"""A lab driven through the real `trellis lab` CLI, as a person or a script would, for the e2e tests.

Every lab is named `e2e-<random>`. `built()` always runs `trellis lab down` afterwards and then
checks that no `trl-<lab>-...` namespace, no process the lab reported and no file of the lab
is left, even when the test failed. Reads of a node's kernel go through `ip -n`, as a person
would check.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from tests.helpers import stored_allocations, wait_until
from trellis.datastore import Datastore
from trellis.datastore.sqlite import SqliteDatastore
from trellis.lab import store as lab_store
from trellis.lab.process import ProcessRef
from trellis.lab.state import LabPaths, load
from trellis.model.ipam import Attachment
from trellis.model.node import STATUS_FILE

T = TypeVar("T")

TRELLIS = Path(sys.executable).with_name("trellis")
LAB_ROOT = Path("/run/trellis/lab")
ASK = (
    "import socket, sys; "
    "print(socket.create_connection((sys.argv[1], int(sys.argv[2])), 2).recv(256).decode())"
)
"""A TCP client run in a pod: prints what the server answers (a pod server: its name, then whom it sees)."""


def netns_names() -> set[str]:
    return {path.name for path in Path("/run/netns").iterdir()}


def rx_packets(netns: str) -> int:
    """Packets eth0 of namespace `netns` (a pod's) has received."""
    out = subprocess.run(
        ["ip", "-n", netns, "-s", "-j", "link", "show", "eth0"], capture_output=True, text=True, check=True
    ).stdout
    return int(json.loads(out)[0]["stats64"]["rx"]["packets"])


def pods_manifest(placement: dict[str, str]) -> str:
    """Pods of namespace `default`, each on the node given (name -> node)."""
    return "".join(
        f"---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\n"
        f"spec: {{nodeName: {node}}}\n"
        for name, node in placement.items()
    )


class Lab:
    """One lab, driven through the CLI."""

    def __init__(self, tmp_path: Path) -> None:
        self.name = f"e2e-{secrets.token_hex(3)}"
        self.tmp_path = tmp_path
        self.processes: set[ProcessRef] = set()
        """Every process the lab reported (agents, etcd, supervisor, servers): none may outlive `down`."""

    def run(
        self, command: str, *args: str, check: bool = True, stdin: str | None = None, group: str = "lab"
    ) -> str:
        """`trellis GROUP COMMAND --name LAB ARGS`; its stdout, or `CODE\\nSTDERR` when not `check`ed."""
        words = command.split()
        proc = subprocess.run(
            [str(TRELLIS), group, *words, "--name", self.name, *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"lab {command} {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout if check else f"{proc.returncode}\n{proc.stderr}"

    def file(self, manifest: str) -> str:
        """A new file holding `manifest`."""
        path = self.tmp_path / f"{secrets.token_hex(4)}.yaml"
        path.write_text(manifest)
        return str(path)

    def apply(self, manifest: str, command: str = "apply") -> str:
        return self.run(command, "-f", self.file(manifest))

    def policy(self, command: str, *args: str) -> Any:
        """`trellis policy COMMAND --name LAB ARGS --output json`, parsed."""
        return json.loads(self.run(command, *args, "--output", "json", group="policy"))

    def revisions(self) -> dict[str, int]:
        """The datastore revision each node's agent reports its kernel reflects (its status.json)."""
        paths = (LAB_ROOT / self.name / "nodes").glob(f"*/{STATUS_FILE}")
        return {path.parent.name: int(json.loads(path.read_text())["revision"]) for path in paths}

    def programmed(self, revision: int, timeout_s: float = 10.0) -> None:
        """Wait until every node's agent reports that its kernel reflects datastore revision `revision`."""
        wait_until(
            lambda: min(self.revisions().values()) >= revision,
            timeout_s,
            f"every agent to program revision {revision}",
        )

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self.run("status", "--output", "json"))
        pids = [status["supervisor_pid"], status["etcd_pid"], status["external"]["server_pid"]]
        pids += [n["agent_pid"] for n in status["nodes"]] + [p["server_pid"] for p in status["pods"]]
        for pid in filter(None, pids):
            try:
                self.processes.add(ProcessRef.of(pid))
            except ProcessLookupError:
                continue
        return status

    def pod(self, key: str) -> dict[str, Any]:
        (pod,) = [p for p in self.status()["pods"] if p["name"] == key]
        found: dict[str, Any] = pod
        return found

    def node(self, name: str) -> dict[str, Any]:
        (node,) = [n for n in self.status()["nodes"] if n["name"] == name]
        found: dict[str, Any] = node
        return found

    def probe(self, *args: str) -> Any:
        return json.loads(self.run("probe", "--output", "json", *args))

    def ask(self, pod: str, ip: str, port: int = 80) -> str:
        """What the TCP server at `ip`:`port` answers to pod `pod` (through `lab exec`)."""
        return self.run("exec", pod, "--", sys.executable, "-I", "-c", ASK, ip, str(port)).strip()

    def routes(self, node: str, proto: str = "222") -> list[dict[str, Any]]:
        """The routes of protocol `proto` (default Trellis' own, 222; `bird` for BIRD's) in the
        node's namespace, as `ip -j route` gives them."""
        out = subprocess.run(
            ["ip", "-n", f"trl-{self.name}-{node}", "-j", "route", "show", "proto", proto],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        routes: list[dict[str, Any]] = json.loads(out or "[]")
        return routes

    def route_to(self, node: str, ip: str) -> dict[str, Any] | None:
        """The node's block route (not a pod's own /32) whose destination covers `ip`, if any."""
        address = ipaddress.IPv4Address(ip)
        for route in self.routes(node):
            if "/" in route["dst"] and address in ipaddress.IPv4Network(route["dst"]):
                return route
        return None

    def allocations(self) -> list[tuple[str, ipaddress.IPv4Address, Attachment]]:
        """Every pod address held in the lab's SQLite datastore: (node, address, attachment)."""
        store = SqliteDatastore(LAB_ROOT / self.name / "datastore.db")
        try:
            return stored_allocations(store)
        finally:
            store.close()

    def datastore(self, read: Callable[[Datastore], T]) -> T:
        """`read` run on the lab's datastore, opened where the lab opens it (etcd: in the fabric)."""
        paths = LabPaths(self.name)
        return lab_store.using(paths, load(paths), read)

    def agent_log(self, node: str) -> str:
        return (LAB_ROOT / self.name / "nodes" / node / "agent.log").read_text(errors="replace")

    def namespaces(self) -> set[str]:
        return {name for name in netns_names() if name.startswith(f"trl-{self.name}-")}

    def check_gone(self) -> None:
        assert not self.namespaces(), f"namespaces left: {sorted(self.namespaces())}"
        assert not [p.pid for p in self.processes if p.alive()], "processes left"
        assert not (LAB_ROOT / self.name).exists(), "lab directory left"

    def down(self) -> None:
        """`trellis lab down`, then check that nothing of the lab is left."""
        down = subprocess.run(
            [str(TRELLIS), "lab", "down", "--name", self.name], capture_output=True, text=True, check=False
        )
        assert down.returncode == 0, down.stderr
        self.check_gone()


@contextmanager
def built(tmp_path: Path, *up_args: str) -> Iterator[Lab]:
    """A lab made by `trellis lab up UP_ARGS`, ready; removed afterwards whatever happened."""
    made = Lab(tmp_path)
    try:
        made.run("up", *up_args)
        made.status()
        yield made
    finally:
        made.down()
