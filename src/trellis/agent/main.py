"""`trellis agent`: the node agent. Restartable at any moment; it never flushes pod state on start."""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType

from trellis.agent.cni_service import CniService
from trellis.agent.config import AgentConfig
from trellis.agent.http import serving
from trellis.agent.metrics import AgentMetrics
from trellis.agent.network import NetworkController
from trellis.agent.server import CniServer
from trellis.dataplane.kernel.netlink import SocketPool, find_uplink
from trellis.dataplane.kernel.pods import PodNetwork
from trellis.datastore import open_datastore
from trellis.ipam.allocator import Ipam

log = logging.getLogger(__name__)

DEFAULT_UPLINK_MTU = 1500
ROOT_ONLY_UMASK = 0o077
"""Every file and directory the agent creates (the datastore, status.json, BIRD's files through
its child process, a new state directory) is for its owner, root, alone."""


def run_agent(config: AgentConfig) -> None:
    """Serve until SIGTERM or SIGINT.

    Stopping does not leave the cluster: a restarted agent (an upgrade, a crash) re-registers
    well within the node lease's TTL and peers keep their routes. Removing a node is an
    operation on the datastore (as deleting a Node object is in Kubernetes).
    """
    os.umask(ROOT_ONLY_UMASK)
    store = open_datastore(config.datastore, config.datastore_path, tls=config.datastore_tls)
    ipam = Ipam(store, config.node, config.pools, config.block_prefixlen)
    pool = SocketPool()
    uplink = find_uplink(pool, config.uplink)
    mtu = config.pod_mtu(uplink.mtu if uplink else DEFAULT_UPLINK_MTU)
    service = CniService(config, ipam, PodNetwork(pool), mtu)
    metrics = AgentMetrics({"node": config.node, "backend": config.backend, "datastore": config.datastore})
    server = CniServer(config.socket, metrics.instrument_cni(service.handle))
    network: NetworkController | None = None
    if uplink is None or uplink.address is None:
        log.error(
            "no uplink with an IPv4 address (%s): no routes to other nodes, no policy, no egress masquerade",
            config.uplink or "default route",
        )
    else:
        network = NetworkController(
            config, store, ipam, pool, (uplink.name, uplink.address), mtu, metrics=metrics
        )
        network.start()

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "agent for node %s serving %s (datastore %s %s, backend %s, pools %s, pod MTU %d)",
        config.node,
        config.socket,
        config.datastore,
        config.datastore_path,
        config.backend,
        ", ".join(map(str, config.pools)),
        mtu,
    )
    try:
        with serving(config.http_endpoint, metrics, network):
            server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if network is not None:
            network.stop()
        store.close()
        log.info("agent for node %s stopped", config.node)
