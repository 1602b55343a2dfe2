"""Kubernetes YAML for the lab: the Namespace, Pod, policy and BGP objects it understands, as values.

Why validate everything first: `lab apply -f` must either apply a file or refuse it whole,
as the API server refuses an invalid object, so the parser reads every document and checks
every field it uses before the lab changes anything. Errors name the file, the document
(counted from 1), the kind, the object and the field. Other kinds are refused by name.

Policies (NetworkPolicy, ClusterNetworkPolicy) are checked by the very parsers the agents use
(`model/k8s.py`): what the lab accepts, every agent can compute. They are kept as written
(apiVersion, kind, metadata, spec), the JSON the lab then stores as the API server would.
So are BGPConfiguration and BGPPeer (`trellis.dev/v1`), checked by `model/bgp.py`'s parsers and
stored under the key the parsed object names.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from trellis.lab.errors import LabError
from trellis.model.bgp import API_VERSION as BGP_API_VERSION
from trellis.model.bgp import BGPConfiguration, BGPPeer, parse_configuration, parse_peer
from trellis.model.k8s import (
    CLUSTER_NETWORK_POLICY_PREFIX,
    NETWORK_POLICY_PREFIX,
    InvalidObject,
    parse_cluster_network_policy,
    parse_network_policy,
)

DEFAULT_NAMESPACE = "default"
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
"""The label the API server sets on every Namespace to its name."""
PROTOCOLS = ("TCP", "UDP")
T = TypeVar("T")

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


class ManifestError(LabError):
    """A document the lab cannot apply; nothing of its file was applied."""


@dataclass(frozen=True, order=True)
class ContainerPort:
    port: int
    protocol: str
    name: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "containerPort": self.port, "protocol": self.protocol}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ContainerPort:
        return cls(int(data["containerPort"]), str(data["protocol"]), str(data.get("name", "")))

    def __str__(self) -> str:
        return f"{self.port}/{self.protocol}"


DEFAULT_PORTS = tuple(ContainerPort(port, proto) for port in (80, 81) for proto in PROTOCOLS)
"""What a pod that declares no ports listens on."""


@dataclass(frozen=True)
class NamespaceObject:
    name: str
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def effective_labels(self) -> dict[str, str]:
        """The labels with the one the API server adds."""
        return {**self.labels, NAMESPACE_NAME_LABEL: self.name}


@dataclass(frozen=True)
class PodObject:
    namespace: str
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    node_name: str | None = None
    """`spec.nodeName`; None lets the lab place the pod."""
    ports: tuple[ContainerPort, ...] = ()
    """Every container's declared ports, in order; empty means none declared."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def listen_ports(self) -> tuple[ContainerPort, ...]:
        return self.ports or DEFAULT_PORTS


@dataclass(frozen=True)
class PolicyObject:
    """A NetworkPolicy (namespaced) or ClusterNetworkPolicy (namespace None), valid for the agents."""

    kind: str
    namespace: str | None
    name: str
    body: dict[str, Any]
    """What the datastore holds: apiVersion, kind, metadata (name, namespace, labels) and spec."""

    @property
    def key(self) -> str:
        return self.name if self.namespace is None else f"{self.namespace}/{self.name}"

    @property
    def datastore_key(self) -> str:
        prefix = CLUSTER_NETWORK_POLICY_PREFIX if self.namespace is None else NETWORK_POLICY_PREFIX
        return prefix + self.key

    def __str__(self) -> str:
        """As kubectl names it in what it prints: `networkpolicy/x/deny`."""
        return f"{self.kind.lower()}/{self.key}"


@dataclass(frozen=True)
class BGPObject:
    """A BGPConfiguration or BGPPeer (cluster-wide), valid for the agents."""

    kind: str
    name: str
    body: dict[str, Any]
    """What the datastore holds: apiVersion, kind, metadata (name, labels) and spec."""
    datastore_key: str

    @property
    def key(self) -> str:
        return self.name

    def __str__(self) -> str:
        return f"{self.kind.lower()}/{self.name}"


StoredObject = PolicyObject | BGPObject
"""Objects the lab stores as written, for the agents to read."""
LabObject = NamespaceObject | PodObject | StoredObject


class _Document:
    """One YAML document being read; errors name the file, the document and the field."""

    def __init__(self, source: str, index: int, body: Mapping[str, Any]) -> None:
        self.where = f"{source}: document {index}"
        self.body = body

    def fail(self, message: str) -> ManifestError:
        return ManifestError(f"{self.where}: {message}")

    def get(self, path: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        """The value at dotted `path`, checked to be of `kind`; `default` when absent."""
        node: Any = self.body
        for part in path.split("."):
            if not isinstance(node, Mapping) or node.get(part) is None:
                return default
            node = node[part]
        if not isinstance(node, kind) or (isinstance(node, bool) and kind is int):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.fail(f"{path} must be {_article(names)}, got {node!r}")
        return node

    def name(self, path: str, pattern: re.Pattern[str], limit: int) -> str:
        value: str | None = self.get(path, str)
        if value is None:
            raise self.fail(f"{path} is required")
        if len(value) > limit or not pattern.match(value):
            raise self.fail(
                f"{path} {value!r} is not a valid name (lower-case letters, digits and '-', "
                f"at most {limit} characters)"
            )
        return value

    def labels(self) -> dict[str, str]:
        labels: Mapping[Any, Any] = self.get("metadata.labels", Mapping, {})
        out: dict[str, str] = {}
        for key, value in labels.items():
            if not isinstance(key, str) or not _valid_label_key(key):
                raise self.fail(f"metadata.labels: {key!r} is not a valid label key")
            if not isinstance(value, str):
                raise self.fail(f"metadata.labels.{key} must be a string, got {value!r} (quote it)")
            if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
                raise self.fail(f"metadata.labels.{key}: {value!r} is not a valid label value")
            out[key] = value
        return out


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _valid_label_key(key: str) -> bool:
    prefix, slash, name = key.rpartition("/")
    if slash and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return False
    return len(name) <= 63 and bool(_LABEL_NAME.match(name))


def _namespace(doc: _Document) -> NamespaceObject:
    return NamespaceObject(doc.name("metadata.name", _DNS_LABEL, 63), doc.labels())


def _ports(doc: _Document) -> tuple[ContainerPort, ...]:
    ports: list[ContainerPort] = []
    containers: list[Any] = doc.get("spec.containers", list, [])
    for i, container in enumerate(containers):
        if not isinstance(container, Mapping):
            raise doc.fail(f"spec.containers[{i}] must be a mapping")
        declared = container.get("ports") or []
        if not isinstance(declared, list):
            raise doc.fail(f"spec.containers[{i}].ports must be a list")
        for j, item in enumerate(declared):
            ports.append(_port(doc, f"spec.containers[{i}].ports[{j}]", item))
    seen: set[tuple[int, str]] = set()
    for port in ports:
        if (port.port, port.protocol) in seen:
            raise doc.fail(f"port {port} is declared twice")
        seen.add((port.port, port.protocol))
    return tuple(ports)


def _port(doc: _Document, where: str, item: Any) -> ContainerPort:
    if not isinstance(item, Mapping):
        raise doc.fail(f"{where} must be a mapping")
    number = item.get("containerPort")
    if not isinstance(number, int) or isinstance(number, bool) or not 1 <= number <= 65535:
        raise doc.fail(f"{where}.containerPort must be an integer in 1..65535, got {number!r}")
    protocol = item.get("protocol", "TCP")
    if protocol not in PROTOCOLS:
        raise doc.fail(f"{where}.protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    name = item.get("name", "")
    if not isinstance(name, str) or (name and (len(name) > 15 or not _PORT_NAME.match(name))):
        raise doc.fail(f"{where}.name {name!r} is not a valid port name (at most 15 characters)")
    return ContainerPort(number, protocol, name)


def _object_namespace(doc: _Document) -> str:
    namespace: str = doc.get("metadata.namespace", str, DEFAULT_NAMESPACE)
    if len(namespace) > 63 or not _DNS_LABEL.match(namespace):
        raise doc.fail(f"metadata.namespace {namespace!r} is not a valid namespace name")
    return namespace


def _pod(doc: _Document) -> PodObject:
    return PodObject(
        namespace=_object_namespace(doc),
        name=doc.name("metadata.name", _DNS_SUBDOMAIN, 253),
        labels=doc.labels(),
        node_name=doc.get("spec.nodeName", str),
        ports=_ports(doc),
    )


def _written(doc: _Document, name: str, namespace: str | None) -> dict[str, Any]:
    """The object as the API server would store it: apiVersion, kind, metadata (name, namespace,
    labels) and spec."""
    metadata: dict[str, Any] = {"name": name, **({"namespace": namespace} if namespace else {})}
    labels = doc.labels()
    if labels:
        metadata["labels"] = labels
    body = {"apiVersion": doc.body["apiVersion"], "kind": doc.body["kind"], "metadata": metadata}
    if "spec" in doc.body:
        body["spec"] = doc.body["spec"]
    return body


def _checked(doc: _Document, body: dict[str, Any], check: Callable[[Any], T]) -> T:
    """What the agents' own parser makes of `body`; its error names the document."""
    try:
        return check(body)
    except InvalidObject as err:
        raise doc.fail(str(err)) from None


def _policy(doc: _Document, namespaced: bool, check: Callable[[Any], object]) -> PolicyObject:
    """A policy object as written, once the agents' own parser accepts it."""
    namespace = _object_namespace(doc) if namespaced else None
    name = doc.name("metadata.name", _DNS_SUBDOMAIN, 253)
    body = _written(doc, name, namespace)
    _checked(doc, body, check)
    return PolicyObject(doc.body["kind"], namespace, name, body)


def _bgp(doc: _Document, check: Callable[[Any], BGPConfiguration | BGPPeer]) -> BGPObject:
    """A BGP object as written, once the agents' own parser accepts it; stored under its key."""
    name = doc.name("metadata.name", _DNS_SUBDOMAIN, 253)
    body = _written(doc, name, None)
    return BGPObject(doc.body["kind"], name, body, _checked(doc, body, check).key)


def _network_policy(doc: _Document) -> PolicyObject:
    return _policy(doc, True, parse_network_policy)


def _cluster_network_policy(doc: _Document) -> PolicyObject:
    return _policy(doc, False, parse_cluster_network_policy)


_KINDS: dict[str, tuple[str, Callable[[_Document], LabObject]]] = {
    "Namespace": ("v1", _namespace),
    "Pod": ("v1", _pod),
    "NetworkPolicy": ("networking.k8s.io/v1", _network_policy),
    "ClusterNetworkPolicy": ("policy.networking.k8s.io/v1beta1", _cluster_network_policy),
    "BGPConfiguration": (BGP_API_VERSION, lambda doc: _bgp(doc, parse_configuration)),
    "BGPPeer": (BGP_API_VERSION, lambda doc: _bgp(doc, parse_peer)),
}


def parse(text: str, source: str) -> list[LabObject]:
    """Every object of a multi-document YAML text, in order; raises ManifestError naming the fault."""
    try:
        bodies = list(yaml.safe_load_all(text))
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ManifestError(f"{source}: invalid YAML{where}: {err.problem}") from None
    except yaml.YAMLError as err:
        raise ManifestError(f"{source}: invalid YAML: {err}") from None
    objects: list[LabObject] = []
    seen: dict[tuple[str, str], int] = {}
    for index, body in enumerate(bodies, start=1):
        if body is None:
            continue
        if not isinstance(body, Mapping):
            raise ManifestError(f"{source}: document {index}: not a mapping (a Kubernetes object)")
        doc = _Document(source, index, body)
        kind = body.get("kind")
        if kind not in _KINDS:
            supported = ", ".join(_KINDS)
            raise doc.fail(f"kind {kind!r} is not supported by the lab (supported: {supported})")
        api_version, read = _KINDS[kind]
        if body.get("apiVersion") != api_version:
            raise doc.fail(f"{kind} needs apiVersion {api_version}, got {body.get('apiVersion')!r}")
        obj = read(doc)
        ident = (kind, obj.name if isinstance(obj, NamespaceObject) else obj.key)
        if ident in seen:
            raise doc.fail(f"{kind} {ident[1]} is already defined in document {seen[ident]}")
        seen[ident] = index
        objects.append(obj)
    return objects
