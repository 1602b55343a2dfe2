"""`bird.conf` for one node, from its DesiredBGP (pure). Written for BIRD 2.0.12 (Debian bird2).

Why each construct (docs/design/bgp.md has the full argument):
- the node's blocks are `blackhole` routes of `protocol static`, as Calico does: BGP advertises
  them from there, and in the kernel the pods' /32 routes (proto 222) win by longest match
  while traffic for a free address of the block stops at the node instead of following the
  default route back out;
- `protocol kernel` exports BGP routes and those blackholes into the main table, where BIRD
  marks them `proto bird`; it learns nothing from the kernel (`learn off`, `import none`).
  `persist` leaves them in place when BIRD stops, and `graceful restart` makes a BIRD started
  with `-R` wait until its sessions have sent everything again before it prunes, so a BIRD
  restart never empties the kernel's table;
- every session is `direct` (one L2 segment, as host-gw): iBGP would otherwise be multihop,
  whose recursive next hops need routes BIRD does not learn here. Next hops need no
  `next hop self`: BIRD sends its own address for the routes it originates, and a reflector
  must keep the originating node's address so that traffic goes straight to it;
- graceful restart is on for every session, so peers keep a restarting node's routes; the
  long-lived variant is not: a node that stays away is removed by the datastore, and then
  its routes must go at once;
- imports take pool prefixes (never inside the node's own blocks) and, from an external
  peer, the prefixes its BGPPeer accepts; exports are the node's own blocks, and on a route
  reflector also the pool routes it reflects to its clients.
Equal input gives equal text (sessions are sorted), so the supervisor skips a reconfigure
when nothing changed.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from trellis.calc.bgp import DesiredBGP, Role, Session

STATIC_PROTOCOL = "trellis_blocks"
KERNEL_PROTOCOL = "trellis_kernel"
TEMPLATE = "trellis_session"
POD_ROUTE = "trellis_pod_route"
RECOVERY_WAIT_S = 15
"""How long a BIRD started with `-R` waits for its sessions before it syncs the kernel anyway.
BIRD's default is 240 s, and until then it holds back every kernel change: while a peer stays
down, and (2.0.12) after `configure` removed a session that had not come up again. Sessions
come back within about 1 s here."""
SCAN_TIME_S = 10
"""Seconds between BIRD's scans of interfaces and of the kernel table, repairing what others changed."""
CONNECT_DELAY_S = 1
"""Seconds from a session's start to its first connection attempt, less up to a quarter (RFC
4271's jitter): the bulk of a joining node's wait for its routes. 1 is BIRD's least (it
raises 0 to 1). Calico's 2 s keep both ends from connecting at once; here only one end of a
session between nodes connects (the other is `passive`), the ToR never does, and a collision
with any other peer is resolved by BGP itself (RFC 4271 6.8)."""
OWN_BLOCKS = f'proto = "{STATIC_PROTOCOL}"'
REFLECTED = f"source = RTS_BGP && {POD_ROUTE}()"


def render_bird(desired: DesiredBGP) -> str:
    sections = [
        _header(desired),
        _pod_route(desired),
        _device(),
        _static(desired.blocks),
        _kernel(),
        _template(desired),
        *(_session(session, desired) for session in desired.sessions),
    ]
    return "\n".join(sections)


def _header(desired: DesiredBGP) -> str:
    return f"""\
# BIRD 2 configuration of node {desired.node}, rendered by the Trellis agent: do not edit.
# Changes are applied with `birdc configure`; docs/design/bgp.md explains every part.

router id {desired.address};
log stderr all;
graceful restart wait {RECOVERY_WAIT_S};
"""


def _pod_route(desired: DesiredBGP) -> str:
    """Pool prefixes, except inside this node's own blocks (a peer cannot take those over)."""
    condition = "false"
    if desired.pools:
        condition = f"net ~ {_prefix_set(desired.pools, longer=True)}"
        if desired.blocks:
            condition += f" && !(net ~ {_prefix_set(desired.blocks, longer=True)})"
    return f"""\
function {POD_ROUTE}()
{{
  return {condition};
}}
"""


def _device() -> str:
    return f"""\
protocol device {{
  scan time {SCAN_TIME_S};
}}
"""


def _static(blocks: Iterable[ipaddress.IPv4Network]) -> str:
    routes = "".join(f"  route {block} blackhole;\n" for block in blocks)
    return f"""\
# The node's blocks: advertised from here; in the kernel the pods' /32 routes win over them.
protocol static {STATIC_PROTOCOL} {{
  ipv4;
{routes}}}
"""


def _kernel() -> str:
    return f"""\
# BGP routes and the blackholes into the main table (proto bird), kept when BIRD stops.
protocol kernel {KERNEL_PROTOCOL} {{
  ipv4 {{
    import none;
    export where source = RTS_BGP || {OWN_BLOCKS};
  }};
  learn off;
  persist;
  graceful restart;
  scan time {SCAN_TIME_S};
}}
"""


def _template(desired: DesiredBGP) -> str:
    return f"""\
template bgp {TEMPLATE} {{
  local {desired.address} as {desired.asn};
  direct;
  graceful restart on;
  graceful restart time {desired.graceful_restart_s};
  connect delay time {CONNECT_DELAY_S};
  connect retry time 5;
  error wait time 5, 30;
  debug {{ states }};
  ipv4 {{
    import where {POD_ROUTE}();
    export where {OWN_BLOCKS};
  }};
}}
"""


def _session(session: Session, desired: DesiredBGP) -> str:
    options = [f"neighbor {session.neighbor} as {session.neighbor_asn};"]
    channel = []
    if session.passive:
        options.append("passive on;")
    if session.password:
        options.append(f'password "{session.password}";')
    if session.role is Role.CLIENT:
        options += ["rr client;", f"rr cluster id {desired.cluster_id};"]
        channel.append(f"export where {OWN_BLOCKS} || ({REFLECTED});")
    if session.accept:
        channel.append(f"import where {POD_ROUTE}() || net ~ {_prefix_set(session.accept, longer=False)};")
    if channel:
        options += ["ipv4 {", *(f"  {line}" for line in channel), "};"]
    body = "".join(f"  {option}\n" for option in options)
    about = "".join(c for c in f"{session.role} {session.peer}" if c.isprintable())
    return f"protocol bgp {session.name} from {TEMPLATE} {{  # {about}\n{body}}}\n"


def _prefix_set(networks: Iterable[ipaddress.IPv4Network], longer: bool) -> str:
    """A BIRD prefix set: each network exactly, or with everything inside it (`+`)."""
    suffix = "+" if longer else ""
    return "[ " + ", ".join(f"{network}{suffix}" for network in networks) + " ]"
