"""Names of the kernel objects Trellis owns: all carry the `trl` prefix."""

from __future__ import annotations

import hashlib

from trellis.model.ipam import Attachment

PREFIX = "trl"
HOST_VETH_HEX = 11
"""Hex characters of the attachment hash in a host veth name (3 + 11 = 14 < IFNAMSIZ)."""
ROUTE_PROTOCOL = 222
"""`proto` number of every route Trellis installs (outside the kernel's and BIRD's numbers)."""
POD_GATEWAY = "169.254.1.1"
"""The link-local next hop every pod routes through; the host veth answers for it by proxy ARP."""


def host_veth_name(attachment: Attachment) -> str:
    digest = hashlib.sha256(f"{attachment.container_id}/{attachment.ifname}".encode()).hexdigest()
    return PREFIX + digest[:HOST_VETH_HEX]


def is_host_veth_name(name: str) -> bool:
    hexpart = name[len(PREFIX) :]
    return (
        name.startswith(PREFIX)
        and len(hexpart) == HOST_VETH_HEX
        and all(c in "0123456789abcdef" for c in hexpart)
    )
