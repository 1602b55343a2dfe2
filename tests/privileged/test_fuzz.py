"""Bad input against the real executable and agent: every reply is the spec's, nothing is written.

Hypothesis generates CNI environments (missing, empty, oversized, non-ASCII, wrong-command
variables) and stdin (mutated configs, random JSON, random bytes). Every invocation runs the
installed plugin as a runtime does. Properties: the exit code is 0 or 1; on 1, stdout is a
CNI error object with an integer code the spec or Trellis defines; the agent is still alive;
and since no request names a real network namespace, nothing is ever allocated or plumbed.
CI runs a short search; `make fuzz` runs a long one (TRELLIS_FUZZ_EXAMPLES).
"""

from __future__ import annotations

import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import cni_error
from tests.privileged.nodes import Node
from trellis.cni.spec import Code

EXAMPLES = int(os.environ.get("TRELLIS_FUZZ_EXAMPLES", "200"))
KNOWN_CODES = {int(code) for code in Code}
TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "eth0", "x" * 300, "../etc", "a b", "é", "K8S_POD_NAME=a;", "="]),
)
COMMANDS = st.sampled_from(["ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION", "", "add", "BOGUS"])
ENV_NAMES = ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def environments(draw: st.DrawFn) -> dict[str, str]:
    env = {"CNI_COMMAND": draw(COMMANDS)}
    for name in ENV_NAMES:
        if draw(st.booleans()):
            env[name] = draw(TEXT).replace("\0", "")
    if "CNI_NETNS" in env:
        env["CNI_NETNS"] = "/run/netns/trlt-fuzz-does-not-exist-" + env["CNI_NETNS"].replace("/", "_")
    return env


@st.composite
def configs(draw: st.DrawFn) -> bytes:
    base: dict[str, Any] = {"cniVersion": "1.1.0", "name": "trellis", "type": "trellis"}
    kind = draw(st.sampled_from(["mutated", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    for key in draw(
        st.lists(
            st.sampled_from(["cniVersion", "name", "type", "mtu", "prevResult", "cni.dev/valid-attachments"]),
            max_size=3,
        )
    ):
        base[key] = draw(JSON)
    return json.dumps(base).encode()


def test_bad_input_gets_spec_errors_and_changes_nothing(node: Node) -> None:
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(environments(), configs())
    def one(env: dict[str, str], conf: bytes) -> None:
        full = {"CNI_PATH": str(node.bin_dir), **env} if "CNI_PATH" not in env else env
        inv = node.runtime.exec_plugin(node.plugin, full, conf)
        assert inv.exit_code in (0, 1), (env, conf, inv)
        if inv.exit_code == 1:
            code, msg = cni_error(inv.stdout)
            assert code in KNOWN_CODES and msg, (env, conf, inv.stdout)
            seen[code] = seen.get(code, 0) + 1
        assert node.agent is not None and node.agent.poll() is None, "the agent died"

    one()
    assert node.allocations() == {} and node.host_veths() == set()
    assert seen, "no request was rejected: the generators are too tame"
