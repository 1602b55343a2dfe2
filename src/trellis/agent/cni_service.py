"""The agent's side of CNI: ADD, DEL, CHECK, GC and STATUS for this node.

Each request is validated (`trellis.cni.spec`), then runs under a lock of its container, so
one container's commands never interleave while different pods proceed at once; GC holds
every container's lock. Failures become the spec's error codes: datastore trouble is 11
(try again later), a kernel refusal 102 naming the object, no addresses left 100.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from trellis.agent.config import AgentConfig
from trellis.cni.spec import (
    AddResult,
    CniError,
    CniRequest,
    Code,
    Interface,
    error_version,
    parse_request,
    prev_result_address,
    render_result,
)
from trellis.dataplane.kernel.netlink import KernelError
from trellis.dataplane.kernel.pods import NetnsMissing, PodNetwork
from trellis.datastore.base import DatastoreError
from trellis.ipam.allocator import AddressesExhausted, Ipam
from trellis.model.naming import POD_GATEWAY, host_veth_name

log = logging.getLogger(__name__)

DEFAULT_ROUTE = ipaddress.IPv4Network("0.0.0.0/0")


class _ContainerLocks:
    """One lock per container in use, and an exclusive mode for GC (a readers-writer lock)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy: set[str] = set()
        self._exclusive = False

    @contextmanager
    def container(self, container_id: str) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive and container_id not in self._busy)
            self._busy.add(container_id)
        try:
            yield
        finally:
            with self._cond:
                self._busy.discard(container_id)
                self._cond.notify_all()

    @contextmanager
    def everything(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._exclusive)
            self._exclusive = True
            self._cond.wait_for(lambda: not self._busy)
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class CniService:
    def __init__(self, config: AgentConfig, ipam: Ipam, pods: PodNetwork, mtu: int) -> None:
        self.config = config
        self.ipam = ipam
        self.pods = pods
        self.mtu = mtu
        """Pod MTU when the network config sets none."""
        self._locks = _ContainerLocks()

    def handle(self, env: dict[str, str], stdin: bytes) -> tuple[int, bytes]:
        """One CNI invocation: (exit code, stdout bytes)."""
        started = time.perf_counter()
        try:
            request = parse_request(env, stdin)
        except CniError as err:
            log.warning("rejected %s: %s", env.get("CNI_COMMAND", "?"), err.msg)
            return 1, err.to_json(error_version(stdin)).encode()
        try:
            out = self._dispatch(request)
        except CniError as err:
            elapsed = (time.perf_counter() - started) * 1000
            log.warning("%s %s failed in %.1f ms: %s", request.command, request.pod, elapsed, err.msg)
            return 1, err.to_json(request.version).encode()
        log.info(
            "%s %s done in %.1f ms", request.command, request.pod, (time.perf_counter() - started) * 1000
        )
        return 0, out

    def _dispatch(self, request: CniRequest) -> bytes:
        try:
            if request.command == "GC":
                with self._locks.everything():
                    return self._gc(request)
            if request.command == "STATUS":
                return self._status()
            with self._locks.container(request.container_id):
                if request.command == "ADD":
                    return self._add(request)
                if request.command == "DEL":
                    return self._del(request)
                return self._check(request)
        except DatastoreError as err:
            raise CniError(Code.TRY_AGAIN_LATER, f"pod {request.pod}: datastore unavailable: {err}") from err
        except AddressesExhausted as err:
            raise CniError(Code.ADDRESSES_EXHAUSTED, str(err)) from err
        except KernelError as err:
            raise CniError(Code.KERNEL_FAILURE, f"pod {request.pod}: {err}") from err

    def _add(self, request: CniRequest) -> bytes:
        attachment = request.attachment
        address = self.ipam.assign(attachment, request.pod)
        mtu = request.mtu or self.mtu
        try:
            link = self.pods.attach(attachment, request.netns, address, mtu)
        except NetnsMissing:
            self.ipam.release(attachment)
            raise CniError(
                Code.INVALID_ENVIRONMENT, f"CNI_NETNS {request.netns!r}: network namespace does not exist"
            ) from None
        except BaseException:
            self.ipam.release(attachment)
            raise
        log.info(
            "pod %s: %s/32 on %s (%s in %s)",
            request.pod,
            address,
            link.host_name,
            link.pod_ifname,
            request.netns,
        )
        result = AddResult(
            host=Interface(link.host_name, link.host_mac, mtu=link.mtu),
            pod=Interface(link.pod_ifname, link.pod_mac, sandbox=request.netns, mtu=link.mtu),
            address=ipaddress.IPv4Interface(f"{address}/32"),
            gateway=ipaddress.IPv4Address(POD_GATEWAY),
            routes=(DEFAULT_ROUTE,),
        )
        return json.dumps(render_result(result, request.version)).encode() + b"\n"

    def _del(self, request: CniRequest) -> bytes:
        attachment = request.attachment
        removed = self.pods.detach(attachment)
        released = self.ipam.release(attachment)
        log.info(
            "pod %s: released %s, %s %s",
            request.pod,
            released or "no address",
            host_veth_name(attachment),
            "removed" if removed else "already gone",
        )
        return b""

    def _check(self, request: CniRequest) -> bytes:
        assert request.prev_result is not None
        expected = prev_result_address(request.prev_result)
        held = self.ipam.lookup(request.attachment)
        if held is None:
            raise CniError(Code.CHECK_FAILED, f"pod {request.pod}: no address is allocated to it")
        problems = []
        if held != expected.ip:
            problems.append(f"allocated address {held} differs from prevResult {expected.ip}")
        problems += self.pods.check(request.attachment, request.netns, held)
        if problems:
            raise CniError(Code.CHECK_FAILED, f"pod {request.pod}: " + "; ".join(problems))
        return b""

    def _gc(self, request: CniRequest) -> bytes:
        valid = set(request.valid_attachments)
        freed = self.ipam.release_except(valid)
        keep = {host_veth_name(a) for a in valid}
        stale = [name for name in self.pods.host_links() if name not in keep]
        self.pods.remove_links(stale)
        log.info("GC: released %d addresses, removed %d stale interfaces", len(freed), len(stale))
        return b""

    def _status(self) -> bytes:
        try:
            self.ipam.usage()
        except DatastoreError as err:
            raise CniError(
                Code.NOT_AVAILABLE, f"node {self.config.node}: datastore unavailable: {err}"
            ) from err
        return b""
