"""The lab's top-of-rack router for BGP topology `tor`: Debian's FRR in namespace `trl-<lab>-tor`.

Why FRR: the bgp backend must speak BGP with a router nobody here wrote. FRR's zebra and bgpd
are started by hand, as on a router without a daemon manager (no watchfrr, no systemd), each
with its own config file, pid file and log, a zserv socket between them and a vty socket
directory for `vtysh --vty_socket DIR`, all in the lab's directory `tor/`.

The design (docs/design/bgp.md, "ToR with FRR"):
- the ToR sits on the nodes' subnet (host 253), as a rack's router on its L2 segment, and
  every node peers with it: one global BGPPeer `tor` (AS 65000, a TCP MD5 password, and
  `acceptPrefixes` 192.0.2.0/24). The nodes keep their full mesh. Peering with route
  reflectors only would not do: a reflector passes on pool routes, not the ToR's prefix;
- FRR does not list the nodes: `bgp listen range <subnet>` accepts a session from any address
  of the subnet into peer group NODES (`remote-as external`, the password), so a node that
  joins later peers with no change to FRR. Such dynamic neighbours never connect out: BIRD
  on each node does;
- TCP MD5 is in this kernel (CONFIG_TCP_MD5SIG; TCP-AO is not); the password is made per lab
  and kept in the BGPPeer and in bgpd.conf (mode 0600, owned by frr);
- FRR originates 192.0.2.0/24 (TEST-NET-1): zebra puts 192.0.2.1/24 on `lo` (this kernel has
  no dummy devices; on loopback the whole /24 is local) and bgpd announces it with `network`.
  Route maps take only pool prefixes from the nodes and give them only 192.0.2.0/24 (FRR 8.4
  exchanges nothing on an eBGP session without a policy);
- zebra installs the blocks bgpd learns in the ToR's kernel (`proto bgp`): that is how traffic
  from 192.0.2.0/24 finds pods. (Pod traffic to 192.0.2.0/24 is masqueraded to its node's
  address by the agent, as all egress leaving the cluster, so replies need no pod route.)
- the daemons run as Debian's `frr` user, which owns `tor/` (zebra refuses to run as root:
  root is not in the frrvty group). `lab up` records their PIDs in the state, `lab down`
  SIGTERMs them by PID. FRR keeps a directory /var/tmp/frr/<daemon>.<pid> that it removes on
  a clean exit; the lab removes that of a daemon it had to SIGKILL.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trellis.agent.config import AgentConfig
from trellis.calc.bgp import Role, Session
from trellis.lab import fabric
from trellis.lab.errors import LabError
from trellis.lab.kube import KubeObject
from trellis.lab.process import ProcessRef, in_netns, log_tail, stop, wait_until
from trellis.lab.state import MAX_NODES, LabPaths, LabState, save, tor_netns
from trellis.model.bgp import API_VERSION, parse_peer

FRR_BIN = Path("/usr/lib/frr")
FRR_USER = "frr"
FRR_TMP = Path("/var/tmp/frr")
"""Where FRR keeps a directory per running daemon (`<daemon>.<pid>`), outside any config."""
DAEMONS = ("zebra", "bgpd")
"""Started in this order: bgpd hands zebra the routes it learns."""
TOR_HOST = 253
"""The ToR's address is this host of the lab's subnet: above every node's, below the external host's."""
TOR_ASN = 65000
PEER_NAME = "tor"
"""The BGPPeer every node peers with the ToR through."""
ORIGINATED = ipaddress.IPv4Interface("192.0.2.1/24")
"""The ToR's address on `lo`; it originates the whole network (TEST-NET-1, RFC 5737)."""
LISTEN_LIMIT = MAX_NODES
"""Sessions the ToR accepts from its listen range: one per node."""
READY_S = 15.0
"""How long zebra and bgpd may take to open their vty sockets (seconds)."""
STOP_GRACE_S = 5.0


@dataclass(frozen=True)
class Tor:
    """The ToR of a lab: where it is and what it peers with (the password only at `up`)."""

    netns: str
    address: ipaddress.IPv4Interface
    """On the nodes' subnet; also FRR's router ID."""
    pools: tuple[ipaddress.IPv4Network, ...]
    """The pod pools: FRR takes these prefixes, and anything inside, from the nodes."""
    password: str = ""

    @classmethod
    def of(cls, state: LabState, password: str = "") -> Tor:
        subnet = state.subnets[0]
        address = ipaddress.IPv4Interface(f"{subnet.network_address + TOR_HOST}/{subnet.prefixlen}")
        # The lab starts its agents with the default pools (AgentConfig's).
        return cls(tor_netns(state.name), address, AgentConfig(node=state.name).pools, password)


def tor_dir(paths: LabPaths) -> Path:
    return paths.dir / "tor"


def vty_dir(paths: LabPaths) -> Path:
    """Pass to `vtysh --vty_socket`."""
    return tor_dir(paths) / "vty"


def render_zebra(tor: Tor) -> str:
    return f"""\
! zebra of the lab's ToR ({tor.netns}), written by `trellis lab up`.
hostname {tor.netns}
interface lo
 ip address {ORIGINATED}
exit
"""


def render_bgpd(tor: Tor) -> str:
    """bgpd.conf: AS TOR_ASN, nodes from the ToR's subnet as dynamic eBGP neighbours (module note)."""
    pools = "".join(
        f"ip prefix-list TRL-PODS seq {5 * n} permit {pool} le 32\n" for n, pool in enumerate(tor.pools, 1)
    )
    password = f" neighbor NODES password {tor.password}\n" if tor.password else ""
    return f"""\
! bgpd of the lab's ToR ({tor.netns}), written by `trellis lab up`.
hostname {tor.netns}
router bgp {TOR_ASN}
 bgp router-id {tor.address.ip}
 neighbor NODES peer-group
 neighbor NODES remote-as external
{password} bgp listen limit {LISTEN_LIMIT}
 bgp listen range {tor.address.network} peer-group NODES
 address-family ipv4 unicast
  network {ORIGINATED.network}
  neighbor NODES route-map TRL-FROM-NODES in
  neighbor NODES route-map TRL-TO-NODES out
 exit-address-family
exit
{pools}ip prefix-list TRL-ORIGINATED seq 5 permit {ORIGINATED.network}
route-map TRL-FROM-NODES permit 10
 match ip address prefix-list TRL-PODS
exit
route-map TRL-TO-NODES permit 10
 match ip address prefix-list TRL-ORIGINATED
exit
"""


def peer_object(tor: Tor) -> KubeObject:
    """The BGPPeer that makes every node peer with the ToR and take its prefix."""
    body: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "BGPPeer",
        "metadata": {"name": PEER_NAME},
        "spec": {
            "peerIP": str(tor.address.ip),
            "asNumber": TOR_ASN,
            "password": tor.password,
            "acceptPrefixes": [str(ORIGINATED.network)],
        },
    }
    return parse_peer(body).key, body


def _frr_user() -> pwd.struct_passwd:
    try:
        user = pwd.getpwnam(FRR_USER)
    except KeyError:
        raise LabError(f"BGP topology tor needs Debian's frr (no user {FRR_USER!r} here)") from None
    missing = [d for d in DAEMONS if not (FRR_BIN / d).exists()]
    if missing:
        raise LabError(f"BGP topology tor needs Debian's frr ({FRR_BIN / missing[0]} is missing)")
    return user


def _write(path: Path, text: str, user: pwd.struct_passwd) -> None:
    """`text` into `path`, mode 0600, owned by the frr user (bgpd.conf holds the password)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chown(path, user.pw_uid, user.pw_gid)


def _command(paths: LabPaths, daemon: str) -> list[str]:
    directory = tor_dir(paths)
    return [
        str(FRR_BIN / daemon),
        *("-f", str(directory / f"{daemon}.conf")),
        *("-i", str(directory / f"{daemon}.pid")),
        *("-z", str(directory / "zserv.api")),
        *("--vty_socket", str(vty_dir(paths))),
        *("-P", "0"),  # no vty TCP port: vtysh goes through the socket directory
        *("--log", "stdout"),
    ]


def _start(paths: LabPaths, tor: Tor, daemon: str) -> ProcessRef:
    log_path = tor_dir(paths) / f"{daemon}.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            _command(paths, daemon),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            preexec_fn=in_netns(tor.netns),  # noqa: PLW1509 (no other thread runs meanwhile)
            start_new_session=True,
        )
    try:
        return ProcessRef.of(proc.pid)
    except ProcessLookupError:
        proc.wait()
        raise LabError(f"ToR {daemon} exited at once ({log_tail(log_path)})") from None


def start_tor(paths: LabPaths, state: LabState) -> KubeObject:
    """The ToR: namespace on the fabric, zebra and bgpd running (recorded in the state), ready.

    Returns the BGPPeer for the nodes to store. LabError if a daemon exits or is not ready
    within READY_S; what was started is recorded, and `remove_tor` removes it.
    """
    user = _frr_user()
    tor = Tor.of(state, password=secrets.token_urlsafe(12))
    fabric.add_router(state.fabric_netns, tor.netns, tor.address)
    directory = tor_dir(paths)
    vty_dir(paths).mkdir(parents=True)
    for path in (directory, vty_dir(paths)):
        os.chown(path, user.pw_uid, user.pw_gid)
        path.chmod(0o750)
    _write(directory / "zebra.conf", render_zebra(tor), user)
    _write(directory / "bgpd.conf", render_bgpd(tor), user)
    for daemon in DAEMONS:
        state.tor_daemons[daemon] = _start(paths, tor, daemon)
        save(paths, state)

    def ready() -> bool:
        for daemon, ref in state.tor_daemons.items():
            if not ref.alive():
                raise LabError(f"ToR {daemon} exited ({log_tail(directory / f'{daemon}.log')})")
        return all((vty_dir(paths) / f"{daemon}.vty").exists() for daemon in DAEMONS)

    if not wait_until(ready, READY_S, poll_s=0.05):
        raise LabError(f"ToR: FRR not ready after {READY_S:.0f} s (no vty socket in {vty_dir(paths)})")
    return peer_object(tor)


def remove_tor(state: LabState) -> None:
    """Stop the ToR's daemons by PID (SIGTERM: bgpd closes its sessions), remove its namespace."""
    stop(state.tor_daemons.values(), grace_s=STOP_GRACE_S)
    for daemon, ref in state.tor_daemons.items():
        shutil.rmtree(FRR_TMP / f"{daemon}.{ref.pid}", ignore_errors=True)  # left only when killed
    fabric.remove_netns(tor_netns(state.name))


def status(paths: LabPaths, state: LabState, sessions: dict[str, list[dict[str, str]]]) -> dict[str, Any]:
    """`lab status` of the ToR: where it is, its daemons, and each node's session with it as the
    node's BIRD reports it (`sessions`: every node's sessions by node name)."""
    tor = Tor.of(state)
    running = {daemon: ref.pid for daemon, ref in state.tor_daemons.items() if ref.alive()}
    return {
        "netns": tor.netns,
        "ip": str(tor.address.ip),
        "asn": TOR_ASN,
        "originates": str(ORIGINATED.network),
        "vty_socket_dir": str(vty_dir(paths)),
        **{f"{daemon}_pid": running.get(daemon) for daemon in DAEMONS},
        "sessions": [
            {"node": node, **session}
            for node, rows in sessions.items()
            for session in rows
            if session["name"] == session_name(tor)
        ],
    }


def session_name(tor: Tor) -> str:
    """BIRD's name for a node's session with the ToR (`calc.bgp.Session.name`)."""
    return Session(Role.PEER, tor.address.ip, TOR_ASN, PEER_NAME).name


def summary(paths: LabPaths, state: LabState) -> str:
    """One line for `lab status`: the ToR, its daemons and how to ask FRR."""
    tor = Tor.of(state)
    pids = ", ".join(
        f"{daemon} pid {ref.pid if ref.alive() else '-'}" for daemon, ref in state.tor_daemons.items()
    )
    return (
        f"ToR {tor.netns}: {tor.address.ip} AS {TOR_ASN}, originates {ORIGINATED.network}; "
        f"FRR {pids or 'not started'}; vtysh --vty_socket {vty_dir(paths)}"
    )
