"""The `trellis` command."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import socket
import sys
from pathlib import Path

from trellis.agent.config import (
    BACKEND_OVERHEAD,
    DEFAULT_HTTP_ADDRESS,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    AgentConfig,
)
from trellis.cni.client import SUPPORTED_VERSIONS
from trellis.cni.install import install


def _agent(args: argparse.Namespace) -> int:
    """Run the agent; a malformed argument exits 2, a datastore or HTTP endpoint it cannot
    use 1, each with one line naming it."""
    from trellis.agent.http import EndpointError
    from trellis.agent.main import run_agent
    from trellis.datastore.base import DatastoreError

    try:
        config = _agent_config(args)
    except ValueError as err:
        print(f"trellis agent: {err}", file=sys.stderr)
        return 2
    try:
        run_agent(config)
    except (DatastoreError, EndpointError) as err:
        print(f"trellis agent: {err}", file=sys.stderr)
        return 1
    return 0


def _agent_config(args: argparse.Namespace) -> AgentConfig:
    return AgentConfig(
        node=args.node,
        socket=args.socket,
        state_dir=args.state_dir,
        datastore=args.datastore,
        datastore_location=args.datastore_location,
        etcd_ca=args.etcd_ca,
        etcd_cert=args.etcd_cert,
        etcd_key=args.etcd_key,
        pools=tuple(args.pool or [ipaddress.IPv4Network("10.244.0.0/16")]),
        block_prefixlen=args.block_size,
        backend=args.backend,
        mtu=args.mtu,
        policy=args.policy == "on",
        http_address=args.http_address,
    )


def _install_cni(args: argparse.Namespace) -> int:
    plugin, conf = install(args.bin_dir, args.conf_dir, args.socket, args.mtu, args.chain, args.cni_version)
    print(f"installed {plugin} and {conf}")
    return 0


def add_etcd_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """--etcd-ca, --etcd-cert and --etcd-key: the PEM files of an etcd reached over https://."""
    for flag, what in (
        ("--etcd-ca", "CA bundle that signs etcd's server certificate (default: the system's CAs)"),
        ("--etcd-cert", "client certificate for an etcd that requires one (with --etcd-key)"),
        ("--etcd-key", "private key of --etcd-cert"),
    ):
        parser.add_argument(flag, type=Path, metavar="FILE", help=f"etcd over https://: PEM {what}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trellis", description="Trellis Kubernetes network plugin")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    agent = sub.add_parser("agent", help="run the node agent")
    agent.add_argument("--node", default=socket.gethostname(), help="node name (default: host name)")
    agent.add_argument(
        "--socket", type=Path, default=DEFAULT_SOCKET, help=f"CNI socket (default {DEFAULT_SOCKET})"
    )
    agent.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    agent.add_argument("--datastore", default="sqlite", choices=["sqlite", "etcd", "kubernetes"])
    agent.add_argument(
        "--datastore-location",
        default="",
        help="sqlite: the file (default STATE_DIR/trellis.db); etcd: a URL such as http://HOST:2379; "
        "kubernetes: a kubeconfig file (default: the in-cluster service account)",
    )
    add_etcd_tls_arguments(agent)
    agent.add_argument("--pool", type=ipaddress.IPv4Network, action="append", help="IP pool (repeatable)")
    agent.add_argument("--block-size", type=int, default=26, help="block prefix length (default 26)")
    agent.add_argument("--backend", default="vxlan", choices=sorted(BACKEND_OVERHEAD))
    agent.add_argument("--mtu", type=int, default=0, help="pod MTU (default: uplink MTU less overhead)")
    agent.add_argument(
        "--policy",
        choices=["on", "off"],
        default="on",
        help="enforce NetworkPolicy (default on: a Kubernetes pod without a Pod object is then dropped; "
        "attachments without Kubernetes arguments, such as podman's, stay open)",
    )
    agent.add_argument(
        "--http-address",
        default=DEFAULT_HTTP_ADDRESS,
        help=f"HOST:PORT of /metrics, /healthz and /readyz (default {DEFAULT_HTTP_ADDRESS}; '' disables)",
    )
    agent.set_defaults(func=_agent)

    inst = sub.add_parser("install-cni", help="install the CNI plugin and conflist for a runtime")
    inst.add_argument("--bin-dir", type=Path, default=Path("/opt/cni/bin"))
    inst.add_argument("--conf-dir", type=Path, default=Path("/etc/cni/net.d"))
    inst.add_argument("--socket", type=Path, default=DEFAULT_SOCKET)
    inst.add_argument("--mtu", type=int, default=0)
    inst.add_argument(
        "--chain", action="store_true", help="chain the reference portmap and bandwidth plugins"
    )
    inst.add_argument(
        "--cni-version",
        default="1.1.0",
        choices=SUPPORTED_VERSIONS,
        help="conflist cniVersion (1.0.0 for Debian's plugins and podman 4.3)",
    )
    inst.set_defaults(func=_install_cni)

    from trellis.cli.kubesync import add_kube_sync_parser
    from trellis.cli.policy import add_policy_parser
    from trellis.cli.status import add_status_parser
    from trellis.lab.cli import add_lab_parser

    add_lab_parser(sub)
    add_policy_parser(sub)
    add_status_parser(sub)
    add_kube_sync_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    sys.exit(args.func(args))
