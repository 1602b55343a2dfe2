"""deploy/: every manifest valid for the API server, wired to the real CLI, and its init step run
on a scratch root as the init container runs it (no root, no cluster).

kubectl and the API server cannot run here, so each document is checked against the
Kubernetes OpenAPI schemas that kubernetes-validate ships (strict: an unknown field fails, as
`kubectl apply --validate=strict` does), and the containers' command lines are expanded as the
kubelet does (`$(VAR)` from their env, ConfigMap keys and the downward API) and parsed by the
real `trellis` parser. Running the agent itself needs a cluster.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from tests.unit.test_metrics import base_url, get
from trellis.agent.http import NOT_FOLLOWING, serving
from trellis.agent.metrics import AgentMetrics
from trellis.cli.main import build_parser
from trellis.cni import client
from trellis.cni.install import CONFLIST_NAME, MODULE_DIR, MODULE_NAME, NETWORK_NAME, PLUGIN_NAME
from trellis.datastore.kube_resources import GROUP, RESOURCES, Resource, resources_under
from trellis.model.k8s import K8S_PREFIX

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KUBERNETES_VERSIONS = ("1.30", kubernetes_validate.latest_version())
"""The oldest Kubernetes the manifests target, and the newest kubernetes-validate knows."""
EXAMPLE_NODE = "node-1"
"""What the downward API's `spec.nodeName` stands for when command lines are expanded."""
TRELLIS = Path(sys.executable).with_name("trellis")
"""The `trellis` console script of this environment: the image's `command: [trellis]`."""
VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
READ_VERBS = ("get", "list", "watch")
"""RBAC verbs of the datastore's reads: GET of an object, of a collection, and with watch=true."""
WRITE_VERBS = ("create", "update", "delete")
"""RBAC verbs of its writes: POST, PUT and DELETE."""
HOST_PATH_FLAGS = ("--bin-dir", "--conf-dir")
"""install-cni flags naming host directories; a scratch-root run moves them under the root."""
KUBE_SYNC = "kube-sync.yaml"
"""kube-sync, for clusters whose datastore is etcd alone, applied after trellis.yaml."""

Manifest = dict[str, Any]


def _documents() -> list[tuple[str, Manifest]]:
    """(file name, object) for every non-empty YAML document under deploy/, in apply order."""
    return [
        (path.name, doc)
        for path in sorted(DEPLOY.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


DOCUMENTS = _documents()


def _kind(kind: str) -> list[Manifest]:
    return [doc for _, doc in DOCUMENTS if doc["kind"] == kind]


def _one(kind: str, file: str = "trellis.yaml") -> Manifest:
    """The single object of `kind` in deploy/`file`."""
    found = [doc for name, doc in DOCUMENTS if name == file and doc["kind"] == kind]
    assert len(found) == 1, f"deploy/{file} holds {len(found)} objects of kind {kind}, not one"
    return found[0]


def _pod_spec() -> Manifest:
    spec: Manifest = _one("DaemonSet")["spec"]["template"]["spec"]
    return spec


def _containers() -> list[Manifest]:
    """The DaemonSet's init containers and containers."""
    spec = _pod_spec()
    containers: list[Manifest] = spec["initContainers"] + spec["containers"]
    return containers


def _container(name: str) -> Manifest:
    """The DaemonSet's container or init container `name`."""
    found = [c for c in _containers() if c["name"] == name]
    assert len(found) == 1, f"DaemonSet: {len(found)} containers named {name}"
    return found[0]


def _env(container: Manifest) -> dict[str, str]:
    """The container's environment as the kubelet builds it (values, ConfigMap keys, nodeName)."""
    config = _one("ConfigMap")
    values: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            values[var["name"]] = var["value"]
        elif "configMapKeyRef" in var["valueFrom"]:
            ref = var["valueFrom"]["configMapKeyRef"]
            assert ref["name"] == config["metadata"]["name"], f"{var['name']}: no ConfigMap {ref['name']}"
            assert ref["key"] in config["data"], f"{var['name']}: ConfigMap lacks key {ref['key']}"
            values[var["name"]] = config["data"][ref["key"]]
        else:
            assert var["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, var
            values[var["name"]] = EXAMPLE_NODE
    return values


def _argv(container: Manifest) -> list[str]:
    """The container's arguments after `trellis`, with every `$(VAR)` expanded; an undefined
    variable fails (the kubelet would pass it through literally)."""
    assert container["command"] == ["trellis"], f"{container['name']}: command is not the trellis CLI"
    env = _env(container)

    def value(match: re.Match[str]) -> str:
        assert match[1] in env, f"{container['name']}: $({match[1]}) is not in its env"
        return env[match[1]]

    return [VARIABLE.sub(value, arg) for arg in container["args"]]


def _flag(argv: list[str], name: str) -> str:
    """The value of `--name=value` in `argv`."""
    values = [arg.split("=", 1)[1] for arg in argv if arg.startswith(f"{name}=")]
    assert len(values) == 1, f"{name} given {len(values)} times in {argv}"
    return values[0]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize(
    "doc",
    [doc for _, doc in DOCUMENTS],
    ids=[f"{f}:{d['kind']}/{d['metadata']['name']}" for f, d in DOCUMENTS],
)
def test_every_document_is_valid_for_the_api_server(doc: Manifest, version: str) -> None:
    """Each object validates, strictly, against that Kubernetes version's OpenAPI schema."""
    kubernetes_validate.validate(doc, version, strict=True)


def test_strict_validation_refuses_a_misspelt_field_deep_in_the_pod_template() -> None:
    """The control for the test above: one misspelt probe field fails the DaemonSet."""
    daemonset = copy.deepcopy(_one("DaemonSet"))
    daemonset["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["hots"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError, match="'hots' was unexpected"):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSIONS[0], strict=True)


def test_files_apply_in_order_and_name_one_namespace() -> None:
    """CRDs come before the objects that use them, the Namespace first in trellis.yaml (kube-sync's
    file, applied after it, uses it too), and every namespaced object is in that Namespace."""
    assert sorted({name for name, _ in DOCUMENTS}) == ["crds.yaml", KUBE_SYNC, "trellis.yaml"]
    kinds = [doc["kind"] for name, doc in DOCUMENTS if name == "trellis.yaml"]
    assert kinds[0] == "Namespace"
    namespace = _one("Namespace")["metadata"]["name"]
    namespaced = [doc for _, doc in DOCUMENTS if "namespace" in doc["metadata"]]
    assert {doc["metadata"]["namespace"] for doc in namespaced} == {namespace}
    assert {doc["kind"] for doc in namespaced} == {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ConfigMap",
        "DaemonSet",
        "Deployment",
    }


def test_agent_args_parse_and_carry_every_configmap_setting() -> None:
    """The agent's command line, expanded, is one `trellis agent` accepts, with the ConfigMap's values."""
    data = _one("ConfigMap")["data"]
    args = build_parser().parse_args(_argv(_container("agent")))
    assert args.command == "agent" and args.node == EXAMPLE_NODE
    assert (args.log_level, args.datastore, args.datastore_location) == (
        data["log-level"],
        data["datastore"],
        data["datastore-location"],
    )
    assert args.pool == [ipaddress.IPv4Network(data["pool"])]
    assert (args.block_size, args.backend, args.mtu, args.policy) == (
        int(data["block-size"]),
        data["backend"],
        int(data["mtu"]),
        data["policy"],
    )
    assert args.http_address == data["http-address"]


def test_install_cni_args_parse_for_the_agents_socket() -> None:
    """The init step's command line parses, and its plugin talks to the socket the agent serves."""
    init = build_parser().parse_args(_argv(_container("install-cni")))
    agent = build_parser().parse_args(_argv(_container("agent")))
    assert init.command == "install-cni"
    assert init.socket == agent.socket
    assert init.mtu == agent.mtu and init.cni_version == _one("ConfigMap")["data"]["cni-version"]


def test_every_configmap_key_is_read() -> None:
    """No setting in the ConfigMap is silently ignored: a container's env reads each key."""
    read = {
        var["valueFrom"]["configMapKeyRef"]["key"]
        for container in _containers()
        for var in container.get("env", [])
        if "configMapKeyRef" in var.get("valueFrom", {})
    }
    assert read == set(_one("ConfigMap")["data"])


def test_probes_ask_the_agents_default_http_address() -> None:
    """Liveness and readiness go to the address the agent listens on by default, on the host's
    loopback (hostNetwork), at /healthz and /readyz."""
    default = build_parser().parse_args(["agent"]).http_address
    host, port = default.rsplit(":", 1)
    agent = _container("agent")
    probes = {kind: agent[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes == {
        "livenessProbe": {"host": host, "port": int(port), "path": "/healthz"},
        "readinessProbe": {"host": host, "port": int(port), "path": "/readyz"},
    }
    assert _one("ConfigMap")["data"]["http-address"] == default
    assert [p["containerPort"] for p in agent["ports"]] == [int(port)]


def test_the_agents_http_server_answers_both_probe_paths() -> None:
    """The real endpoint (on a free loopback port) serves each probe's path: liveness 200, and
    readiness 503 naming why while the agent follows no datastore; an unknown path is 404."""
    agent = _container("agent")
    paths = [agent[kind]["httpGet"]["path"] for kind in ("livenessProbe", "readinessProbe")]
    with serving(("127.0.0.1", 0), AgentMetrics(), None) as server:
        base = base_url(server)
        assert [get(base + path)[::2] for path in [*paths, "/nowhere"]] == [
            (200, "ok\n"),
            (503, NOT_FOLLOWING + "\n"),
            (404, "not found: try /metrics, /healthz or /readyz\n"),
        ]


def test_host_directories_are_mounted_at_their_own_paths() -> None:
    """install-cni writes absolute paths into the plugin (its code directory, the socket), and
    the runtime reads them on the host: each host directory appears at the same path inside,
    and the directories install-cni writes and the agent's socket are among them."""
    spec = _pod_spec()
    host_paths = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounts = {
        (container["name"], m["mountPath"]): host_paths[m["name"]]
        for container in _containers()
        for m in container["volumeMounts"]
    }
    assert all(inside == host for (_, inside), host in mounts.items()), mounts
    init, agent = _argv(_container("install-cni")), _argv(_container("agent"))
    for flag in HOST_PATH_FLAGS:
        assert ("install-cni", _flag(init, flag)) in mounts
    assert ("agent", str(Path(_flag(agent, "--socket")).parent)) in mounts
    assert ("agent", _flag(agent, "--state-dir")) in mounts


def test_daemonset_runs_on_every_node_and_upgrades_one_at_a_time() -> None:
    """Every taint tolerated, host network, node-critical priority, and a rolling update of one
    node at a time (never two agents on one node: no surge)."""
    daemonset = _one("DaemonSet")
    spec = _pod_spec()
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert spec["hostNetwork"] is True and spec["priorityClassName"] == "system-node-critical"
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert daemonset["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize(
    ("file", "workload", "binding_kind", "role_kind"),
    [
        ("trellis.yaml", "DaemonSet", "ClusterRoleBinding", "ClusterRole"),
        ("trellis.yaml", "DaemonSet", "RoleBinding", "Role"),
        (KUBE_SYNC, "Deployment", "ClusterRoleBinding", "ClusterRole"),
    ],
)
def test_each_workload_runs_as_the_bound_service_account(
    file: str, workload: str, binding_kind: str, role_kind: str
) -> None:
    """The workload's ServiceAccount, in its file, is the one each binding grants its role to."""
    account, binding, role = _one("ServiceAccount", file), _one(binding_kind, file), _one(role_kind, file)
    pod_spec = _one(workload, file)["spec"]["template"]["spec"]
    assert pod_spec["serviceAccountName"] == account["metadata"]["name"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": role_kind,
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": account["metadata"]["namespace"],
        }
    ]


def _grants(role: Manifest) -> dict[tuple[str, str], set[str]]:
    """(API group, resource) -> verbs a Role or ClusterRole grants; wildcards and narrowing by
    name are refused, as least privilege lists every grant."""
    grants: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, f"{rule}: not a plain rule"
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], f"{rule}: a wildcard"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                grants.setdefault((group, resource), set()).update(rule["verbs"])
    return grants


def _group(resource: Resource) -> str:
    return resource.api_version.rpartition("/")[0]


def test_the_cluster_role_grants_exactly_what_the_kubernetes_datastore_asks() -> None:
    """Every resource of the datastore's table is readable (GET of an object, a list, a watch),
    Trellis' own are writable too (POST, PUT, DELETE: it never patches), and nothing else is."""
    expected = {
        (_group(r), r.plural): set(READ_VERBS) | (set(WRITE_VERBS) if r.trellis_owned else set())
        for r in RESOURCES
    }
    assert _grants(_one("ClusterRole")) == expected


def test_the_role_grants_the_datastores_leases_in_the_agents_namespace() -> None:
    """Leases (kube_leases: get, a list by label, create, renew and unfinalize by update, delete)
    live in the namespace of the agent's service account, so a Role there is enough."""
    role = _one("Role")
    assert role["metadata"]["namespace"] == _one("DaemonSet")["metadata"]["namespace"]
    assert _grants(role) == {("coordination.k8s.io", "leases"): {"get", "list", "create", "update", "delete"}}


def _kube_sync() -> Manifest:
    """kube-sync's one container."""
    containers: list[Manifest] = _one("Deployment", KUBE_SYNC)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{KUBE_SYNC}: {len(containers)} containers"
    return containers[0]


def test_kube_sync_args_parse_and_name_the_agents_etcd() -> None:
    """kube-sync's command line, expanded, is one `trellis kube-sync` accepts: the in-cluster
    service account as the source, and the agents' datastore location as its etcd."""
    data = _one("ConfigMap")["data"]
    args = build_parser().parse_args(_argv(_kube_sync()))
    assert (args.command, args.kubeconfig, args.datastore) == ("kube-sync", "", "etcd")
    assert (args.datastore_location, args.log_level) == (data["datastore-location"], data["log-level"])


def test_kube_sync_is_one_replica_replaced_by_recreation_on_the_host_network() -> None:
    """No leader election, so one replica that a rollout stops before starting the next; on the
    host network, as its own Pod object is only in etcd once it runs."""
    deployment = _one("Deployment", KUBE_SYNC)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert deployment["spec"]["template"]["spec"]["hostNetwork"] is True
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_kube_sync_reads_exactly_the_kinds_it_copies() -> None:
    """Its ClusterRole grants get, list and watch on the resources under `/trellis/k8s/` of the
    datastore's table (what kube-sync follows) and nothing else: no Role, so no Leases."""
    expected = {(_group(r), r.plural): set(READ_VERBS) for r in resources_under(K8S_PREFIX)}
    assert _grants(_one("ClusterRole", KUBE_SYNC)) == expected
    assert {doc["kind"] for name, doc in DOCUMENTS if name == KUBE_SYNC} == {
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
    }


def test_the_crds_define_the_trellis_resources_of_the_datastore() -> None:
    """deploy/crds.yaml defines exactly the resources of Trellis' API group that the datastore's
    table names, with the table's kind and scope, served at its version."""
    defined = {
        (crd["spec"]["group"], crd["spec"]["names"]["plural"]): (
            crd["spec"]["names"]["kind"],
            crd["spec"]["scope"],
            [v["name"] for v in crd["spec"]["versions"] if v["served"]],
        )
        for crd in _kind("CustomResourceDefinition")
    }
    expected = {
        (GROUP, r.plural): (
            r.kind,
            "Namespaced" if r.namespaced else "Cluster",
            [r.api_version.split("/")[1]],
        )
        for r in RESOURCES
        if _group(r) == GROUP
    }
    assert defined == expected


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every file under `root` by relative path, with its bytes (None for byte-code, which
    records the source's modification time)."""
    return {
        str(path.relative_to(root)): None if path.suffix == ".pyc" else path.read_bytes()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _run_on_root(argv: list[str], root: Path) -> None:
    """Run `trellis ARGV` with its host directories moved under `root`, as the init container does."""
    rooted = [
        f"{flag}={root}{value}" if flag in HOST_PATH_FLAGS else arg
        for arg in argv
        for flag, _, value in [arg.partition("=")]
    ]
    proc = subprocess.run([str(TRELLIS), *rooted], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_init_container_installs_a_working_plugin_on_a_scratch_root(tmp_path: Path) -> None:
    """The init container's own command line, run by the real CLI with its host directories under
    a scratch root: the plugin and conflist land there, a second run (every agent restart)
    changes nothing, and the plugin, exec'd as a runtime does, answers VERSION with the
    conflist's cniVersion among those it supports (libcni refuses the network otherwise)."""
    argv = _argv(_container("install-cni"))
    _run_on_root(argv, tmp_path)
    installed = _tree(tmp_path)
    bin_dir = Path(f"{tmp_path}{_flag(argv, '--bin-dir')}")
    conf = Path(f"{tmp_path}{_flag(argv, '--conf-dir')}") / CONFLIST_NAME
    plugin = bin_dir / PLUGIN_NAME
    assert {path.parent for path in tmp_path.rglob("*") if path.is_file()} == {
        bin_dir,
        bin_dir / MODULE_DIR,
        bin_dir / MODULE_DIR / "__pycache__",
        conf.parent,
    }
    assert os.access(plugin, os.X_OK)
    network = json.loads(conf.read_text())
    assert (network["name"], network["cniVersion"]) == (NETWORK_NAME, _flag(argv, "--cni-version"))
    assert [p["type"] for p in network["plugins"]] == [PLUGIN_NAME]
    socket_line = f"AGENT_SOCKET = {json.dumps(_flag(argv, '--socket'))}"
    assert socket_line in (bin_dir / MODULE_DIR / f"{MODULE_NAME}.py").read_text()

    _run_on_root(argv, tmp_path)
    assert _tree(tmp_path) == installed

    proc = subprocess.run(
        [str(plugin)], env={"CNI_COMMAND": "VERSION"}, input=b"", capture_output=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    version = json.loads(proc.stdout)
    assert version["supportedVersions"] == list(client.SUPPORTED_VERSIONS)
    assert network["cniVersion"] in version["supportedVersions"]
