"""`trellis kube-sync`: the cluster's objects copied into the agents' etcd (`controller/kubesync.py`).

A bad setting (a kubeconfig that cannot be read, an etcd URL or TLS files that cannot work)
ends the command at once with one line naming it, and status 1. An API server or an etcd that
does not answer is no setting: kube-sync keeps trying, and says so in its log.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from types import FrameType
from typing import Any

from trellis.cli.main import add_etcd_tls_arguments
from trellis.datastore import Datastore, open_datastore
from trellis.datastore.base import ClientTls, DatastoreError

log = logging.getLogger(__name__)


def _open(args: argparse.Namespace, opened: contextlib.ExitStack) -> tuple[Datastore, Datastore]:
    """(the cluster, the target) as the arguments say, each closed with `opened`; DatastoreError
    on a setting that cannot work."""
    from trellis.controller.kubesync import open_cluster

    source = opened.enter_context(contextlib.closing(open_cluster(args.kubeconfig)))
    tls = ClientTls(args.etcd_ca, args.etcd_cert, args.etcd_key)
    target = open_datastore(args.datastore, args.datastore_location, tls=tls)
    return source, opened.enter_context(contextlib.closing(target))


def _stop_on_signal() -> threading.Event:
    """An event that SIGTERM and SIGINT set."""
    stop = threading.Event()

    def stopping(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, stopping)
    signal.signal(signal.SIGINT, stopping)
    return stop


def _kube_sync(args: argparse.Namespace) -> int:
    from trellis.controller.kubesync import run

    with contextlib.ExitStack() as opened:
        try:
            source, target = _open(args, opened)
        except DatastoreError as err:
            print(f"trellis kube-sync: {err}", file=sys.stderr)
            return 1
        where = args.kubeconfig or "the in-cluster service account"
        log.info("following the cluster (%s) into %s %s", where, args.datastore, args.datastore_location)
        run(source, target, _stop_on_signal())
    log.info("kube-sync stopped")
    return 0


def add_kube_sync_parser(sub: Any) -> None:
    text = (
        "copy the cluster's Nodes, Namespaces, Pods, NetworkPolicies and ClusterNetworkPolicies "
        "into the agents' etcd, where they compute policy from them (run one: deploy/kube-sync.yaml)"
    )
    parser: argparse.ArgumentParser = sub.add_parser("kube-sync", help=text, description=text)
    parser.add_argument(
        "--kubeconfig",
        default="",
        metavar="FILE",
        help="the API server's kubeconfig (default: the in-cluster service account)",
    )
    parser.add_argument(
        "--datastore",
        default="etcd",
        choices=["etcd"],
        help="the agents' datastore (etcd, the default: with kubernetes they read the API server themselves)",
    )
    parser.add_argument(
        "--datastore-location", required=True, metavar="URL", help="etcd's URL, such as http://HOST:2379"
    )
    add_etcd_tls_arguments(parser)
    parser.set_defaults(func=_kube_sync)
