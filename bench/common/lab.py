"""A Trellis lab driven through its command line, the stable interface of DESIGN.md §4.

The benchmarks never import `trellis.lab`: they run `trellis lab up/apply/exec/status/node/down`
as a user or a test script does, so they measure what the commands do and keep working while
the lab's internals change. `lab(...)` always runs `lab down`, also after a failed `up`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.host import BenchError, run

TRELLIS = str(Path(sys.executable).with_name("trellis"))
"""The venv's `trellis` command, beside the interpreter that runs the benchmark."""


def trellis(*args: str, stdin: str | None = None, timeout: float = 120.0) -> str:
    return run([TRELLIS, *args], stdin=stdin, timeout=timeout)


def pods_manifest(pods: Sequence[tuple[str, str]], namespace: str = "default") -> str:
    """A multi-document manifest of Pods `(name, node)` pinned by spec.nodeName (JSON is YAML)."""
    docs = [
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"nodeName": node},
        }
        for name, node in pods
    ]
    return "\n---\n".join(json.dumps(doc) for doc in docs) + "\n"


@dataclass(frozen=True)
class Lab:
    name: str

    def _cmd(self, command: str, *args: str, stdin: str | None = None) -> str:
        return trellis("lab", *command.split(), "--name", self.name, *args, stdin=stdin)

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = json.loads(self._cmd("status", "--output", "json"))
        return status

    def apply(self, manifest: str, wait: bool = True) -> str:
        return self._cmd("apply", "-f", "-", *([] if wait else ["--no-wait"]), stdin=manifest)

    def node_add(self, node: str) -> str:
        return self._cmd("node add", node)

    def node_remove(self, node: str) -> str:
        return self._cmd("node remove", node)

    def node_netns(self, node: str) -> str:
        """The node's namespace, as DESIGN.md §4 names it."""
        return f"trl-{self.name}-{node}"

    def exec_prefix(self, pod: str) -> list[str]:
        """The prefix that runs a command in pod `ns/name` (`lab exec` execs it: the PID is the command's)."""
        return [TRELLIS, "lab", "exec", "--name", self.name, pod, "--"]

    def pod_ip(self, pod: str) -> str:
        for entry in self.status()["pods"]:
            if entry["name"] == pod and entry.get("ip"):
                return str(entry["ip"])
        raise LookupError(f"lab {self.name}: pod {pod} has no IP")


@contextmanager
def lab(name: str, nodes: int, backend: str = "vxlan", datastore: str = "sqlite") -> Iterator[Lab]:
    """Lab `name` up for the duration of the block; `lab down` always runs afterwards."""
    made = Lab(name)
    failed = True
    try:
        trellis(
            "lab", "up", "--name", name, "--nodes", str(nodes), "--backend", backend, "--datastore", datastore
        )
        yield made
        failed = False
    finally:
        try:
            trellis("lab", "down", "--name", name)
        except BenchError as err:
            if not failed:
                raise
            print(f"lab {name}: {err}", file=sys.stderr)  # the error already unwinding matters more
