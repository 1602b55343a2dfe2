"""Policy at scale: 1,000 pods and 1,000 policies, from apply to enforcement, and the cost to traffic.

What it measures, on a synthetic cluster (20 namespaces; 1,000 pods labelled app, tier, team and
version, with named container ports; 1,000 NetworkPolicies of the kinds real clusters hold: app
selectors, namespace+pod peers, ports by number, by range and by name, ipBlocks with exceptions,
egress to databases, DNS and the internet, namespace-wide rules; plus five
ClusterNetworkPolicies in both tiers), its pods spread over three nodes:
1. compute: what one node's agent does after every change, two ways, on the same changes
   (several one-policy changes: edit, add, delete; and pod ADDs on the node, what every CNI ADD
   costs the agent at this scale). `replace`: as the agent did before it kept memory, every
   object parsed (`read_policy_inputs`), every one of its ~333 local endpoints computed
   (`compute_policy`) and rendered (`render_table`), the batch compared with the last one.
   `update`: as the agent does now, with `PolicyReader`, `PolicyCalculator` and `TableRenderer`
   kept from pass to pass (only what a change can alter is parsed, computed and rendered again)
   and `update_commands` from the table it last programmed. Plus the whole table's batch.
2. kernel apply: each batch through libnftables in process, as the agent does, into a
   throwaway node namespace: the whole table for `replace`, the update (from the whole
   cluster's table, undone after) for `update`; and reading the counters, what a replace does
   first (the agent's 30-second resync replaces only when someone else changed nftables).
   "Apply to enforcement" is the agent's coalescing wait + read + compute + render + compare +
   apply on one node; the nodes work in parallel, so one node's time is the cluster's. p50/p90
   over the changes.
3. throughput: iperf3 between two pods of that node (host veths named as Trellis names them,
   attached by `PodNetwork`, routed as Trellis routes), with no table, with the table of a
   cluster without policies, and with the 1,000-policy table, in which both pods are isolated
   (egress and ingress) and allowed to talk on the port used. Median of several runs each,
   the three interleaved so that they share the machine's noise.

Why: the issue's targets are apply to enforcement p50 <= 1 s at 1,000 endpoints and 1,000
policies, and pod-to-pod throughput with them >= 0.97x of none ("none" read both ways: no table
at all, and the table of a node without policies; both ratios are shown).

The kernel work runs in a child process (this script with `--worker`, started by `ip netns
exec`) inside the node namespace: a libnftables context and netlink sockets bind to the
namespace of the thread that opens them, and this process never leaves the machine's own.
Every namespace is named `trlr-<tag>-<role>` and removed at teardown, which always runs;
processes are ended by their PIDs (`common.host`).
"""

from __future__ import annotations

import argparse
import ipaddress
import itertools
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rich.console import Console

from common.host import BenchError, Scratch, in_netns, ip, run, scratch, wait_for_text
from common.report import count, finish_facts, load_line, main, run_facts, table, verdict
from trellis.agent.network import COALESCE_S
from trellis.calc.policy import (
    PolicyCalculator,
    PolicyInputs,
    PolicyReader,
    TierKind,
    compute_policy,
    read_policy_inputs,
)
from trellis.calc.policy_oracle import PolicyOracle
from trellis.dataplane.kernel.netlink import KernelError, SocketPool
from trellis.dataplane.kernel.netns import netns_path
from trellis.dataplane.kernel.nft import Nft, NftError, Table
from trellis.dataplane.kernel.pods import PodNetwork
from trellis.dataplane.render.nft import (
    FAMILY,
    TABLE,
    NatState,
    NftTable,
    TableRenderer,
    render_table,
    update_commands,
)
from trellis.model.ipam import Attachment
from trellis.model.k8s import (
    CLUSTER_NETWORK_POLICY_PREFIX,
    NAMESPACE_PREFIX,
    NETWORK_POLICY_PREFIX,
    NODE_PREFIX,
    POD_PREFIX,
    Direction,
    Protocol,
)
from trellis.model.naming import host_veth_name

NETNS_PREFIX = "trlr"
"""Prefix of every namespace this benchmark creates (and the only ones it removes)."""
TARGET_ENFORCE_S = 1.0
"""The issue's target: apply to enforcement on every node, p50, at 1,000 endpoints and policies."""
TARGET_THROUGHPUT = 0.97
"""The issue's target: pod-to-pod throughput with 1,000 policies, as a fraction of none."""

NAMESPACES = 20
PODS = 1000
POLICIES = 1000
NODES = ("node-1", "node-2", "node-3")
NODE = NODES[0]
"""The node whose agent is measured."""
POOL = ipaddress.IPv4Network("10.244.0.0/16")
NODE_BLOCK = 22
"""Each node's pods take addresses from its own /22 of the pool, as IPAM blocks would place them."""
MTU = 1500
APPS: tuple[tuple[str, str, tuple[tuple[str, int, str], ...]], ...] = (
    ("web", "frontend", (("http", 8080, "TCP"),)),
    ("api", "backend", (("http", 8080, "TCP"), ("grpc", 9090, "TCP"))),
    ("auth", "backend", (("http", 8000, "TCP"), ("grpc", 9090, "TCP"))),
    ("orders", "backend", (("http", 8080, "TCP"),)),
    ("search", "backend", (("http", 9200, "TCP"),)),
    ("worker", "backend", ()),
    ("cache", "data", (("redis", 6379, "TCP"),)),
    ("db", "data", (("postgres", 5432, "TCP"),)),
    ("queue", "data", (("amqp", 5672, "TCP"),)),
    ("dns", "infra", (("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"))),
)
"""(app, tier, named container ports); every pod also declares `metrics` 9100/TCP."""
TEAMS = ("payments", "catalog", "identity", "search", "platform")
ENVS = ("prod", "staging", "dev")
THROUGHPUT_PORTS = (5432, 6379, 8080, 9090)
"""Ports the throughput pair may use: the first on which the oracle finds a pair of the node's
pods, both isolated (egress at the sender, ingress at the receiver), allowed to connect."""
UPLINK = "trlr-up"
"""An uplink (a veth whose peer stays in the node namespace) with a default route: proxy ARP for
the pods' gateway 169.254.1.1 answers only when the node has a route to it."""
UPLINK_ADDRESS = "192.0.2.1/24"

STEPS = ("read", "compute", "render", "compare")
"""The agent's steps, timed in this process; then `apply`, in the node namespace."""
MODES = ("replace", "update")
"""How a pass is made: `replace`, as the agent did before it kept memory (every object parsed,
every endpoint computed and rendered, the whole table replaced); `update`, as it does now (see
`Memory`). Both are measured in the same run, on the same changes."""
NO_TABLE, NO_POLICIES, POLICIES_TABLE = "no table", "no policies", f"{POLICIES:,} policies"
"""The throughput runs' tables: none at all; the table of the cluster without policies; the full one."""
WORKER = "--worker"
"""This script's argument to serve kernel requests inside the node namespace (see `worker`)."""

Commands = list[dict[str, Any]]
Objects = dict[str, dict[str, Any]]


# -- the synthetic cluster -------------------------------------------------------------------


def _match(**labels: str) -> dict[str, Any]:
    return {"matchLabels": labels}


def namespace_name(index: int) -> str:
    return f"{TEAMS[index % len(TEAMS)]}-{ENVS[index % len(ENVS)]}-{index:02d}"


def _namespace(index: int) -> dict[str, Any]:
    labels = {"team": TEAMS[index % len(TEAMS)], "env": ENVS[index % len(ENVS)]}
    if index < 2:
        labels["role"] = ("system", "monitoring")[index]
    return {"metadata": {"name": namespace_name(index), "labels": labels}}


def pod_address(node: int, slot: int) -> ipaddress.IPv4Address:
    return POOL.network_address + (node << (32 - NODE_BLOCK)) + 2 + slot


def _pod(index: int, name_suffix: str = "", slot_offset: int = 0) -> dict[str, Any]:
    """The `index`th pod: on node index % 3; another one beside it with a suffix and offset."""
    ns, position = divmod(index, PODS // NAMESPACES)
    app, tier, ports = APPS[position % len(APPS)]
    container_ports = [
        {"name": name, "containerPort": number, "protocol": protocol}
        for name, number, protocol in (*ports, ("metrics", 9100, "TCP"))
    ]
    node, slot = index % len(NODES), index // len(NODES) + slot_offset
    return {
        "metadata": {
            "namespace": namespace_name(ns),
            "name": f"{app}-{position // len(APPS)}{name_suffix}",
            "labels": {
                "app": app,
                "tier": tier,
                "team": TEAMS[ns % len(TEAMS)],
                "version": f"v{position % 3}",
            },
        },
        "spec": {"nodeName": NODES[node], "containers": [{"name": app, "ports": container_ports}]},
        "status": {"podIP": str(pod_address(node, slot)), "phase": "Running"},
    }


def _node(index: int) -> dict[str, Any]:
    name = NODES[index]
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "zone": f"zone-{index % 2}"}},
        "status": {"addresses": [{"type": "InternalIP", "address": f"172.30.0.{11 + index}"}]},
    }


def _ingress_rules(kind: int, ns: int, slot: int) -> list[dict[str, Any]]:
    """Ingress of the policy kinds 0-4, 8 and 9 (5-7 are egress policies)."""
    named_port = APPS[slot % len(APPS)][2][0][0] if APPS[slot % len(APPS)][2] else "metrics"
    peer_app = APPS[(slot + 1 + slot // len(APPS)) % len(APPS)][0]
    team = TEAMS[(ns + slot) % len(TEAMS)]
    rules: dict[int, list[dict[str, Any]]] = {
        0: [{"from": [{"podSelector": _match(app=peer_app)}], "ports": [{"port": named_port}]}],
        1: [
            {
                "from": [{"namespaceSelector": _match(team=team), "podSelector": _match(app=peer_app)}],
                "ports": [{"port": 8080, "protocol": "TCP"}],
            }
        ],
        2: [
            {
                "from": [{"podSelector": _match(tier="backend")}],
                "ports": [{"port": 5432}, {"port": 6379}],
            }
        ],
        3: [{"from": [{"namespaceSelector": _match(role="monitoring")}], "ports": [{"port": "metrics"}]}],
        4: [
            {
                "from": [
                    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.244.0.0/16"]}},
                    {"ipBlock": {"cidr": f"192.168.{slot}.0/24"}},
                ],
                "ports": [{"port": 443}, {"port": 8080}],
            }
        ],
        8: [
            {
                "from": [{"namespaceSelector": _match(team=team, env="prod")}],
                "ports": [{"port": 30000, "endPort": 32767, "protocol": "TCP"}],
            }
        ],
        9: [{"from": [{"namespaceSelector": _match(team=TEAMS[ns % len(TEAMS)])}]}],
    }
    return rules[kind]


def _network_policy(index: int, name_suffix: str = "") -> dict[str, Any]:
    """The `index`th policy (in namespace index // 50); another one like it with a suffix.

    Ten kinds in turn: 0 from a peer app of the namespace to a named port; 1 from an app of
    another team's namespaces, by number; 2 the data tier from the backend tier; 3 metrics from
    monitoring, every pod; 4 from outside by ipBlock; 5 egress to the database and DNS; 6 egress
    to the internet on HTTPS only (ingress open within the namespace); 7 egress to api's named
    port in any namespace; 8 a port range from a team's prod namespaces; 9 the team's namespaces.
    """
    ns, slot = divmod(index, POLICIES // NAMESPACES)
    kind = slot % 10
    app = APPS[slot % len(APPS)][0]
    selectors = {
        2: _match(tier="data", version=f"v{slot % 3}"),
        3: {},
        8: _match(app=app, version=f"v{slot % 3}"),
    }
    spec: dict[str, Any] = {"podSelector": selectors.get(kind, _match(app=app))}
    if kind == 5:
        spec["policyTypes"] = ["Egress"]
        spec["egress"] = [
            {"to": [{"podSelector": _match(app="db")}], "ports": [{"port": 5432}]},
            {
                "to": [{"namespaceSelector": _match(role="system"), "podSelector": _match(app="dns")}],
                "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
            },
        ]
    elif kind == 6:
        spec["policyTypes"] = ["Ingress", "Egress"]
        spec["ingress"] = [{"from": [{"podSelector": {}}]}]
        spec["egress"] = [
            {
                "to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/8", "172.16.0.0/12"]}}],
                "ports": [{"port": 443}],
            }
        ]
    elif kind == 7:
        spec["policyTypes"] = ["Egress"]
        spec["egress"] = [
            {"to": [{"namespaceSelector": {}, "podSelector": _match(app="api")}], "ports": [{"port": "grpc"}]}
        ]
    else:
        spec["ingress"] = _ingress_rules(kind, ns, slot)
    return {
        "metadata": {"namespace": namespace_name(ns), "name": f"np-{slot:02d}{name_suffix}"},
        "spec": spec,
    }


def _cluster_policies() -> list[dict[str, Any]]:
    def cnp(name: str, tier: str, priority: int, subject: dict[str, Any], **rules: Any) -> dict[str, Any]:
        spec = {"tier": tier, "priority": priority, "subject": subject, **rules}
        return {"metadata": {"name": name}, "spec": spec}

    every: dict[str, Any] = {"namespaces": {}}
    dns = {"pods": {"namespaceSelector": _match(role="system"), "podSelector": _match(app="dns")}}
    monitoring = [
        {
            "action": "Accept",
            "from": [{"namespaces": _match(role="monitoring")}],
            "protocols": [{"destinationNamedPort": "metrics"}],
        }
    ]
    return [
        cnp(
            "no-metadata",
            "Admin",
            5,
            every,
            egress=[{"action": "Deny", "to": [{"networks": ["169.254.169.254/32"]}]}],
        ),
        cnp(
            "dev-stays-out-of-prod",
            "Admin",
            10,
            {"namespaces": _match(env="prod")},
            ingress=[{"action": "Deny", "from": [{"namespaces": _match(env="dev")}]}],
        ),
        cnp("monitoring-scrapes", "Admin", 20, every, ingress=monitoring),
        cnp("dns-is-up-to-namespaces", "Admin", 30, every, egress=[{"action": "Pass", "to": [dns]}]),
        cnp(
            "dev-isolated",
            "Baseline",
            50,
            every,
            ingress=[{"action": "Deny", "from": [{"namespaces": _match(env="dev")}]}],
        ),
    ]


def _keyed(prefix: str, obj: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    meta = obj["metadata"]
    path = f"{meta['namespace']}/{meta['name']}" if "namespace" in meta else meta["name"]
    return prefix + path, obj


def cluster_objects(policies: bool = True) -> Objects:
    """The datastore's objects by key, as the agent's view holds them (`policies` False: none)."""
    objects = dict(
        [
            *(_keyed(NAMESPACE_PREFIX, _namespace(i)) for i in range(NAMESPACES)),
            *(_keyed(POD_PREFIX, _pod(i)) for i in range(PODS)),
            *(_keyed(NODE_PREFIX, _node(i)) for i in range(len(NODES))),
        ]
    )
    if policies:
        objects.update(_keyed(NETWORK_POLICY_PREFIX, _network_policy(i)) for i in range(POLICIES))
        objects.update(_keyed(CLUSTER_NETWORK_POLICY_PREFIX, c) for c in _cluster_policies())
    return objects


def attachment(pod_key: str) -> Attachment:
    return Attachment(f"ctr-{pod_key.replace('/', '-')}", "eth0")


def local_endpoints(objects: Mapping[str, Any], node: str) -> dict[str, str]:
    """Host interface -> pod key of every pod on `node`, as the agent's IPAM gives them."""
    return {
        host_veth_name(attachment(key.removeprefix(POD_PREFIX))): key.removeprefix(POD_PREFIX)
        for key, value in objects.items()
        if key.startswith(POD_PREFIX) and value["spec"]["nodeName"] == node
    }


def nat_state(objects: Mapping[str, Any], local: Mapping[str, str]) -> NatState:
    """What the agent passes besides policy: pools, node addresses, the local pods' sources."""
    nodes = {ipaddress.IPv4Network(f"172.30.0.{11 + i}/32") for i in range(len(NODES))}
    sources = frozenset(
        (interface, ipaddress.IPv4Address(objects[POD_PREFIX + key]["status"]["podIP"]))
        for interface, key in local.items()
    )
    return NatState(frozenset({POOL}), frozenset({POOL, *nodes}), sources)


@dataclass(frozen=True)
class Change:
    """One write to the cluster, and the objects and local endpoints after it."""

    kind: str
    """`policy` (a one-policy edit, add or delete) or `pod` (a pod ADD on the measured node)."""
    what: str
    objects: Objects
    local: dict[str, str]


def _edited(policy: dict[str, Any], port: int) -> dict[str, Any]:
    """The policy with TCP `port` added to each of its rules' ports (a rule without ports allows all)."""
    spec = dict(policy["spec"])
    for direction in ("ingress", "egress"):
        if direction in spec:
            spec[direction] = [
                {**rule, "ports": [*rule["ports"], {"port": port}]} if "ports" in rule else rule
                for rule in spec[direction]
            ]
    return {**policy, "spec": spec}


def one_policy_changes(objects: Objects, local: dict[str, str], count: int) -> Iterator[Change]:
    """Edits, adds and deletes in turn, each of one policy that selects pods of the measured node."""
    inputs, _ = read_policy_inputs(objects)
    here = [pod for pod in inputs.pods.values() if pod.node == NODE]
    made = 0
    for index in range(13, 13 + 97 * POLICIES, 97):
        key, policy = _keyed(NETWORK_POLICY_PREFIX, _network_policy(index % POLICIES))
        parsed = inputs.network_policies[key.removeprefix(NETWORK_POLICY_PREFIX)]
        if not any(parsed.subject.selects(pod, {}) for pod in here):
            continue
        after = dict(objects)
        name = key.removeprefix(NETWORK_POLICY_PREFIX)
        match made % 3:
            case 0:
                after[key] = _edited(policy, 10000 + made)
                what = f"edit {name}"
            case 1:
                added, after[added] = _keyed(NETWORK_POLICY_PREFIX, _network_policy(index % POLICIES, "-new"))
                what = f"add {added.removeprefix(NETWORK_POLICY_PREFIX)}"
            case _:
                del after[key]
                what = f"delete {name}"
        yield Change("policy", what, after, local)
        made += 1
        if made == count:
            return


def pod_adds(objects: Objects, local: dict[str, str], count: int) -> Iterator[Change]:
    """A new replica beside an existing pod of the measured node: its Pod object and its endpoint."""
    for n in range(count):
        index = (n * 37 * len(NODES)) % PODS  # a pod of node-1
        key, pod = _keyed(POD_PREFIX, _pod(index, name_suffix="-new", slot_offset=PODS // len(NODES) + n))
        pod_key = key.removeprefix(POD_PREFIX)
        endpoint = host_veth_name(attachment(pod_key))
        yield Change("pod", f"ADD {pod_key}", {**objects, key: pod}, {**local, endpoint: pod_key})


# -- compute -----------------------------------------------------------------------------------


def _ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


def agent_pass(
    objects: Objects, local: dict[str, str], last: Commands | None
) -> tuple[Commands, dict[str, float]]:
    """What the agent's reconcile does for policy, step by step: the batch and each step's ms."""
    started = time.perf_counter()
    inputs, errors = read_policy_inputs(objects)
    assert not errors, errors
    read = _ms(started)
    started = time.perf_counter()
    state = compute_policy(inputs, NODE, local)
    assert not state.problems, state.problems
    compute = _ms(started)
    started = time.perf_counter()
    commands = render_table(nat_state(objects, local), state)
    render = _ms(started)
    started = time.perf_counter()
    if commands == last:
        raise AssertionError("a change that changes nothing measures nothing")
    compare = _ms(started)
    return commands, {"read": read, "compute": compute, "render": render, "compare": compare}


class Memory:
    """What the agent keeps from one pass to the next: `PolicyReader`, `PolicyCalculator`,
    `TableRenderer`, and the table it last programmed, which it updates (`update_commands`)."""

    def __init__(self) -> None:
        self.reader, self.calculator, self.renderer = PolicyReader(), PolicyCalculator(), TableRenderer()
        self.held: NftTable | None = None

    def program(self, objects: Objects, local: dict[str, str]) -> tuple[Commands, dict[str, float]]:
        """A pass, step by step: the commands that update the table held to the new one (the
        whole table the first time), and each step's ms."""
        started = time.perf_counter()
        inputs, errors = self.reader.read(objects)
        assert not errors, errors
        read = _ms(started)
        started = time.perf_counter()
        state = self.calculator.compute(inputs, NODE, local)
        assert not state.problems, state.problems
        compute = _ms(started)
        started = time.perf_counter()
        table = self.renderer.render(nat_state(objects, local), state)
        render = _ms(started)
        started = time.perf_counter()
        commands = table.commands() if self.held is None else update_commands(self.held, table)
        assert commands, "a change that changes nothing measures nothing"
        compare = _ms(started)
        self.held = table
        return commands, {"read": read, "compute": compute, "render": render, "compare": compare}


def batch_size(commands: Commands) -> dict[str, int]:
    added = [next(iter(c["add"].items())) for c in commands if "add" in c]
    sets = [body for kind, body in added if kind == "set"]
    maps = [body for kind, body in added if kind == "map"]
    return {
        "commands": len(commands),
        "rules": sum(1 for kind, _ in added if kind == "rule"),
        "chains": sum(1 for kind, _ in added if kind == "chain"),
        "sets": len(sets),
        "set elements": sum(len(s.get("elem", [])) for s in sets),
        "map elements": sum(len(m.get("elem", [])) for m in maps),
        "JSON bytes": len(json.dumps({"nftables": commands})),
    }


# -- the kernel side: a worker inside the node namespace --------------------------------------


def _serve(request: dict[str, Any], nft: Nft, pods: PodNetwork) -> dict[str, Any]:
    match request["op"]:
        case "apply":
            commands = json.loads(Path(request["batch"]).read_text())
            started = time.perf_counter()
            nft.apply(commands)
            return {"ms": _ms(started)}
        case "counters":
            started = time.perf_counter()
            found = Table.counters(nft)
            return {"ms": _ms(started), "rules": len(found)}
        case "clear":
            table = {"table": {"family": FAMILY, "name": TABLE}}
            nft.apply([{"add": table}, {"delete": table}])
            return {}
        case "attach":
            attachment = Attachment(request["container_id"], "eth0")
            address = ipaddress.IPv4Address(request["address"])
            return {"host": pods.attach(attachment, request["netns"], address, MTU).host_name}
    return {"error": f"unknown request {request['op']}"}


def worker(stdin: IO[str], stdout: IO[str]) -> int:
    """`--worker`: serve JSON requests, one a line, in the namespace this process was started in."""
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    nft, pods = Nft(), PodNetwork(SocketPool())
    for line in stdin:
        try:
            reply = _serve(json.loads(line), nft, pods)
        except (NftError, KernelError, OSError) as err:
            reply = {"error": f"{type(err).__name__}: {err}"}
        stdout.write(json.dumps(reply) + "\n")
        stdout.flush()
    return 0


class Worker:
    """This script's `--worker` inside the node namespace, spoken to a line at a time."""

    def __init__(self, run_: Scratch, node: str) -> None:
        self._run = run_
        self._log = run_.tmp / "worker.log"
        with self._log.open("wb") as log:
            self._process = run_.track(
                subprocess.Popen(
                    [*in_netns(node), sys.executable, __file__, WORKER],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                )
            )
        self._batches = 0

    def _ask(self, **request: Any) -> dict[str, Any]:
        assert self._process.stdin is not None and self._process.stdout is not None
        self._process.stdin.write(json.dumps(request).encode() + b"\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            tail = self._log.read_text(errors="replace")[-1500:]
            raise BenchError(f"the worker exited with {self._process.wait()}: {tail}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise BenchError(f"worker {request['op']}: {reply['error']}")
        return reply

    def apply(self, batch: str) -> float:
        """Apply a batch (JSON text) as the agent does; the ms `nft.apply` took (its encoding included)."""
        self._batches += 1
        path = self._run.tmp / f"batch-{self._batches}.json"
        path.write_text(batch)
        ms = float(self._ask(op="apply", batch=str(path))["ms"])
        path.unlink()
        return ms

    def counters(self) -> float:
        """The ms reading the table's counters takes (what a resync does before replacing it)."""
        return float(self._ask(op="counters")["ms"])

    def clear(self) -> None:
        """No table at all."""
        self._ask(op="clear")

    def attach(self, pod_key: str, netns: str, address: ipaddress.IPv4Address) -> str:
        """Attach namespace `netns` as Trellis attaches pod `pod_key`; the host veth's name."""
        container_id = attachment(pod_key).container_id
        request = {"container_id": container_id, "netns": netns_path(netns), "address": str(address)}
        return str(self._ask(op="attach", **request)["host"])


def build_node(run_: Scratch) -> str:
    """The node namespace: an uplink with an address and a default route."""
    node = run_.netns("node")
    for args in (
        f"link add {UPLINK} type veth peer name {UPLINK}1",
        f"addr add {UPLINK_ADDRESS} dev {UPLINK}",
        f"link set {UPLINK}1 up",
        f"link set {UPLINK} up",
        f"route add default via {ipaddress.IPv4Interface(UPLINK_ADDRESS).network[-2]} dev {UPLINK}",
    ):
        ip("-n", node, *args.split())
    return node


# -- throughput ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    source: str
    target: str
    port: int
    decisions: str
    """The oracle's words for why the connection is allowed."""


def throughput_pair(inputs: PolicyInputs, local: Mapping[str, str]) -> Pair:
    """Two pods of the node, isolated at both ends by NetworkPolicies, allowed to connect."""
    interfaces = {key: interface for interface, key in local.items()}
    oracle = PolicyOracle(inputs, interfaces)
    state = oracle.state(NODE)

    def isolated(key: str, direction: Direction) -> bool:
        return any(
            t.kind is TierKind.NETWORK_POLICY for t in state.endpoints[interfaces[key]].tiers(direction)
        )

    senders = [key for key in sorted(interfaces) if isolated(key, Direction.EGRESS)]
    receivers = [key for key in sorted(interfaces) if isolated(key, Direction.INGRESS)]
    for port in THROUGHPUT_PORTS:
        for source in senders:
            for target in receivers:
                verdict_ = oracle.evaluate(source, target, port, Protocol.TCP)
                decided_by_policies = all(d.tier is TierKind.NETWORK_POLICY for d in verdict_.decisions)
                if source != target and verdict_.allowed and decided_by_policies:
                    return Pair(source, target, port, str(verdict_))
    raise BenchError("no pair of the node's pods is isolated at both ends and allowed to connect")


def measure_throughput(
    run_: Scratch,
    worker_: Worker,
    tables: Mapping[str, str | None],
    pair: Pair,
    objects: Objects,
    args: argparse.Namespace,
) -> dict[str, list[float]]:
    """iperf3 from the pair's source pod to its target, `--runs` times per table (a batch, or None
    for no table at all); received Gbit/s. The tables take turns, each round starting with the
    next one, so that the machine's background load falls on all alike."""
    pods = {}
    for role, key in (("src", pair.source), ("dst", pair.target)):
        netns = run_.netns(role)
        address = ipaddress.IPv4Address(objects[POD_PREFIX + key]["status"]["podIP"])
        if worker_.attach(key, netns, address) != host_veth_name(attachment(key)):
            raise BenchError(f"{key}: attached under another name than its endpoint's")
        pods[role] = (netns, address)
    (src, _), (dst, address) = pods["src"], pods["dst"]
    server, log = run_.spawn(
        [*in_netns(dst), "iperf3", "-s", "-p", str(pair.port), "--forceflush"], "iperf3.log"
    )
    wait_for_text(server, log, "Server listening")
    client = [*in_netns(src), "iperf3", "-c", str(address), "-p", str(pair.port), "-t", str(args.seconds)]
    samples: dict[str, list[float]] = {name: [] for name in tables}
    names = list(tables)
    for r in range(args.runs):
        for name in names[r % len(names) :] + names[: r % len(names)]:  # each round starts one later
            batch = tables[name]
            if batch is None:
                worker_.clear()
            else:
                worker_.apply(batch)
            end = json.loads(run([*client, "-O", "1", "-J"], timeout=args.seconds + 60))["end"]
            samples[name].append(end["sum_received"]["bits_per_second"] / 1e9)
    return samples


# -- the run -------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) == 1:
        return {"p50": round(values[0], 2), "p90": round(values[0], 2)}
    cuts = statistics.quantiles(values, n=10, method="inclusive")
    return {"p50": round(statistics.median(values), 2), "p90": round(cuts[8], 2)}


@dataclass
class Pass:
    """One change, measured both ways: its record, and its batches as JSON text."""

    record: dict[str, Any]
    replace: str
    """The whole table after the change."""
    update: str
    """The update from the table before the change to the one after."""
    undo: str
    """The update back."""


def _rounded(ms: dict[str, float]) -> dict[str, float]:
    return {step: round(value, 2) for step, value in ms.items()}


def measure_compute(
    objects: Objects, local: dict[str, str], args: argparse.Namespace
) -> tuple[Commands, dict[str, list[float]], list[Pass]]:
    """The whole cluster's batch and its steps' ms; then each change's passes, both ways.

    Every change is made from the whole cluster, and undone by the agent with memory before the
    next one. Batches are kept as JSON text, which the garbage collector does not walk, so the
    heap stays the agent's: the objects, its memory and the last table.
    """
    full: dict[str, list[float]] = {step: [] for step in STEPS}
    commands: Commands = []
    for _ in range(args.repeat):
        commands, ms = agent_pass(objects, local, None)
        for step in STEPS:
            full[step].append(ms[step])
    memory = Memory()
    memory.program(objects, local)
    passes = []
    changes = itertools.chain(
        one_policy_changes(objects, local, args.changes), pod_adds(objects, local, args.pod_adds)
    )
    for change in changes:
        after, replace_ms = agent_pass(change.objects, change.local, commands)
        update, update_ms = memory.program(change.objects, change.local)
        undo, _ = memory.program(objects, local)
        record = {
            "kind": change.kind,
            "what": change.what,
            "ms": {"replace": _rounded(replace_ms), "update": _rounded(update_ms)},
            "update_commands": len(update),
        }
        passes.append(Pass(record, json.dumps(after), json.dumps(update), json.dumps(undo)))
        del after, change
    return commands, full, passes


def measure(args: argparse.Namespace) -> dict[str, Any]:
    facts = run_facts()
    objects = cluster_objects()
    local = local_endpoints(objects, NODE)
    commands, full, passes = measure_compute(objects, local, args)
    result: dict[str, Any] = {
        "benchmark": "policy_scale",
        **facts,
        "python": sys.version.split()[0],
        "nft": run(["nft", "--version"]).strip(),
        "cluster": {
            "namespaces": NAMESPACES,
            "pods": PODS,
            "network_policies": POLICIES,
            "cluster_network_policies": len(_cluster_policies()),
            "nodes": len(NODES),
            "local_endpoints": len(local),
        },
        "targets": {"apply_to_enforcement_p50_s": TARGET_ENFORCE_S, "throughput_ratio": TARGET_THROUGHPUT},
        "batch": batch_size(commands),
        "full_ms": {step: percentiles(values) for step, values in full.items()},
        "coalesce_ms": COALESCE_S * 1000,
        "changes": [each.record for each in passes],
    }
    with scratch(NETNS_PREFIX) as run_:
        kernel = Worker(run_, build_node(run_))
        batch = json.dumps(commands)
        result["full_ms"]["first apply"] = percentiles([kernel.apply(batch)])
        result["full_ms"]["apply"] = percentiles([kernel.apply(batch) for _ in range(args.repeat)])
        result["full_ms"]["counters"] = percentiles([kernel.counters() for _ in range(args.repeat)])
        for each in passes:
            each.record["ms"]["replace"]["apply"] = round(kernel.apply(each.replace), 2)
        kernel.apply(batch)
        for each in passes:
            each.record["ms"]["update"]["apply"] = round(kernel.apply(each.update), 2)
            kernel.apply(each.undo)
        inputs, _ = read_policy_inputs(objects)
        pair = throughput_pair(inputs, local)
        empty = cluster_objects(policies=False)
        empty_inputs, _ = read_policy_inputs(empty)
        open_table = render_table(nat_state(empty, local), compute_policy(empty_inputs, NODE, local))
        tables = {NO_TABLE: None, NO_POLICIES: json.dumps(open_table), POLICIES_TABLE: batch}
        samples = measure_throughput(run_, kernel, tables, pair, objects, args)
    result["throughput"] = {
        "pair": {"source": pair.source, "target": pair.target, "port": pair.port, "oracle": pair.decisions},
        "iperf3": f"-t {args.seconds} -O 1, {args.runs} runs per table",
        "gbit_s": samples,
        "median_gbit_s": {name: round(statistics.median(values), 2) for name, values in samples.items()},
        "paired_ratio": {
            reference: paired_ratio(samples, reference) for reference in (NO_TABLE, NO_POLICIES)
        },
    }
    return finish_facts(result)


def paired_ratio(samples: Mapping[str, list[float]], reference: str) -> float:
    """The median over rounds of the 1,000-policy run / the `reference` run of the same round:
    runs of one round are seconds apart, so background load that drifts cancels out."""
    pairs = zip(samples[POLICIES_TABLE], samples[reference], strict=True)
    return round(statistics.median(mine / theirs for mine, theirs in pairs), 3)


def enforcement(result: dict[str, Any], kind: str, mode: str) -> dict[str, float] | None:
    """Apply to enforcement in ms per change of `kind` made by `mode`: coalescing wait + the
    agent's steps."""
    totals = [
        result["coalesce_ms"] + sum(c["ms"][mode][step] for step in (*STEPS, "apply"))
        for c in result["changes"]
        if c["kind"] == kind and "apply" in c["ms"][mode]
    ]
    return percentiles(totals) if totals else None


STEP_WORDS = {
    "read": "parse the objects: replace, every one; update, the changed ones (PolicyReader)",
    "compute": "the node's endpoints: replace, all; update, what the change can alter (PolicyCalculator)",
    "render": "the table: replace, every chain; update, the chains of changed endpoints (TableRenderer)",
    "compare": "replace: with the last batch; update: update_commands, what differs",
    "apply": "libnftables, one transaction: replace, the whole table; update, what differs",
}
KINDS = {"policy": "one-policy change", "pod": "pod ADD"}


def _cells(figures: dict[str, float] | None, *which: str) -> list[str]:
    return [f"{figures[w]:.0f}" if figures else "" for w in which]


def _step(result: dict[str, Any], kind: str, step: str, mode: str) -> dict[str, float] | None:
    values = [c["ms"][mode][step] for c in result["changes"] if c["kind"] == kind and step in c["ms"][mode]]
    return percentiles(values) if values else None


def _row(result: dict[str, Any], kind: str, step: str) -> list[str]:
    """replace p50, update p50, update p90 of `step` for changes of `kind`."""
    replaced, updated = _step(result, kind, step, "replace"), _step(result, kind, step, "update")
    return [*_cells(replaced, "p50"), *_cells(updated, "p50", "p90")]


def render_agent(console: Console, result: dict[str, Any]) -> None:
    cluster = result["cluster"]
    made = table(
        f"{cluster['local_endpoints']} endpoints of {cluster['pods']:,} pods, "
        f"{cluster['network_policies']:,} NPs + {cluster['cluster_network_policies']} CNPs: one node, "
        "ms, p50 but where p90 is said",
        ["", "cluster", "policy: replace", "update", "p90", "pod ADD: replace", "update", "p90"],
    )
    for step in (*STEPS, "apply"):
        made.add_row(
            step,
            *_cells(result["full_ms"].get(step), "p50"),
            *_row(result, "policy", step),
            *_row(result, "pod", step),
        )
    coalesce = f"{result['coalesce_ms']:.0f}"
    made.add_row("coalesce wait", "", *[coalesce, coalesce, ""] * len(KINDS))
    totals = {(kind, mode): enforcement(result, kind, mode) for kind in KINDS for mode in MODES}
    cells = []
    for kind in KINDS:
        cells += [*_cells(totals[kind, "replace"], "p50"), *_cells(totals[kind, "update"], "p50", "p90")]
    made.add_row("[bold]to enforcement[/]", "", *cells)
    console.print(made)
    for step, words in STEP_WORDS.items():
        console.print(f"  {step}: {words}")
    full = result["full_ms"]
    console.print(f"  first apply, into an empty namespace: {full['first apply']['p50']:.0f} ms")
    counters, replace = full["counters"]["p50"], full["apply"]["p50"]
    console.print(
        "  resync (every 30 s): nothing when no one else committed an nftables transaction; else "
        f"read the counters {counters:.0f} ms, then replace the table {replace:.0f} ms"
    )
    target = result["targets"]["apply_to_enforcement_p50_s"] * 1000
    for kind, words in KINDS.items():
        replaced, updated = totals[kind, "replace"], totals[kind, "update"]
        if replaced and updated:
            console.print(
                f"apply to enforcement after a {words}, p50: update {updated['p50']:.0f} ms, replace "
                f"{replaced['p50']:.0f} ms ({replaced['p50'] / updated['p50']:.1f}x); "
                f"target <= {target:.0f} ms: {verdict(updated['p50'] <= target)}"
            )


def render_throughput(console: Console, result: dict[str, Any]) -> None:
    through = result["throughput"]
    medians = through["median_gbit_s"]
    pair = through["pair"]
    target = result["targets"]["throughput_ratio"]
    made = table(
        f"iperf3 {pair['source']} -> {pair['target']} TCP/{pair['port']}, Gbit/s",
        ["table", "median", "runs, in round order"],
    )
    for name, values in through["gbit_s"].items():
        made.add_row(name, f"{medians[name]:.2f}", " ".join(f"{v:.2f}" for v in values))
    console.print(made)
    console.print(f"  iperf3 {through['iperf3']}; the pair, by the oracle: {pair['oracle']}")
    for reference, ratio in through["paired_ratio"].items():
        console.print(
            f"{POLICIES_TABLE} / {reference}, median of each round's ratio: {ratio:.3f} "
            f"(target >= {target}): {verdict(ratio >= target)}"
        )


def render(result: dict[str, Any]) -> None:
    console = Console()
    render_agent(console, result)
    sizes = table("The node's batch", ["", "count"])
    for name, number in result["batch"].items():
        sizes.add_row(name, f"{number:,}")
    console.print(sizes)
    render_throughput(console, result)
    console.print(load_line(result))


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0] if __doc__ else None)
    parser.add_argument(
        "--changes", type=count(1), default=12, help="one-policy changes measured (default 12)"
    )
    parser.add_argument("--pod-adds", type=count(1), default=6, help="pod ADDs measured (default 6)")
    parser.add_argument(
        "--repeat", type=count(1), default=5, help="whole-cluster passes measured (default 5)"
    )
    parser.add_argument("--runs", type=count(1), default=3, help="iperf3 runs per table (default 3)")
    parser.add_argument("--seconds", type=count(2), default=5, help="seconds per iperf3 run (default 5)")
    return main(parser, measure, render, "policy_scale", argv)


if __name__ == "__main__":
    sys.exit(worker(sys.stdin, sys.stdout) if sys.argv[1:] == [WORKER] else cli())
