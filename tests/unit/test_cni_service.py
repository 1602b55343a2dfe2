"""The agent's CNI service and socket server without root: a fake pod network, a real SQLite store."""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import cni_env, cni_error, net_conf
from trellis.agent.cni_service import CniService
from trellis.agent.config import AgentConfig
from trellis.agent.server import CniServer
from trellis.cni import client
from trellis.dataplane.kernel.netlink import KernelError, SocketPool
from trellis.dataplane.kernel.pods import NetnsMissing, PodLink, PodNetwork
from trellis.datastore.base import KV, Unavailable
from trellis.datastore.sqlite import SqliteDatastore
from trellis.ipam.allocator import Ipam
from trellis.model.ipam import Attachment
from trellis.model.naming import host_veth_name

POOL = ipaddress.IPv4Network("10.9.0.0/29")


class FakePods(PodNetwork):
    """Pod plumbing as a dict of host link name to (netns, address); can be told to fail."""

    def __init__(self) -> None:
        super().__init__(SocketPool())  # the pool opens no socket until lent
        self.links: dict[str, tuple[str, ipaddress.IPv4Address]] = {}
        self.fail: Exception | None = None

    def attach(self, attachment: Attachment, netns: str, address: ipaddress.IPv4Address, mtu: int) -> PodLink:
        if self.fail is not None:
            raise self.fail
        name = host_veth_name(attachment)
        self.links[name] = (netns, address)
        return PodLink(name, "aa:aa:aa:aa:aa:aa", attachment.ifname, "bb:bb:bb:bb:bb:bb", mtu)

    def detach(self, attachment: Attachment) -> bool:
        return self.links.pop(host_veth_name(attachment), None) is not None

    def remove_links(self, names: list[str]) -> None:
        for name in names:
            self.links.pop(name, None)

    def host_links(self) -> list[str]:
        return sorted(self.links)

    def check(self, attachment: Attachment, netns: str, address: ipaddress.IPv4Address) -> list[str]:
        link = self.links.get(host_veth_name(attachment))
        return [] if link == (netns, address) else ["host interface is missing or differs"]


class SwitchableStore(SqliteDatastore):
    """A SQLite store whose reads fail as Unavailable while `down` is set."""

    down = False

    def list(self, prefix: str) -> list[KV]:
        if self.down:
            raise Unavailable("switched off by the test")
        return super().list(prefix)


class Agent:
    """A CniService with fakes, called as the server calls it."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = SwitchableStore(tmp_path / "trellis.db")
        self.pods = FakePods()
        config = AgentConfig(
            node="n1", state_dir=tmp_path, pools=(POOL,), block_prefixlen=29, backend="vxlan"
        )
        self.ipam = Ipam(self.store, "n1", config.pools, config.block_prefixlen)
        self.service = CniService(config, self.ipam, self.pods, config.pod_mtu(1500))

    def call(self, command: str, stdin: bytes | None = None, **env: str) -> tuple[int, bytes]:
        return self.service.handle(cni_env(command, **env), net_conf() if stdin is None else stdin)

    def add(self, container_id: str, **conf: Any) -> dict[str, Any]:
        code, out = self.call("ADD", net_conf(**conf), CNI_CONTAINERID=container_id)
        assert code == 0, out
        result: dict[str, Any] = json.loads(out)
        return result


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    made = Agent(tmp_path)
    try:
        yield made
    finally:
        made.store.close()


def test_add_allocates_and_attaches(agent: Agent) -> None:
    """ADD returns the attached address with the agent's MTU (uplink 1500 less VXLAN's 50)."""
    result = agent.add("c1")
    assert result["ips"][0]["address"] == "10.9.0.0/32"
    assert result["interfaces"][1]["mtu"] == 1450
    assert agent.pods.links == {host_veth_name(Attachment("c1", "eth0")): ("/run/netns/pod", POOL[0])}


def test_config_mtu_wins_over_the_agents(agent: Agent) -> None:
    """A config mtu is what the pod gets."""
    assert agent.add("c1", mtu=9000)["interfaces"][1]["mtu"] == 9000


@pytest.mark.parametrize(
    ("failure", "code", "words"),
    [
        (NetnsMissing("/run/netns/pod"), 4, "CNI_NETNS"),
        (KernelError("veth trl0", 17), 102, "EEXIST"),
    ],
)
def test_failed_attach_releases_the_address(agent: Agent, failure: Exception, code: int, words: str) -> None:
    """When plumbing fails, ADD reports it (4 for a missing netns, 102 for the kernel) and frees the IP."""
    agent.pods.fail = failure
    status, out = agent.call("ADD")
    assert status == 1 and cni_error(out)[0] == code and words in cni_error(out)[1]
    assert agent.ipam.attachments() == {}


def test_del_is_idempotent(agent: Agent) -> None:
    """DEL removes link and address; a second DEL (or one for an unknown pod) still succeeds."""
    agent.add("c0ffee")
    assert agent.call("DEL") == (0, b"")
    assert agent.call("DEL") == (0, b"")
    assert agent.pods.links == {} and agent.ipam.attachments() == {}


def test_check_compares_allocation_and_plumbing(agent: Agent) -> None:
    """CHECK passes on what ADD made and fails with 101 on a wrong address or unknown pod."""
    result = agent.add("c0ffee")
    assert agent.call("CHECK", net_conf(prevResult=result)) == (0, b"")
    wrong = {**result, "ips": [{"address": "10.9.0.5/32"}]}
    code, out = agent.call("CHECK", net_conf(prevResult=wrong))
    assert code == 1 and cni_error(out)[0] == 101 and "differs from prevResult 10.9.0.5" in cni_error(out)[1]
    code, out = agent.call("CHECK", net_conf(prevResult=result), CNI_CONTAINERID="other")
    assert code == 1 and "no address is allocated" in cni_error(out)[1]


def test_gc_keeps_exactly_the_valid_attachments(agent: Agent) -> None:
    """GC frees addresses and removes host links of every attachment not listed, keeping the rest."""
    for cid in ("a", "b", "c"):
        agent.add(cid)
    agent.pods.links["trl00000000000"] = ("/leftover", POOL[7])
    valid = [{"containerID": "b", "ifname": "eth0"}]
    assert agent.call("GC", net_conf(**{"cni.dev/valid-attachments": valid})) == (0, b"")
    assert list(agent.ipam.attachments()) == [Attachment("b", "eth0")]
    assert agent.pods.host_links() == [host_veth_name(Attachment("b", "eth0"))]


def test_exhausted_pool_is_code_100(agent: Agent) -> None:
    """With every address of the pool in use, ADD fails with Trellis' code 100."""
    for i in range(POOL.num_addresses):
        agent.add(f"c{i}")
    code, out = agent.call("ADD", CNI_CONTAINERID="late")
    assert code == 1 and cni_error(out)[0] == 100


def test_datastore_down_is_11_and_status_50(agent: Agent) -> None:
    """An unavailable datastore makes ADD answer 11 and STATUS 50; back up, STATUS is 0."""
    agent.store.down = True
    assert cni_error(agent.call("ADD")[1])[0] == 11
    assert cni_error(agent.call("STATUS")[1])[0] == 50
    agent.store.down = False
    assert agent.call("STATUS") == (0, b"")


def test_invalid_request_error_uses_the_configs_version(agent: Agent) -> None:
    """A rejected request answers in the cniVersion of its config."""
    code, out = agent.call("ADD", net_conf(cniVersion="0.4.0", mtu=1), CNI_CONTAINERID="c1")
    assert code == 1 and json.loads(out)["cniVersion"] == "0.4.0" and cni_error(out)[0] == 7


@pytest.fixture
def server(tmp_path: Path, agent: Agent) -> Iterator[CniServer]:
    """The agent's socket server around the fake-backed service, serving in a thread."""
    srv = CniServer(tmp_path / "run" / "agent.sock", agent.service.handle)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def test_server_serves_the_thin_client(server: CniServer) -> None:
    """The client's request reaches the service over the socket and its answer comes back."""
    code, out = client.run(cni_env("ADD"), net_conf(), str(server.path))
    assert code == 0 and json.loads(out)["ips"][0]["address"] == "10.9.0.0/32"
    assert server.path.stat().st_mode & 0o777 == 0o600
    assert server.path.parent.stat().st_mode & 0o777 == 0o700


def test_server_rejects_a_foreign_request_as_undecodable(server: CniServer) -> None:
    """Bytes that are not the wire format get exit 1 and code 6."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.path))
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        sock.shutdown(socket.SHUT_WR)
        reply = sock.makefile("rb").read()
    code_line, _, body = reply.partition(b"\n")
    assert code_line == b"1" and cni_error(body)[0] == 6


def test_server_refuses_to_start_beside_a_live_agent(server: CniServer, agent: Agent) -> None:
    """A second server on a live socket fails; the live one keeps serving."""
    with pytest.raises(RuntimeError, match="another agent"):
        CniServer(server.path, agent.service.handle)
    assert client.run(cni_env("STATUS"), net_conf(), str(server.path)) == (0, b"")


def test_server_replaces_a_dead_agents_socket(tmp_path: Path, agent: Agent) -> None:
    """A socket file left by a killed agent is removed and served again; closing removes it."""
    path = tmp_path / "agent.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(path))
    dead.close()
    srv = CniServer(path, agent.service.handle)
    try:
        assert path.is_socket()
    finally:
        srv.server_close()
    assert not path.exists()
