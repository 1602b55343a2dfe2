"""Updating `inet trl` in place gives the very table a replace gives, in a real kernel.

Random sequences of cluster changes (pods come, go, move address and change labels; policies and
ClusterNetworkPolicies come, go and change; namespaces are relabelled; nodes join and leave;
endpoints attach before their pod object and detach) go through the agent's own pipeline
(`PolicyReader`, `PolicyCalculator`, `TableRenderer`, `Table`) into one namespace, where each
state is reached by update; each state is also rendered afresh and loaded whole into a second
namespace. After every step the two kernels' listings must be equal, counters aside; the
counters of the rules that did not change must still hold what they held; and a resync must
find nothing to do (no one else committed anything). Namespaces are `trlp-<random>-inc` and
`-full`, deleted afterwards even on failure.
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from tests.privileged.nodes import delete_namespaces, run
from tests.unit.policy_changes import ChangingCluster
from tests.unit.policy_cluster import NODES, datastore_key, network_policy
from trellis.calc.policy import PolicyCalculator, PolicyReader, compute_policy, read_policy_inputs
from trellis.dataplane.kernel.netns import call_in_netns
from trellis.dataplane.kernel.nft import Nft, Programmed, Table
from trellis.dataplane.render.nft import NftTable, TableRenderer, render_table

pytestmark = pytest.mark.privileged

STEPS = 150
"""Changes per sequence."""
COUNTED = {"packets": 7, "bytes": 700}
"""What every rule counts at the start (a replace can start rules from any value)."""


def canonical(listing: list[dict[str, Any]]) -> dict[str, Any]:
    """A listing without handles, counters and order of sets, maps, chains and elements."""
    out: dict[str, Any] = {"set": {}, "map": {}, "chain": {}, "rules": {}}
    for item in listing:
        ((kind, body),) = item.items()
        body = {k: v for k, v in body.items() if k != "handle"}
        if kind in ("set", "map"):
            body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body.get("elem", []))
            out[kind][body["name"]] = body
        elif kind == "chain":
            out["chain"][body["name"]] = body
        elif kind == "rule":
            expr = [e for e in body["expr"] if "counter" not in e]
            out["rules"].setdefault(body["chain"], []).append((body.get("comment"), expr))
    return out


def counters(listing: list[dict[str, Any]]) -> dict[str, list[dict[str, int]]]:
    """Each chain's rules' counters, in order."""
    found: dict[str, list[dict[str, int]]] = {}
    for item in listing:
        if "rule" in item:
            rule = item["rule"]
            found.setdefault(rule["chain"], []).extend(e["counter"] for e in rule["expr"] if "counter" in e)
    return found


@pytest.fixture
def kernels() -> Iterator[tuple[Nft, Nft]]:
    """libnftables contexts in two new namespaces: updated, and replaced each time."""
    tag = secrets.token_hex(4)
    names = [f"trlp-{tag}-inc", f"trlp-{tag}-full"]
    try:
        for name in names:
            run("ip", "netns", "add", name)
        yield call_in_netns(names[0], Nft), call_in_netns(names[1], Nft)
    finally:
        assert not delete_namespaces(names)


class Agent:
    """What the agent does for the table after each change, with its own memory."""

    def __init__(self, nft: Nft) -> None:
        self.reader, self.calculator, self.renderer = PolicyReader(), PolicyCalculator(), TableRenderer()
        self.table = Table(nft)

    def desired(self, cluster: ChangingCluster) -> NftTable:
        inputs, errors = self.reader.read(cluster.objects)
        assert not errors, errors
        return self.renderer.render(cluster.nat(), self.calculator.compute(inputs, NODES[0], cluster.local))


@pytest.mark.parametrize("seed", range(4))
def test_updates_reach_the_table_a_replace_gives(kernels: tuple[Nft, Nft], seed: int) -> None:
    inc, full = kernels
    cluster, agent = ChangingCluster(random.Random(seed)), Agent(inc)
    first = agent.desired(cluster)
    inc.apply(first.commands({key: COUNTED for key in _rule_keys(first)}))  # a previous agent's table
    assert agent.table.program(first).replaced
    updates, touched = 0, set[str]()
    for step in range(STEPS):
        what = cluster.change()
        before, desired = agent.table.held, agent.desired(cluster)
        assert before is not None
        done = agent.table.program(desired)
        updates += not done.replaced
        assert agent.table.program(desired, resync=True) == Programmed(replaced=False, commands=0)
        inputs, _ = read_policy_inputs(cluster.objects)
        full.apply(render_table(cluster.nat(), compute_policy(inputs, NODES[0], cluster.local)))
        listed = inc.list_table()
        assert canonical(listed) == canonical(full.list_table()), f"step {step}: {what}"
        touched.update(name for name, chain in desired.chains.items() if before.chains.get(name) != chain)
        kept = counters(listed)
        for name in desired.chains.keys() - touched:
            assert all(c == COUNTED for c in kept[name]), f"step {step}: {what}: chain {name} lost its counts"
    assert updates == STEPS, "every change was made by update, none by replace"
    assert all(c == COUNTED for c in counters(inc.list_table())["forward"])


def _rule_keys(table: NftTable) -> Iterator[tuple[str, str, int]]:
    for name, chain in table.chains.items():
        seen: dict[str, int] = {}
        for rule in chain.rules:
            seen[rule["comment"]] = seen.get(rule["comment"], -1) + 1
            yield name, rule["comment"], seen[rule["comment"]]


def test_a_refused_update_or_anyone_elses_transaction_means_a_replace_that_keeps_counts(
    kernels: tuple[Nft, Nft],
) -> None:
    """Someone removed an element the update would remove: the kernel refuses the update, and
    the table is replaced whole. A resync replaces only when someone else committed a
    transaction since the agent's last one. Every replace starts each rule from its count."""
    inc, full = kernels
    cluster, agent = ChangingCluster(random.Random(7)), Agent(inc)
    first = agent.desired(cluster)
    inc.apply(first.commands({key: COUNTED for key in _rule_keys(first)}))  # a previous agent's table
    assert agent.table.program(first).replaced, "nothing known to update from"
    assert not agent.table.program(first, resync=True).replaced, "no one else committed anything"
    gone = sorted(cluster.local)[0]
    inc.run(f"delete element inet trl endpoints {{ {gone} }}")
    del cluster.local[gone]
    done = agent.table.program(agent.desired(cluster))
    assert done.replaced and done.refused is not None
    inputs, _ = read_policy_inputs(cluster.objects)
    full.apply(render_table(cluster.nat(), compute_policy(inputs, NODES[0], cluster.local)))
    assert canonical(inc.list_table()) == canonical(full.list_table())
    assert all(c == COUNTED for chain in counters(inc.list_table()).values() for c in chain)
    inc.run("add table inet trlp_other")
    resync = agent.table.program(agent.desired(cluster), resync=True)
    assert resync.replaced and resync.refused is None
    assert canonical(inc.list_table()) == canonical(full.list_table())
    assert all(c == COUNTED for chain in counters(inc.list_table()).values() for c in chain)


def test_anyone_elses_transaction_before_an_update_still_means_a_replace_at_resync(
    kernels: tuple[Nft, Nft],
) -> None:
    """Someone removes an element our next update does not touch, then the agent updates: the
    update succeeds, but it did not repair the table, so the next resync must replace it."""
    inc, full = kernels
    cluster, agent = ChangingCluster(random.Random(7)), Agent(inc)
    assert agent.table.program(agent.desired(cluster)).replaced
    inc.run("delete element inet trl pod_nets { 10.244.0.0/16 }")
    del cluster.local[sorted(cluster.local)[0]]
    done = agent.table.program(agent.desired(cluster))
    assert not done.replaced and done.commands > 0, "the update does not touch pod_nets"
    resync = agent.table.program(agent.desired(cluster), resync=True)
    assert resync.replaced and resync.refused is None
    inputs, _ = read_policy_inputs(cluster.objects)
    full.apply(render_table(cluster.nat(), compute_policy(inputs, NODES[0], cluster.local)))
    assert canonical(inc.list_table()) == canonical(full.list_table())


def test_policy_turned_off_and_on_again_by_update(kernels: tuple[Nft, Nft]) -> None:
    """Turning policy off removes the forward chain, the pods' chains and the verdict maps that
    jump to them, in one update the kernel takes; turning it on again adds them back."""
    inc, full = kernels
    cluster, agent = ChangingCluster(random.Random(3)), Agent(inc)
    deny = network_policy("deny", ingress=[])
    cluster.objects[datastore_key(deny)] = deny
    on = agent.desired(cluster)
    assert any(name.startswith("ingress_") for name in on.chains), "some pod has a chain to remove"
    assert agent.table.program(on).replaced
    off = agent.renderer.render(cluster.nat(), None)
    inputs, _ = read_policy_inputs(cluster.objects)
    for desired, policy in ((off, None), (on, compute_policy(inputs, NODES[0], cluster.local))):
        done = agent.table.program(desired)
        assert done == Programmed(replaced=False, commands=done.commands), done.refused
        full.apply(render_table(cluster.nat(), policy))
        assert canonical(inc.list_table()) == canonical(full.list_table())
