"""Every CNI command and error code, the real plugin exec'd as a runtime does it, a real agent behind."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

from tests.helpers import OMIT, cni_error, net_conf
from tests.privileged.nodes import NODE_ADDRESS, Node, Pod, ip_json, run
from trellis.cni.client import SUPPORTED_VERSIONS
from trellis.lab.runtime import PluginError
from trellis.model.naming import POD_GATEWAY, ROUTE_PROTOCOL, host_veth_name

pytestmark = pytest.mark.privileged


def _add(node: Node, pod: Pod) -> str:
    """ADD through the runtime; returns the pod's address (`a.b.c.d/32`)."""
    result = node.runtime.add(pod.container_id, pod.path)
    return str(result["ips"][0]["address"])


def test_version_and_status(node: Node) -> None:
    """VERSION lists the supported versions; STATUS of a ready agent exits 0 with no output."""
    version = node.cni("VERSION", conf=b"")
    assert version.exit_code == 0
    assert json.loads(version.stdout)["supportedVersions"] == list(SUPPORTED_VERSIONS)
    status = node.cni("STATUS")
    assert (status.exit_code, status.stdout) == (0, b"")


@pytest.mark.parametrize("version", SUPPORTED_VERSIONS)
def test_add_result_is_in_the_requested_schema_and_true(node: Node, version: str) -> None:
    """ADD answers in the requested version's schema (sandbox on the pod's interface, ips pointing at
    it, `version` only before 1.0.0, mtu only in 1.1.0), and the kernel holds what it says."""
    pod = node.new_pod()
    inv = node.cni("ADD", pod, net_conf(cniVersion=version))
    assert inv.exit_code == 0, inv.stdout + inv.stderr
    result = json.loads(inv.stdout)
    assert result["cniVersion"] == version
    host, pod_if = result["interfaces"]
    (ip,) = result["ips"]
    assert result["interfaces"][ip["interface"]] is pod_if
    assert "sandbox" not in host and pod_if["sandbox"] == pod.path
    assert ("version" in ip) == version.startswith("0.")
    assert ("mtu" in pod_if) == (version == "1.1.0")
    assert (host["name"], pod_if["name"]) == (host_veth_name(pod.attachment), "eth0")
    assert ip["gateway"] == POD_GATEWAY
    assert pod.addresses() == {ip["address"]}
    assert node.allocations() == {pod.attachment: ip["address"]}
    (kernel_host,) = ip_json(node.netns, "link", "show", "dev", host["name"])
    (kernel_pod,) = ip_json(pod.netns, "link", "show", "dev", "eth0")
    assert (kernel_host["address"], kernel_pod["address"]) == (host["mac"], pod_if["mac"])
    assert kernel_pod["mtu"] == 1450  # the uplink's 1500 less VXLAN's 50


def test_pod_reaches_the_node_through_proxy_arp(node: Node) -> None:
    """The pod's default route via 169.254.1.1 works: the host veth answers ARP by proxy and the
    node routes back over the /32 route with Trellis' protocol (once the agent has put the pod's
    address in the anti-spoofing set: until then its packets are dropped)."""
    pod = node.new_pod()
    address = _add(node, pod)
    node.wait_programmed()
    ping = subprocess.run(
        ["ip", "netns", "exec", pod.netns, "ping", "-c", "1", "-W", "5", str(NODE_ADDRESS.ip)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert ping.returncode == 0, ping.stdout + ping.stderr
    (route,) = ip_json(node.netns, "route", "show", address)
    assert (route["dev"], route["protocol"]) == (host_veth_name(pod.attachment), str(ROUTE_PROTOCOL))


def test_del_twice_succeeds_and_frees_everything(node: Node) -> None:
    """DEL removes veth pair, route and allocation; a second DEL succeeds too."""
    pod = node.new_pod()
    _add(node, pod)
    node.runtime.delete(pod.container_id, pod.path)
    node.runtime.delete(pod.container_id, pod.path)
    assert node.allocations() == {} and node.host_veths() == set()
    assert ip_json(pod.netns, "link", "show", "type", "veth") == []


def test_del_after_the_netns_is_gone_succeeds(node: Node) -> None:
    """DEL of a pod whose namespace was already deleted succeeds and frees its address."""
    pod = node.new_pod()
    _add(node, pod)
    node.delete_netns(pod)
    node.runtime.delete(pod.container_id, pod.path)
    assert node.allocations() == {} and node.host_veths() == set()


BREAKAGES = {
    "pod address": ("pod", "addr del {address} dev eth0", "lacks address {ip}"),
    "pod default route": ("pod", "route del default", f"default route via {POD_GATEWAY} is missing"),
    "host route": ("node", "route del {address}", "route {address} dev trl"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_check_fails_once_the_pod_is_broken(node: Node, breakage: str) -> None:
    """CHECK passes on an intact pod and fails with code 101 naming what was removed."""
    pod = node.new_pod()
    address = _add(node, pod)
    node.runtime.check(pod.container_id, pod.path)
    where, command, words = BREAKAGES[breakage]
    run("ip", "-n", pod.netns if where == "pod" else node.netns, *command.format(address=address).split())
    with pytest.raises(PluginError) as info:
        node.runtime.check(pod.container_id, pod.path)
    assert info.value.code == 101
    assert words.format(address=address, ip=address.removesuffix("/32")) in info.value.msg, info.value.msg


@pytest.mark.parametrize("key", ["cni.dev/valid-attachments", "cni.dev/attachments"])
def test_gc_keeps_only_the_valid_attachments(node: Node, key: str) -> None:
    """GC, with the 1.1 key or the older one, frees every other allocation and host veth; the
    valid pod still passes CHECK."""
    keep, drop = node.new_pods(2)
    _add(node, keep)
    _add(node, drop)
    valid = [{"containerID": keep.container_id, "ifname": "eth0"}]
    inv = node.cni("GC", conf=net_conf(**{key: valid}))
    assert (inv.exit_code, inv.stdout) == (0, b"")
    assert list(node.allocations()) == [keep.attachment]
    assert node.host_veths() == {host_veth_name(keep.attachment)}
    node.runtime.check(keep.container_id, keep.path)


MISSING_NETNS = "/run/netns/trlt-does-not-exist"


@pytest.mark.parametrize(
    ("env", "conf", "code", "words"),
    [
        ({}, net_conf(cniVersion="0.2.0"), 1, "'0.2.0'"),
        ({"CNI_NETNS": OMIT}, net_conf(), 4, "CNI_NETNS"),
        ({"CNI_NETNS": MISSING_NETNS}, net_conf(), 4, MISSING_NETNS),
        ({"CNI_IFNAME": "eth0:1"}, net_conf(), 4, "CNI_IFNAME"),
        ({}, b"{not json", 6, "not JSON"),
        ({}, b"[" * 100_000, 6, "not JSON"),
        ({}, net_conf(mtu="big"), 7, "mtu 'big'"),
        ({}, net_conf(type="bridge"), 7, "type is 'bridge'"),
    ],
    ids=[
        "1-version",
        "4-missing-netns-var",
        "4-netns-gone",
        "4-ifname",
        "6-syntax",
        "6-too-deep",
        "7-mtu",
        "7-type",
    ],
)
def test_errors_come_back_with_their_code(
    node: Node, env: dict[str, str], conf: bytes, code: int, words: str
) -> None:
    """A bad ADD exits 1 with the spec's error object naming what is wrong, and leaks nothing."""
    pod = node.new_pod()
    inv = node.cni("ADD", pod, conf, **env)
    assert inv.exit_code == 1, inv.stdout + inv.stderr
    got_code, msg = cni_error(inv.stdout)
    assert got_code == code and words in msg, msg
    assert node.allocations() == {} and node.host_veths() == set()


def test_agent_gone_is_11_and_status_50(node: Node) -> None:
    """With the agent killed, ADD answers 11 (try again later) and STATUS 50; back up, STATUS is 0."""
    node.stop_agent(signal.SIGKILL)
    pod = node.new_pod()
    assert cni_error(node.cni("ADD", pod).stdout)[0] == 11
    assert cni_error(node.cni("STATUS").stdout)[0] == 50
    node.start_agent()
    assert node.cni("STATUS").exit_code == 0


def test_sigterm_stops_the_agent_cleanly_and_keeps_pods(node: Node) -> None:
    """SIGTERM ends the agent with status 0 and removes its socket; the pod keeps its network,
    and a new agent passes its CHECK and gives a repeated ADD the same address."""
    pod = node.new_pod()
    address = _add(node, pod)
    assert node.stop_agent(signal.SIGTERM) == 0
    assert not node.socket.exists()
    assert pod.addresses() == {address}
    node.start_agent()
    node.runtime.check(pod.container_id, pod.path)
    again = node.cni("ADD", pod)
    assert again.exit_code == 0 and json.loads(again.stdout)["ips"][0]["address"] == address
    assert pod.addresses() == {address}
