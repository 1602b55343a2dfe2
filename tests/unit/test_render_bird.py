"""bird.conf against golden files per topology, each accepted by BIRD itself (`bird -p`);
the control-socket client against a recorded BIRD conversation."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from trellis.bgp.bird import BirdControl, BirdError, ProtocolState, parse_protocols
from trellis.bgp.render import render_bird
from trellis.calc.bgp import BGPObjects, DesiredBGP, compute_bgp
from trellis.model.bgp import BGPConfiguration, BGPPeer, RouteReflectors
from trellis.model.node import Node
from trellis.model.selector import LabelSelector

GOLDEN = Path(__file__).parent.parent / "golden"
Net = ipaddress.IPv4Network
Addr = ipaddress.IPv4Address
NODES = {
    f"node-{i}": Node(f"node-{i}", ipaddress.IPv4Interface(f"172.30.0.{10 + i}/24")) for i in (1, 2, 3, 4)
}
BLOCKS = [(Net(f"10.244.{i}.0/26"), f"node-{i}") for i in (1, 2, 3, 4)] + [(Net("10.244.2.64/26"), "node-2")]
POOLS = [Net("10.244.0.0/16")]
REFLECTORS = BGPObjects(
    BGPConfiguration(
        route_reflectors=RouteReflectors(
            frozenset({"node-1"}), LabelSelector.from_json({"matchLabels": {"route-reflector": "true"}})
        )
    )
)
TOR = BGPObjects(
    BGPConfiguration(node_asns={"node-3": 65003}),
    (
        BGPPeer(
            "tor",
            Addr("172.30.0.1"),
            65000,
            password="s3cret pass",
            accept=(Net("0.0.0.0/0"), Net("198.51.100.0/24")),
        ),
        BGPPeer("rack-a", Addr("172.30.0.2"), 64512, node_selector=LabelSelector.of(rack="a")),
    ),
)
TOPOLOGIES: dict[str, tuple[str, BGPObjects]] = {
    "bird_mesh.conf": ("node-2", BGPObjects()),
    "bird_rr_reflector.conf": ("node-1", REFLECTORS),
    "bird_rr_client.conf": ("node-3", REFLECTORS),
    "bird_tor.conf": ("node-2", TOR),
}
LABELS = {"node-2": {"route-reflector": "true", "rack": "a"}}


def state(name: str) -> DesiredBGP:
    local, bgp = TOPOLOGIES[name]
    return compute_bgp(NODES[local], NODES, BLOCKS, POOLS, bgp, LABELS)


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_config_matches_golden(name: str) -> None:
    """Regenerate with TRELLIS_UPDATE_GOLDEN=1 after a deliberate change, and review the diff."""
    rendered = render_bird(state(name))
    golden = GOLDEN / name
    if os.environ.get("TRELLIS_UPDATE_GOLDEN"):
        golden.write_text(rendered)
    assert rendered == golden.read_text()


needs_bird = pytest.mark.skipif(
    shutil.which("bird") is None, reason="needs BIRD 2 (`make setup` installs bird2)"
)


def assert_bird_accepts(path: Path) -> None:
    """`bird -p` parses a config and exits; it needs no root and touches no kernel state."""
    proc = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


@needs_bird
@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
def test_bird_accepts_golden(name: str) -> None:
    assert_bird_accepts(GOLDEN / name)


def test_goldens_show_the_topologies() -> None:
    """What each golden is for, asserted so that a regenerated golden cannot quietly lose it."""
    mesh = render_bird(state("bird_mesh.conf"))
    assert "protocol bgp mesh_172_30_0_11 " in mesh and "protocol bgp mesh_172_30_0_13 " in mesh
    assert mesh.count("passive on;") == 2  # node-2 waits for node-3 and node-4, not for node-1
    assert "route 10.244.2.0/26 blackhole;\n  route 10.244.2.64/26 blackhole;" in mesh
    reflector = render_bird(state("bird_rr_reflector.conf"))
    assert reflector.count("rr client;") == 2 and reflector.count("rr cluster id 244.0.0.1;") == 2
    assert "protocol bgp rr_172_30_0_12 " in reflector  # node-2 reflects too (by label)
    client = render_bird(state("bird_rr_client.conf"))
    assert "rr client" not in client and client.count("protocol bgp rr_") == 2
    tor = render_bird(state("bird_tor.conf"))
    assert 'password "s3cret pass";' in tor and "neighbor 172.30.0.13 as 65003;" in tor
    assert "net ~ [ 0.0.0.0/0, 198.51.100.0/24 ]" in tor and "protocol bgp peer_172_30_0_2 " in tor


@needs_bird
def test_no_pools_accepts_nothing_and_no_blocks_originates_nothing(tmp_path: Path) -> None:
    bare = DesiredBGP("node-1", Addr("172.30.0.11"), 64512, blocks=(), pools=(), sessions=())
    text = render_bird(bare)
    assert "return false;" in text and " route " not in text
    (tmp_path / "bird.conf").write_text(text)
    assert_bird_accepts(tmp_path / "bird.conf")


def test_equal_input_renders_equal_text() -> None:
    assert render_bird(state("bird_tor.conf")) == render_bird(state("bird_tor.conf"))


SHOW_PROTOCOLS = [
    b"2002-Name       Proto      Table      State  Since         Info\n",
    b"1002-device1    Device     ---        up     16:17:24.068  \n",
    b" trellis_kernel Kernel     master4    up     16:17:24.068  \n",
    b" peer_172_30_0_1 BGP        ---        start  16:17:26.057  Active        Socket: Connection refused\n",
    b" rr_172_30_0_11 BGP        ---        up     16:17:25.842  Established   \n",
    b"0000 \n",
]


@pytest.fixture
def fake_bird(tmp_path: Path) -> Iterator[tuple[Path, list[str]]]:
    """A unix socket that greets as BIRD and answers `show protocols`, or refuses anything else."""
    path = tmp_path / "bird.ctl"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    received: list[str] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn, conn.makefile("rwb") as stream:
                stream.write(b"0001 BIRD 2.0.12 ready.\n")
                stream.flush()
                command = stream.readline().decode().strip()
                received.append(command)
                if command == "show protocols":
                    stream.write(b"".join(SHOW_PROTOCOLS))
                else:
                    stream.write(b"9001 syntax error, unexpected CF_SYM_UNDEFINED\n")
                stream.flush()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, received
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    thread.join(timeout=5)


def test_control_reads_continued_replies(fake_bird: tuple[Path, list[str]]) -> None:
    path, received = fake_bird
    protocols = parse_protocols(BirdControl(path).command("show protocols"))
    assert received == ["show protocols"]
    assert [p.name for p in protocols] == ["device1", "trellis_kernel", "peer_172_30_0_1", "rr_172_30_0_11"]
    assert protocols[2] == ProtocolState(
        "peer_172_30_0_1", "BGP", "---", "start", "16:17:26.057", "Active        Socket: Connection refused"
    )
    assert [p.established for p in protocols] == [False, False, False, True]


def test_control_raises_on_a_refusal_code(fake_bird: tuple[Path, list[str]]) -> None:
    path, _ = fake_bird
    with pytest.raises(BirdError, match=r"BIRD refused 'bogus': syntax error"):
        BirdControl(path).command("bogus")


def test_control_raises_oserror_when_bird_is_not_there(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        BirdControl(tmp_path / "none.ctl").command("show status")
