"""Lab pods, made the way Kubernetes makes them: the API object first, then the runtime's work.

Why through the real plugin: the lab is the container runtime of its nodes. For a pod it
creates a network namespace, then runs the node's conflist with `CniRuntime` (the plugin
executables, exec'd inside the node's namespace, with the Kubernetes CNI_ARGS that containerd
and CRI-O pass) and takes the pod's address from the ADD result; CniRuntime caches that
result for DEL, as libcni does. CNI error 11 ("try again later", e.g. while the supervisor
restarts an agent) is retried until a deadline, as kubelet retries.

Why the Pod object comes first: the lab is the API server too (`kube.py`). As in Kubernetes,
the Pod object exists, scheduled on its node, before its sandbox's CNI ADD, and the ADD's
address then becomes its `status.podIP` (the agents put it in the address sets of every
policy that selects the pod, and drop a pod interface whose object is missing). Removal goes
in the same order backwards: stop the pod's processes, CNI DEL, remove the namespace, then
delete the object.

Each pod runs `podserver.py` on its ports, so the probe measures real TCP and UDP traffic;
so does the lab's external host, whose answers show the address a pod's traffic arrives from.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import selectors
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, TypeVar

from trellis.cni.install import CONFLIST_NAME
from trellis.dataplane.kernel.netns import netns_path
from trellis.lab import kube, podserver, store
from trellis.lab.errors import LabError
from trellis.lab.fabric import create_netns, remove_netns
from trellis.lab.manifest import ContainerPort, PodObject
from trellis.lab.process import ProcessRef, in_netns, stop
from trellis.lab.runtime import CniRuntime, PluginError
from trellis.lab.state import LabPaths, LabState, Node, Pod, pod_netns, save

log = logging.getLogger(__name__)

T = TypeVar("T")

REFERENCE_PLUGINS = Path("/usr/lib/cni")
"""Debian's reference plugins, on every node's CNI_PATH after the node's own bin directory."""
POD_IFNAME = "eth0"
TRY_AGAIN_LATER = 11
CNI_RETRY_S = 30.0
"""How long a CNI command answered with "try again later" is retried (seconds)."""
RETRY_INTERVAL_S = 0.1
SERVER_READY_S = 10.0


def node_runtime(paths: LabPaths, node: Node) -> CniRuntime:
    """The runtime's CNI side on `node`: its conflist and plugins, run in its namespace."""
    return CniRuntime(
        paths.cni_conf_dir(node.name) / CONFLIST_NAME,
        node_cni_path(paths, node),
        paths.cni_cache_dir(node.name),
        node_netns=node.netns,
    )


def node_cni_path(paths: LabPaths, node: Node) -> list[Path]:
    return [paths.cni_bin_dir(node.name), REFERENCE_PLUGINS]


def node_ready(paths: LabPaths, node: Node) -> bool:
    """Whether the node's plugin answers CNI STATUS with success (its agent serves)."""
    try:
        with node_runtime(paths, node) as runtime:
            runtime.status()
    except (PluginError, OSError):
        return False
    return True


def new_pod(lab: str, obj: PodObject, node: str) -> Pod:
    """A pod to create: its sandbox's container ID and UID are fresh, as a runtime makes them."""
    return Pod(
        namespace=obj.namespace,
        name=obj.name,
        node=node,
        netns=pod_netns(lab, obj.namespace, obj.name),
        container_id=secrets.token_hex(32),
        uid=str(uuid.uuid4()),
        labels=obj.labels,
        ports=obj.listen_ports,
    )


def cni_args(pod: Pod) -> dict[str, str]:
    """CNI_ARGS as Kubernetes runtimes pass them."""
    return {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": pod.namespace,
        "K8S_POD_NAME": pod.name,
        "K8S_POD_INFRA_CONTAINER_ID": pod.container_id,
        "K8S_POD_UID": pod.uid,
    }


def _retrying(what: str, call: Callable[[], T]) -> T:
    deadline = time.monotonic() + CNI_RETRY_S
    while True:
        try:
            return call()
        except PluginError as err:
            if err.code != TRY_AGAIN_LATER or time.monotonic() >= deadline:
                raise LabError(f"{what}: {err}") from None
        except OSError as err:
            raise LabError(f"{what}: {err}") from None
        time.sleep(RETRY_INTERVAL_S)


def _result_ip(pod: Pod, result: dict[str, Any]) -> ipaddress.IPv4Address:
    for entry in result.get("ips", []):
        address = ipaddress.ip_interface(entry["address"])
        if isinstance(address, ipaddress.IPv4Interface):
            return address.ip
    raise LabError(f"pod {pod.key}: the CNI ADD result holds no IPv4 address: {result}")


def _first_line(stream: IO[bytes], timeout_s: float) -> str:
    """The first line `stream` yields within `timeout_s` (less if it ends first)."""
    deadline = time.monotonic() + timeout_s
    data = b""
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while b"\n" not in data and (left := deadline - time.monotonic()) > 0:
            if not selector.select(left):
                break
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace").partition("\n")[0]


def start_server(netns: str, name: str, ports: tuple[ContainerPort, ...], log_path: Path) -> ProcessRef:
    """Start a pod server called `name` in `netns`; return once it listens on every port."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-I", "-S", podserver.__file__, "--name", name]
    command += [f"--listen={port.port}/{port.protocol}" for port in ports]
    with log_path.open("ab") as err:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=err,
            preexec_fn=in_netns(netns),  # noqa: PLW1509 (no other thread runs meanwhile)
            start_new_session=True,
        )
    assert proc.stdout is not None
    with proc.stdout:
        line = _first_line(proc.stdout, SERVER_READY_S)
    if not line.startswith("ready"):
        proc.kill()
        proc.wait()
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
        raise LabError(f"server {name} did not start ({tail[0] if tail else 'no output'})")
    return ProcessRef.of(proc.pid)


def create_pod(paths: LabPaths, state: LabState, pod: Pod) -> Pod:
    """Create `pod` (recorded first): its object, its namespace, CNI ADD on its node, its address
    in the object, its server. Returns it with its IP and server.

    On failure, whatever was made is removed before the error is raised; a pod whose removal
    failed too stays recorded for `delete` or `down` to finish.
    """
    state.pods[pod.key] = pod
    save(paths, state)
    node = state.node(pod.node)
    try:
        store.write(paths, state, dict([kube.pod_object(state, pod)]))
        create_netns(pod.netns)
        with node_runtime(paths, node) as runtime:
            result = _retrying(
                f"pod {pod.key}: CNI ADD on {node.name}",
                lambda: runtime.add(pod.container_id, netns_path(pod.netns), POD_IFNAME, cni_args(pod)),
            )
        pod = state.pods[pod.key] = replace(pod, ip=_result_ip(pod, result))
        save(paths, state)
        store.write(paths, state, dict([kube.pod_object(state, pod)]))
        server = start_server(pod.netns, pod.key, pod.ports, paths.pod_log(pod.key))
        pod = state.pods[pod.key] = replace(pod, server=server)
        save(paths, state)
    except BaseException:
        try:
            delete_pod(paths, state, pod.key)
        except LabError as err:
            log.warning("pod %s: rollback incomplete: %s", pod.key, err)
        raise
    return pod


def delete_pod(paths: LabPaths, state: LabState, key: str) -> str:
    """Remove pod `key`: its server, CNI DEL on its node, its namespace, its object, its record
    (each step idempotent). Returns what `kubectl delete` would print.
    """
    pod = state.pods.get(key)
    if pod is None:
        return f"pod/{key} not found"
    stop([pod.server], grace_s=2.0)
    node = state.node(pod.node)
    with node_runtime(paths, node) as runtime:
        _retrying(
            f"pod {pod.key}: CNI DEL on {node.name}",
            lambda: runtime.delete(pod.container_id, netns_path(pod.netns), POD_IFNAME, cni_args(pod)),
        )
    remove_netns(pod.netns)
    paths.pod_log(pod.key).unlink(missing_ok=True)
    store.write(paths, state, {kube.pod_key(key): None})
    del state.pods[key]
    save(paths, state)
    return f"pod/{key} deleted"
