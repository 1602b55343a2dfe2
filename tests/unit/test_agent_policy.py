"""What the agent gives the policy calculator: every interface its node's blocks attach."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from tests.unit.agent_controller import unstarted_controller
from tests.unit.policy_cluster import base_objects, datastore_key, match, network_policy, pod_ip
from trellis.agent.config import AgentConfig
from trellis.calc.policy import TierKind
from trellis.model.ipam import Allocation, Attachment, Block
from trellis.model.naming import host_veth_name


def test_both_attachments_of_one_pod_get_its_policy(tmp_path: Path) -> None:
    """A pod's stale sandbox still holds an address until CNI DEL while the new one runs: each
    interface gets the pod's programs, so neither is dropped as having none (fail closed)."""
    stale, live = Attachment("c-stale", "eth0"), Attachment("c-live", "eth0")
    block = (
        Block(ipaddress.IPv4Network("10.244.1.0/26"), "node-1")
        .with_allocation(ipaddress.IPv4Address("10.244.1.20"), Allocation(stale, "x/a"))
        .with_allocation(pod_ip("x/a"), Allocation(live, "x/a"))
    )
    isolating = network_policy(
        "p", pod_selector=match(pod="a"), ingress=[{"from": [{"podSelector": match(pod="b")}]}]
    )
    objects = {datastore_key(o): o for o in (*base_objects(), isolating)}
    objects[block.key] = block.to_json()
    with unstarted_controller(AgentConfig(node="node-1", state_dir=tmp_path)) as controller:
        state = controller._policy(objects, controller._local_endpoints(objects))
    assert state.problems == ()
    assert set(state.endpoints) == {host_veth_name(stale), host_veth_name(live)}
    for policy in state.endpoints.values():
        (tier,) = policy.ingress
        assert (policy.pod, tier.kind, tier.policies) == ("x/a", TierKind.NETWORK_POLICY, ("x/p",))
