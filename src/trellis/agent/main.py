"""`trellis agent`: the node agent. Restartable at any moment; it never flushes pod state on start."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from trellis.agent.cni_service import CniService
from trellis.agent.config import AgentConfig
from trellis.agent.server import CniServer
from trellis.dataplane.kernel.pods import PodNetwork
from trellis.datastore import open_datastore
from trellis.ipam.allocator import Ipam

log = logging.getLogger(__name__)


def run_agent(config: AgentConfig) -> None:
    """Serve until SIGTERM or SIGINT."""
    store = open_datastore(config.datastore, config.datastore_path)
    ipam = Ipam(store, config.node, config.pools, config.block_prefixlen)
    service = CniService(config, ipam, PodNetwork())
    server = CniServer(config.socket, service.handle)

    def stop(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info(
        "agent for node %s serving %s (datastore %s %s, pools %s, pod MTU %d)",
        config.node,
        config.socket,
        config.datastore,
        config.datastore_path,
        ", ".join(map(str, config.pools)),
        service.mtu,
    )
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        store.close()
        log.info("agent for node %s stopped", config.node)
