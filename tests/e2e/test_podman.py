"""Podman 4.3 as a real CNI client of Trellis (root): containers on two lab nodes.

On each lab node the test does what an operator of a podman node does: `trellis install-cni`
(for that node's agent socket, into a scratch directory), then `podman run --network trellis`
inside the node's network namespace, with podman's CNI backend pointed at that directory. The
two containers, on two nodes, answer each other over the lab's VXLAN network while the agents
enforce policy (podman passes no pod namespace, so its containers are workloads no policy
selects). `podman rm -f` makes podman call CNI DEL: the addresses, host veths and routes go,
and so do podman's netns and processes.

Podman is kept off the host: storage (vfs), run root, temporary files, locks and crun's state
live under the test's directory, and no image is imported: the containers run from a busybox
root directory (`--rootfs`), because `podman import` writes libimage's blob-info cache to
/var/lib/containers/cache, which podman 4.3 cannot move. Two paths podman 4.3 hard-codes stay:
the container netns, /run/netns/netns-<uuid> (no setting names it), and libcni's result cache,
/var/lib/cni/results; the test checks that its containers' entries leave both, and removes
the cache directories if it made them. The cleanup removes only the containers, processes and
netns it recorded, even when the test failed, before the lab goes down.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.labs import TRELLIS, Lab, built
from tests.helpers import wait_until
from trellis.cni.install import NETWORK_NAME
from trellis.lab.process import ProcessRef, stop
from trellis.lab.state import LabPaths

PODMAN = shutil.which("podman")
CRUN = shutil.which("crun")
BUSYBOX = Path("/bin/busybox")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: builds a lab of network namespaces"),
    pytest.mark.skipif(
        not (PODMAN and CRUN and BUSYBOX.exists()), reason="needs podman, crun and busybox-static"
    ),
]

CNI_VERSION = "1.0.0"
"""Podman 4.3's libcni reads results up to 1.0.0; with 1.1.0 its ADD fails (unsupported version)."""
ULIMITS = ("nofile=1024:1024", "nproc=1024:1024")
"""Podman's defaults (1048576) exceed the hard limits here, and root lacks CAP_SYS_RESOURCE."""
APPLETS = ("sh", "hostname", "httpd", "nc")
"""The busybox applets the containers use."""
HYBRID_CGROUPS = Path("/sys/fs/cgroup/unified/cgroup.controllers")
LIBCNI_CACHE = Path("/var/lib/cni")
SERVE = "hostname > /www/index.html && exec httpd -f -p 80 -h /www"
"""A container's server: answers HTTP on port 80 with the container's host name."""
GET = 'printf "GET / HTTP/1.0\\r\\n\\r\\n" | nc -w 5 "$0" 80'
"""An HTTP request from inside a container to the address given as $0; prints the answer."""
PODMAN_TIMEOUT_S = 60.0
CONVERGE_S = 20.0

CONTAINERS_CONF = """\
[containers]
cgroups = "disabled"
default_ulimits = {ulimits}

[network]
network_backend = "cni"
cni_plugin_dirs = [{cni_bin}]
network_config_dir = {cni_conf}
default_network = {network}

[engine]
cgroup_manager = "cgroupfs"
events_logger = "none"
lock_type = "file"
tmp_dir = {tmp_dir}
runtime = "crun"

[engine.runtimes]
crun = [{crun}]
"""
"""Podman's configuration (`CONTAINERS_CONF`): the CNI backend, with Trellis where it was installed."""
STORAGE_CONF = """\
[storage]
driver = "vfs"
graphroot = {graphroot}
runroot = {runroot}
"""
"""Podman's storage (`CONTAINERS_STORAGE_CONF`): vfs, under the test's directory."""


def toml(template: str, **values: object) -> str:
    """`template` with each value written as TOML (a JSON string or list of strings is one)."""
    return template.format(**{key: json.dumps(value) for key, value in values.items()})


def crun_wrapper(state: Path) -> str:
    """The OCI runtime podman runs: crun with its state under `state` (not /run/crun).

    On a host with hybrid cgroups whose v2 hierarchy has controllers (this one), crun 1.8
    refuses every container, even with cgroups disabled; in a mount namespace of its own,
    without that hierarchy, it sees plain cgroup v1 (`umount -n` writes no /run/mount/utab).
    """
    crun = f'exec {shlex.quote(str(CRUN))} --root {shlex.quote(str(state))} "$@"'
    if HYBRID_CGROUPS.exists() and HYBRID_CGROUPS.read_text().strip():
        inner = f"umount -n {HYBRID_CGROUPS.parent} && {crun}"
        return f'#!/bin/sh\nexec unshare --mount sh -c {shlex.quote(inner)} sh "$@"\n'
    return f"#!/bin/sh\n{crun}\n"


def busybox_root(path: Path) -> Path:
    """A container root directory: Debian's static busybox and the applets the test uses."""
    for directory in ("bin", "dev", "etc", "proc", "sys", "www"):
        (path / directory).mkdir(parents=True)
    shutil.copy2(BUSYBOX, path / "bin" / "busybox")
    for applet in APPLETS:
        (path / "bin" / applet).symlink_to("busybox")
    return path


@dataclass(frozen=True)
class Container:
    """A running container as podman reports it."""

    name: str
    id: str
    ip: str
    netns: Path
    """The namespace podman made for it: /run/netns/netns-<uuid>."""
    processes: tuple[ProcessRef, ...]
    """Its conmon and its init process."""


@dataclass
class PodmanHost:
    """Podman on one lab node: its own config, storage and plugin, run in the node's namespace."""

    root: Path
    netns: str
    agent_socket: Path
    containers: list[Container] = field(default_factory=list)
    """Every container started, for the checks and the cleanup."""

    @property
    def env(self) -> dict[str, str]:
        """Podman's whole environment (podman would pass a CNI_ARGS of its own on to the plugin)."""
        return {
            "PATH": os.environ["PATH"],
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(self.root / "storage.conf"),
        }

    def install(self) -> None:
        """`trellis install-cni` for the node's agent, then podman's config pointing at it."""
        cni_bin, cni_conf, crun = self.root / "cni" / "bin", self.root / "cni" / "net.d", self.root / "crun"
        install = ["install-cni", "--bin-dir", str(cni_bin), "--conf-dir", str(cni_conf)]
        install += ["--socket", str(self.agent_socket), "--cni-version", CNI_VERSION]
        subprocess.run([str(TRELLIS), *install], check=True, capture_output=True)
        crun.write_text(crun_wrapper(self.root / "crun-state"))
        crun.chmod(0o755)
        busybox_root(self.root / "rootfs")
        (self.root / "containers.conf").write_text(
            toml(
                CONTAINERS_CONF,
                ulimits=list(ULIMITS),
                cni_bin=str(cni_bin),
                cni_conf=str(cni_conf),
                network=NETWORK_NAME,
                tmp_dir=str(self.root / "tmp"),
                crun=str(crun),
            )
        )
        (self.root / "storage.conf").write_text(
            toml(STORAGE_CONF, graphroot=str(self.root / "graph"), runroot=str(self.root / "run"))
        )

    def podman(self, *args: str, check: bool = True) -> str:
        """`podman ARGS` in the node's network namespace; its stdout."""
        proc = subprocess.run(
            ["nsenter", f"--net=/run/netns/{self.netns}", str(PODMAN), *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=False,
            timeout=PODMAN_TIMEOUT_S,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} on {self.netns} exited {proc.returncode}: {proc.stderr}"
            )
        return proc.stdout

    def serve(self, name: str) -> Container:
        """A container on the Trellis network answering HTTP with its name."""
        self.podman(
            "run", "--detach", "--name", name, "--hostname", name, "--network", NETWORK_NAME,
            "--rootfs", str(self.root / "rootfs"), "sh", "-c", SERVE,
        )  # fmt: skip
        (data,) = json.loads(self.podman("inspect", "--format", "json", name))
        settings = data["NetworkSettings"]
        container = Container(
            name=name,
            id=data["Id"],
            ip=settings["Networks"][NETWORK_NAME]["IPAddress"],
            netns=Path(settings["SandboxKey"]),
            processes=(ProcessRef.of(data["State"]["ConmonPid"]), ProcessRef.of(data["State"]["Pid"])),
        )
        self.containers.append(container)
        return container

    def ask(self, name: str, ip: str) -> str:
        """The last line the HTTP server at `ip` answers to container `name`: the server's name."""
        return self.podman("exec", name, "sh", "-c", GET, ip).strip().splitlines()[-1]

    def clean(self) -> None:
        """Remove every container, then stop and unmount what podman may have left of them."""
        self.podman("rm", "--force", "--all", "--time", "0", check=False)
        stop(p for c in self.containers for p in c.processes)
        for container in self.containers:
            if container.netns.exists():
                subprocess.run(["ip", "netns", "delete", container.netns.name], check=False)


@contextmanager
def podman_hosts(lab: Lab, tmp_path: Path, nodes: tuple[str, ...]) -> Iterator[dict[str, PodmanHost]]:
    """Podman installed on each of `nodes`; cleaned up afterwards, whatever happened."""
    made_cache = not LIBCNI_CACHE.exists()
    paths = LabPaths(lab.name)
    hosts = {
        node: PodmanHost(tmp_path / node, f"trl-{lab.name}-{node}", paths.agent_socket(node))
        for node in nodes
    }
    try:
        for host in hosts.values():
            host.install()
        yield hosts
    finally:
        for host in hosts.values():
            host.clean()
        if made_cache:  # only if empty: another runtime may have begun using it meanwhile
            for directory in (LIBCNI_CACHE / "results", LIBCNI_CACHE):
                with suppress(OSError):
                    directory.rmdir()


def pod_route_dev(lab: Lab, node: str, ip: str) -> str | None:
    """The host veth of the node's own /32 route to pod address `ip`, if there is one."""
    devs = [route["dev"] for route in lab.routes(node) if route["dst"] == ip]
    return devs[0] if devs else None


def link_exists(netns: str, name: str) -> bool:
    proc = subprocess.run(["ip", "-n", netns, "link", "show", "dev", name], capture_output=True, check=False)
    return proc.returncode == 0


def test_podman_containers_on_two_nodes_reach_each_other_and_rm_releases_them(tmp_path: Path) -> None:
    nodes = ("node-1", "node-2")
    with built(tmp_path, "--nodes", "2") as lab, podman_hosts(lab, tmp_path, nodes) as hosts:
        a = hosts["node-1"].serve(f"trl-{lab.name}-a")
        b = hosts["node-2"].serve(f"trl-{lab.name}-b")
        held = {att.container_id: (node, str(ip)) for node, ip, att in lab.allocations()}
        assert held == {a.id: ("node-1", a.ip), b.id: ("node-2", b.ip)}
        assert all(c.netns.parent == Path("/run/netns") and c.netns.exists() for c in (a, b))
        veths = {c.name: pod_route_dev(lab, node, c.ip) for node, c in (("node-1", a), ("node-2", b))}
        assert all(veths.values()), veths

        wait_until(
            lambda: bool(lab.route_to("node-2", a.ip) and lab.route_to("node-1", b.ip)),
            CONVERGE_S,
            "each node to route the other node's container block",
        )
        assert hosts["node-2"].ask(b.name, a.ip) == a.name
        assert hosts["node-1"].ask(a.name, b.ip) == b.name

        hosts["node-1"].podman("rm", "--force", "--time", "0", a.name)
        hosts["node-2"].podman("rm", "--force", "--time", "0", b.name)
        assert lab.allocations() == []
        for node, container in (("node-1", a), ("node-2", b)):
            assert pod_route_dev(lab, node, container.ip) is None
            assert not link_exists(f"trl-{lab.name}-{node}", str(veths[container.name]))
            assert not container.netns.exists(), f"podman left {container.netns}"
            assert not (LIBCNI_CACHE / "results" / f"{NETWORK_NAME}-{container.id}-eth0").exists()
            assert hosts[node].podman("ps", "--all", "--quiet") == ""
            assert not list((hosts[node].root / "crun-state").iterdir())
        wait_until(
            lambda: not any(p.alive() for c in (a, b) for p in c.processes),
            CONVERGE_S,
            "conmon and the containers' processes to exit",
        )
