"""The lab's manifest parser: what it reads from Kubernetes YAML, and what it refuses, whole (no root)."""

from __future__ import annotations

import pytest

from trellis.lab.manifest import (
    DEFAULT_PORTS,
    NAMESPACE_NAME_LABEL,
    ContainerPort,
    ManifestError,
    NamespaceObject,
    PodObject,
    PolicyObject,
    parse,
)

MANIFEST = """\
apiVersion: v1
kind: Namespace
metadata:
  name: x
  labels: {team: red}
---
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: x, labels: {app: web, example.com/tier: "1"}}
spec:
  nodeName: node-2
  containers:
  - name: main
    ports:
    - {name: http, containerPort: 8080}
    - {containerPort: 53, protocol: UDP}
  - name: side
    ports: [{containerPort: 9090, protocol: TCP}]
---
apiVersion: v1
kind: Pod
metadata: {name: b}
"""


def test_reads_namespaces_and_pods_in_order() -> None:
    ns, a, b = parse(MANIFEST, "m.yaml")
    assert ns == NamespaceObject("x", {"team": "red"})
    assert a == PodObject(
        namespace="x",
        name="a",
        labels={"app": "web", "example.com/tier": "1"},
        node_name="node-2",
        ports=(ContainerPort(8080, "TCP", "http"), ContainerPort(53, "UDP"), ContainerPort(9090, "TCP")),
    )
    assert b == PodObject("default", "b")


def test_a_pod_without_ports_listens_on_80_and_81_tcp_and_udp() -> None:
    (pod,) = parse("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n", "m")
    assert isinstance(pod, PodObject)
    assert pod.ports == ()
    assert sorted(map(str, pod.listen_ports)) == ["80/TCP", "80/UDP", "81/TCP", "81/UDP"]
    assert pod.listen_ports == DEFAULT_PORTS


def test_a_namespace_gets_its_name_label_as_the_api_server_sets_it() -> None:
    ns = NamespaceObject("x", {"team": "red", NAMESPACE_NAME_LABEL: "forged"})
    assert ns.effective_labels == {"team": "red", NAMESPACE_NAME_LABEL: "x"}


def test_port_round_trips_through_json() -> None:
    port = ContainerPort(53, "UDP", "dns")
    assert ContainerPort.from_json(port.to_json()) == port


POD = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            POD + "---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n",
            "m.yaml: document 2: kind 'Deployment' is not supported by the lab "
            "(supported: Namespace, Pod, NetworkPolicy, ClusterNetworkPolicy, BGPConfiguration, BGPPeer)",
        ),
        ("kind: Pod\nmetadata: {name: p\n", "m.yaml: invalid YAML at line 3, column 1"),
        ("- just\n- a list\n", "m.yaml: document 1: not a mapping"),
        ("apiVersion: v2\nkind: Pod\nmetadata: {name: p}\n", "document 1: Pod needs apiVersion v1, got 'v2'"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {}\n", "document 1: metadata.name is required"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: Big}\n", "metadata.name 'Big' is not a valid name"),
        ("apiVersion: v1\nkind: Namespace\nmetadata: {name: a.b}\n", "metadata.name 'a.b' is not a valid"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: X}\n", "metadata.namespace 'X' is not"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {tier: 1}}\n", "must be a string, got 1"),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p, labels: {'-x': a}}\n",
            "'-x' is not a valid label key",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {nodeName: 3}\n",
            "spec.nodeName must be a str",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
            "spec: {containers: [{ports: [{containerPort: 0}]}]}\n",
            "spec.containers[0].ports[0].containerPort must be an integer in 1..65535, got 0",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
            "spec: {containers: [{ports: [{containerPort: 5, protocol: SCTP}]}]}\n",
            "protocol must be one of TCP, UDP, got 'SCTP'",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
            "spec: {containers: [{ports: [{containerPort: 5}]}, {ports: [{containerPort: 5}]}]}\n",
            "port 5/TCP is declared twice",
        ),
        (POD + "---\n" + POD, "document 2: Pod default/p is already defined in document 1"),
    ],
)
def test_refuses_with_one_line_naming_file_document_and_field(text: str, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse(text, "m.yaml")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


POLICIES = """\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny}
spec: {podSelector: {}, ingress: []}
---
apiVersion: policy.networking.k8s.io/v1beta1
kind: ClusterNetworkPolicy
metadata: {name: no-y, namespace: ignored, labels: {team: sec}}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  ingress: [{action: Deny, from: [{namespaces: {matchLabels: {ns: y}}}]}]
"""


def test_reads_policies_as_written_and_keys_them_as_the_datastore_does() -> None:
    network, cluster = parse(POLICIES, "p.yaml")
    assert isinstance(network, PolicyObject) and isinstance(cluster, PolicyObject)
    assert (str(network), network.datastore_key) == (
        "networkpolicy/default/deny",
        "/trellis/k8s/networkpolicies/default/deny",
    )
    assert network.body == {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "deny", "namespace": "default"},
        "spec": {"podSelector": {}, "ingress": []},
    }
    assert (str(cluster), cluster.datastore_key) == (
        "clusternetworkpolicy/no-y",
        "/trellis/k8s/clusternetworkpolicies/no-y",
    )
    assert cluster.body["metadata"] == {"name": "no-y", "labels": {"team": "sec"}}, "cluster-scoped"


NP = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: x}\n"
CNP = "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\nmetadata: {name: c}\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            POD + "---\n" + NP + "spec: {podSelector: {}, ingress: [{from: [{}]}]}\n",
            "m.yaml: document 2: NetworkPolicy x/p: spec.ingress[0].from[0]: must specify a peer",
        ),
        (NP, "m.yaml: document 1: NetworkPolicy x/p: spec: required"),
        (
            NP + "spec: {podSelector: {}, policyTypes: [Sideways]}\n",
            "document 1: NetworkPolicy x/p: spec.policyTypes[0]: 'Sideways' is not one of Ingress, Egress",
        ),
        (
            CNP + "spec: {tier: Admin, priority: 1001, subject: {namespaces: {}}}\n",
            "document 1: ClusterNetworkPolicy c: spec.priority: 1001 is not in 0..1000",
        ),
        (
            "apiVersion: networking.k8s.io/v1beta1\nkind: NetworkPolicy\nmetadata: {name: p}\n",
            "NetworkPolicy needs apiVersion networking.k8s.io/v1, got 'networking.k8s.io/v1beta1'",
        ),
    ],
)
def test_refuses_invalid_policies_naming_document_kind_name_and_field(text: str, message: str) -> None:
    with pytest.raises(ManifestError) as caught:
        parse(text, "m.yaml")
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_empty_documents_are_skipped() -> None:
    assert parse("---\n---\n", "m") == []


def test_bgp_objects_are_checked_by_the_agents_parsers_and_keyed_by_kind() -> None:
    from trellis.lab.manifest import BGPObject

    text = (
        "apiVersion: trellis.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\n"
        "spec: {nodeToNodeMeshEnabled: false}\n---\n"
        "apiVersion: trellis.dev/v1\nkind: BGPPeer\nmetadata: {name: tor}\n"
        "spec: {peerIP: 172.31.0.2, asNumber: 65000}\n"
    )
    config, peer = parse(text, "f.yaml")
    assert isinstance(config, BGPObject) and isinstance(peer, BGPObject)
    assert config.datastore_key == "/trellis/bgp/configurations/default"
    assert peer.datastore_key == "/trellis/bgp/peers/tor"
    assert str(peer) == "bgppeer/tor"
    assert peer.body["spec"] == {"peerIP": "172.31.0.2", "asNumber": 65000}
    with pytest.raises(ManifestError, match=r"document 1: BGPPeer tor: spec\.asNumber"):
        parse(text.split("---\n")[1].replace("65000", "0"), "f.yaml")
    with pytest.raises(ManifestError, match=r"needs apiVersion trellis\.dev/v1"):
        parse(text.replace("trellis.dev/v1", "v1"), "f.yaml")


def test_route_reflector_topology_selects_one_reflector_then_two_from_four_nodes() -> None:
    import ipaddress

    from trellis.lab.bgp import topology_objects
    from trellis.lab.state import Node
    from trellis.model.bgp import parse_configuration

    def nodes(count: int) -> list[Node]:
        return [
            Node(f"node-{k}", f"n{k}", k, ipaddress.IPv4Interface(f"172.31.0.{10 + k}/24"))
            for k in range(1, count + 1)
        ]

    assert topology_objects("mesh", nodes(3)) == []
    for count, reflectors in ((3, {"node-1"}), (4, {"node-1", "node-2"})):
        ((key, body),) = topology_objects("rr", nodes(count))
        config = parse_configuration(body)
        assert key == "/trellis/bgp/configurations/default" and not config.mesh
        assert config.route_reflectors is not None and config.route_reflectors.nodes == reflectors
