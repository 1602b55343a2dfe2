"""The CNI protocol, spec 1.1.0: error codes, request validation and results per version.

Pure code: it turns the CNI environment and stdin into a validated `CniRequest`, or a
`CniError` with the spec's code and a message naming what is wrong and where; and it renders
results in the schema of the version the runtime asked for. The agent does the work between.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from trellis.cni.client import SUPPORTED_VERSIONS, error_json
from trellis.model.ipam import Attachment

PLUGIN_TYPE = "trellis"
COMMANDS = ("ADD", "DEL", "CHECK", "GC", "STATUS", "VERSION")


class Code(IntEnum):
    """CNI error codes: 1-99 as the spec defines them, 100 and up Trellis' own."""

    INCOMPATIBLE_VERSION = 1
    UNSUPPORTED_FIELD = 2
    UNKNOWN_CONTAINER = 3
    INVALID_ENVIRONMENT = 4
    IO_FAILURE = 5
    DECODE_FAILURE = 6
    INVALID_CONFIG = 7
    TRY_AGAIN_LATER = 11
    NOT_AVAILABLE = 50
    # Trellis' own codes.
    ADDRESSES_EXHAUSTED = 100
    """No free address in any block the node holds or can claim (permanent until pods go)."""
    CHECK_FAILED = 101
    """CHECK found the attachment differs from what ADD made."""
    KERNEL_FAILURE = 102
    """The kernel refused a change (the message names the object and errno)."""


class CniError(Exception):
    """An error the plugin reports to the runtime as the spec's error JSON."""

    def __init__(self, code: Code, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    @property
    def temporary(self) -> bool:
        return self.code == Code.TRY_AGAIN_LATER

    def to_json(self, version: str) -> str:
        return error_json(int(self.code), self.msg, self.details, version)


@dataclass(frozen=True)
class CniRequest:
    """A validated CNI invocation."""

    command: str
    version: str
    network: str
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: dict[str, str] = field(default_factory=dict)
    mtu: int = 0
    """Pod interface MTU from the config; 0 means the agent's default."""
    prev_result: dict[str, Any] | None = None
    valid_attachments: tuple[Attachment, ...] = ()
    """GC only: every attachment the runtime still holds."""

    @property
    def attachment(self) -> Attachment:
        return Attachment(self.container_id, self.ifname)

    @property
    def pod(self) -> str:
        """`namespace/name` from the Kubernetes CNI_ARGS, or the container ID."""
        ns, name = self.args.get("K8S_POD_NAMESPACE"), self.args.get("K8S_POD_NAME")
        return f"{ns}/{name}" if ns and name else self.container_id[:12]


_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
_IFNAME_FORBIDDEN = re.compile(r"[/:\s]")
# Variables each command needs, as the reference skel requires them.
_REQUIRED_ENV = {
    "ADD": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "CHECK": ("CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_PATH"),
    "DEL": ("CNI_CONTAINERID", "CNI_IFNAME", "CNI_PATH"),
    "GC": ("CNI_PATH",),
    "STATUS": ("CNI_PATH",),
    "VERSION": (),
}


def error_version(stdin: bytes) -> str:
    """The config's cniVersion if it can be read, for shaping an error; else 1.1.0."""
    try:
        version = json.loads(stdin).get("cniVersion")
    except (ValueError, RecursionError, AttributeError):
        return "1.1.0"
    return version if isinstance(version, str) and version in SUPPORTED_VERSIONS else "1.1.0"


def _check_env(env: dict[str, str], command: str) -> None:
    for name in _REQUIRED_ENV[command]:
        if not env.get(name):
            raise CniError(Code.INVALID_ENVIRONMENT, f"{name} is missing or empty (needed for {command})")
    container_id = env.get("CNI_CONTAINERID", "")
    if container_id and not _CONTAINER_ID.match(container_id):
        raise CniError(
            Code.INVALID_ENVIRONMENT,
            f"CNI_CONTAINERID {container_id!r} is invalid: use letters, digits, '_', '.' and '-'",
        )
    ifname = env.get("CNI_IFNAME", "")
    if ifname and (len(ifname) > 15 or ifname in (".", "..") or _IFNAME_FORBIDDEN.search(ifname)):
        raise CniError(
            Code.INVALID_ENVIRONMENT,
            f"CNI_IFNAME {ifname!r} is invalid: at most 15 characters, no '/', ':' or spaces",
        )


def _parse_args(text: str) -> dict[str, str]:
    args: dict[str, str] = {}
    for pair in filter(None, text.split(";")):
        key, eq, value = pair.partition("=")
        if not eq or not key:
            raise CniError(Code.INVALID_ENVIRONMENT, f"CNI_ARGS item {pair!r} is not KEY=VALUE")
        args[key] = value
    return args


def _choose_version(conf: dict[str, Any]) -> str:
    declared = conf.get("cniVersion")
    if not isinstance(declared, str):
        raise CniError(Code.INVALID_CONFIG, f"config key cniVersion must be a string, got {declared!r}")
    if declared in SUPPORTED_VERSIONS:
        return declared
    raise CniError(
        Code.INCOMPATIBLE_VERSION,
        f"config cniVersion {declared!r} is not supported",
        f"supported: {', '.join(SUPPORTED_VERSIONS)}",
    )


def _parse_attachments(conf: dict[str, Any]) -> tuple[Attachment, ...]:
    key = "cni.dev/valid-attachments" if "cni.dev/valid-attachments" in conf else "cni.dev/attachments"
    items = conf.get(key, [])
    if not isinstance(items, list):
        raise CniError(Code.INVALID_CONFIG, f"config key {key} must be a list, got {type(items).__name__}")
    out = []
    for i, item in enumerate(items):
        cid = item.get("containerID") if isinstance(item, dict) else None
        ifname = item.get("ifname") if isinstance(item, dict) else None
        if not isinstance(cid, str) or not isinstance(ifname, str):
            raise CniError(
                Code.INVALID_CONFIG, f"config key {key}[{i}] needs string containerID and ifname: {item!r}"
            )
        out.append(Attachment(cid, ifname))
    return tuple(out)


def parse_request(env: dict[str, str], stdin: bytes) -> CniRequest:
    """Validate one invocation; raises CniError naming the variable or key at fault."""
    command = env.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        raise CniError(
            Code.INVALID_ENVIRONMENT,
            f"CNI_COMMAND {command!r} is not one of {', '.join(COMMANDS)}",
        )
    _check_env(env, command)
    try:
        conf = json.loads(stdin)
    except (ValueError, RecursionError) as err:  # RecursionError: nested deeper than the decoder goes
        raise CniError(Code.DECODE_FAILURE, f"network config on stdin is not JSON: {err}") from None
    if not isinstance(conf, dict):
        raise CniError(
            Code.DECODE_FAILURE, f"network config must be a JSON object, got {type(conf).__name__}"
        )
    version = _choose_version(conf)
    name = conf.get("name")
    if not isinstance(name, str) or not _NETWORK_NAME.match(name):
        raise CniError(Code.INVALID_CONFIG, f"config key name {name!r} is not a valid network name")
    plugin_type = conf.get("type")
    if plugin_type != PLUGIN_TYPE:
        raise CniError(
            Code.INVALID_CONFIG, f"config key type is {plugin_type!r}; this plugin is {PLUGIN_TYPE!r}"
        )
    mtu = conf.get("mtu", 0)
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not (mtu == 0 or 576 <= mtu <= 65535):
        raise CniError(Code.INVALID_CONFIG, f"config key mtu {mtu!r} is not an integer in 576..65535")
    prev = conf.get("prevResult")
    if prev is not None and not isinstance(prev, dict):
        raise CniError(Code.INVALID_CONFIG, f"config key prevResult must be an object, got {prev!r}")
    if command == "CHECK" and prev is None:
        raise CniError(Code.INVALID_CONFIG, "config key prevResult is required for CHECK")
    return CniRequest(
        command=command,
        version=version,
        network=name,
        container_id=env.get("CNI_CONTAINERID", ""),
        netns=env.get("CNI_NETNS", ""),
        ifname=env.get("CNI_IFNAME", ""),
        args=_parse_args(env.get("CNI_ARGS", "")),
        mtu=mtu,
        prev_result=prev,
        valid_attachments=_parse_attachments(conf) if command == "GC" else (),
    )


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str
    sandbox: str = ""
    mtu: int = 0


@dataclass(frozen=True)
class AddResult:
    """What ADD made: the host and pod interfaces, the pod's address, gateway and routes."""

    host: Interface
    pod: Interface
    address: ipaddress.IPv4Interface
    gateway: ipaddress.IPv4Address
    routes: tuple[ipaddress.IPv4Network, ...]


def _before_1_0(version: str) -> bool:
    return version.startswith("0.")


def render_result(result: AddResult, version: str) -> dict[str, Any]:
    """The ADD result in the schema of `version` (0.3.0 to 1.1.0)."""
    interfaces: list[dict[str, Any]] = []
    for iface in (result.host, result.pod):
        item: dict[str, Any] = {"name": iface.name, "mac": iface.mac}
        if iface.sandbox:
            item["sandbox"] = iface.sandbox
        if iface.mtu and version == "1.1.0":
            item["mtu"] = iface.mtu
        interfaces.append(item)
    ip: dict[str, Any] = {
        "address": str(result.address),
        "gateway": str(result.gateway),
        "interface": 1,
    }
    if _before_1_0(version):
        ip["version"] = "4"
    return {
        "cniVersion": version,
        "interfaces": interfaces,
        "ips": [ip],
        "routes": [{"dst": str(dst), "gw": str(result.gateway)} for dst in result.routes],
        "dns": {},
    }


def prev_result_address(prev: dict[str, Any]) -> ipaddress.IPv4Interface:
    """The pod address a CHECK's prevResult records (the first IPv4 entry)."""
    ips = prev.get("ips")
    for ip in ips if isinstance(ips, list) else ():
        text = ip.get("address") if isinstance(ip, dict) else None
        try:
            address = ipaddress.ip_interface(text) if isinstance(text, str) else None
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv4Interface):
            return address
    raise CniError(Code.INVALID_CONFIG, "config key prevResult.ips holds no IPv4 address to CHECK")
