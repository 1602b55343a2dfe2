"""Chaining: Trellis first, then Debian's reference portmap and bandwidth, prevResult flowing."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.privileged.nodes import Node, ip_json, run
from trellis.cni.install import install
from trellis.model.naming import host_veth_name

pytestmark = pytest.mark.privileged

CAPABILITIES: dict[str, Any] = {
    "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
    "bandwidth": {
        "ingressRate": 1_000_000,
        "ingressBurst": 100_000,
        "egressRate": 1_000_000,
        "egressBurst": 100_000,
    },
}


def _ifbs(node: Node) -> list[str]:
    """bandwidth's egress devices in the node namespace."""
    return [link["ifname"] for link in ip_json(node.netns, "link", "show", "type", "ifb")]


def test_portmap_and_bandwidth_chain_after_trellis(node: Node) -> None:
    """ADD runs trellis, portmap, bandwidth with runtime capabilities: portmap's DNAT to the pod's
    address appears in the node's iptables, bandwidth's tbf qdisc on the host veth; DEL in reverse
    removes them, with the veth and bandwidth's ifb device."""
    _, conflist = install(node.bin_dir, node.dir / "chain.d", node.socket, chain=True, version="1.0.0")
    with node.runtime_for(conflist) as runtime:
        pod = node.new_pod()
        host = host_veth_name(pod.attachment)

        result = runtime.add(pod.container_id, pod.path, capabilities=CAPABILITIES)
        assert [i["name"] for i in result["interfaces"][:2]] == [host, "eth0"]  # trellis's, passed along
        address = str(result["ips"][0]["address"]).removesuffix("/32")
        assert f"--dport 8080 -j DNAT --to-destination {address}:80" in node.exec_in_node(
            "iptables", "-t", "nat", "-S"
        )
        qdiscs = json.loads(run("tc", "-n", node.netns, "-j", "qdisc", "show", "dev", host))
        assert {"tbf", "ingress"} <= {q["kind"] for q in qdiscs}
        assert len(_ifbs(node)) == 1

        runtime.delete(pod.container_id, pod.path, capabilities=CAPABILITIES)
        nat = node.exec_in_node("iptables", "-t", "nat", "-S")
        assert address not in nat and "CNI-DN-" not in nat
        assert node.host_veths() == set() and node.allocations() == {}
        assert _ifbs(node) == []
