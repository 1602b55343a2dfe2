"""kube-sync: the cluster's objects, from the fake API server (`kube_fake`: no API server can run
here), into a real etcd (Debian's etcd-server, `datastore_backends.etcd_url`), through the same
parts `trellis kube-sync` wires together.

The oracle for what the target must hold is the `kubernetes` datastore itself: a snapshot of
`/trellis/k8s/` read from the same server by another store, which is what the agents get on a
cluster. Writes are counted by etcd's own revision, which every put and delete moves by one.
"""

from __future__ import annotations

import copy
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx2
import pytest

from tests.helpers import wait_until
from tests.unit.kube_fake import KUBECONFIG, FakeApiServer, fixture, no_watch_threads
from tests.unit.policy_cluster import ALL_NAMESPACES, admin, from_
from trellis.calc.policy import read_policy_inputs
from trellis.cli.main import build_parser
from trellis.controller.kubesync import Mirror, Tally, open_cluster, run
from trellis.datastore.base import KV, Event
from trellis.datastore.etcd import EtcdDatastore
from trellis.datastore.kube_resources import resources_under
from trellis.datastore.kubernetes import KubernetesDatastore
from trellis.datastore.syncer import Syncer
from trellis.model.k8s import K8S_PREFIX, NAMESPACE_PREFIX, NETWORK_POLICY_PREFIX, POD_PREFIX

pytest_plugins = ["tests.unit.datastore_backends"]

WAIT_S = 15.0
READ = resources_under(K8S_PREFIX)
"""The five kinds kube-sync reads, and all its RBAC grants."""
OUTSIDE = "/trellis/ipam/blocks/10.244.1.0-26"
"""A key of the agents' own, outside `/trellis/k8s/`: kube-sync leaves it alone."""
STALE = POD_PREFIX + "demo/gone"
"""A Pod the target holds and the cluster does not (left by an earlier run)."""
NEW_POD = "demo/web-5d8f7c9b6-n3w9p"


def _listed(name: str) -> list[dict[str, Any]]:
    """The items of a recorded list, with the kind and apiVersion list items come without."""
    listing = fixture(name)
    kind = listing["kind"].removesuffix("List")
    return [{"kind": kind, "apiVersion": listing["apiVersion"], **item} for item in listing["items"]]


CNP = {
    "apiVersion": "policy.networking.k8s.io/v1beta1",
    **admin("trl-deny-demo", 10, ALL_NAMESPACES, ingress=[from_("Deny", {"namespaces": {}})]),
}


class Cluster:
    """The fake API server with the recorded Node, Namespaces, Pods and NetworkPolicy and one
    ClusterNetworkPolicy, serving those kinds and the agents' Leases (not Trellis' own kinds);
    the path of every request kube-sync's stores make is kept."""

    def __init__(self) -> None:
        self.server = FakeApiServer(served=(*(r.plural for r in READ), "leases"))
        self.paths: list[str] = []
        self.transport = httpx2.MockTransport(self._handle)
        listed = ("namespaces.json", "pods.json", "networkpolicies.json")
        for obj in [fixture("node.json"), *(item for name in listed for item in _listed(name))]:
            self.server.apply(obj)
        self.server.apply(copy.deepcopy(CNP))

    def _handle(self, request: httpx2.Request) -> httpx2.Response:
        self.paths.append(request.url.path.strip("/"))
        return self.server.handle(request)

    def store(self) -> KubernetesDatastore:
        """A source as `trellis kube-sync` opens it, on this server."""
        return open_cluster(str(KUBECONFIG), transport=self.transport)

    def objects(self) -> dict[str, dict[str, Any]]:
        """`/trellis/k8s/` as the `kubernetes` datastore hands it to the agents (the oracle)."""
        store = KubernetesDatastore(str(KUBECONFIG), transport=self.server.transport)
        try:
            return {kv.key: kv.value for kv in store.snapshot(K8S_PREFIX).items}
        finally:
            store.close()


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.server.shutdown()
        wait_until(no_watch_threads, WAIT_S, "the watch threads to end")


@pytest.fixture
def target(etcd_url: str) -> Iterator[EtcdDatastore]:
    """The real etcd, under a key prefix of this test's own."""
    store = EtcdDatastore(etcd_url, prefix=f"/trlks-{uuid.uuid4().hex}")
    try:
        yield store
    finally:
        store.close()


class RecordingMirror(Mirror):
    """kube-sync's Mirror, keeping what each snapshot and each batch of events did."""

    def __init__(self, target: EtcdDatastore) -> None:
        super().__init__(target)
        self.tallies: list[Tally] = []

    def reconcile(self, items: list[KV]) -> Tally:
        self.tallies.append(super().reconcile(items))
        return self.tallies[-1]

    def apply(self, events: list[Event]) -> Tally:
        self.tallies.append(super().apply(events))
        return self.tallies[-1]


class KubeSync:
    """kube-sync's Syncer and Mirror on a fresh source store (a process start), stepped by hand."""

    def __init__(self, cluster: Cluster, target: EtcdDatastore) -> None:
        self.source = cluster.store()
        self.mirror = RecordingMirror(target)
        self.syncer = Syncer(self.source, K8S_PREFIX, self.mirror, watch_timeout_s=0.2)

    @property
    def tallies(self) -> list[Tally]:
        return self.mirror.tallies

    def step_until(self, condition: Callable[[], bool], what: str) -> None:
        """Step the Syncer until `condition` holds (WAIT_S at most)."""

        def stepped() -> bool:
            if condition():
                return True
            self.syncer.step()
            return False

        wait_until(stepped, WAIT_S, what)

    def close(self) -> None:
        self.source.close()


@pytest.fixture
def kube_sync(cluster: Cluster, target: EtcdDatastore) -> Iterator[KubeSync]:
    sync = KubeSync(cluster, target)
    try:
        yield sync
    finally:
        sync.close()


def restarted(cluster: Cluster, target: EtcdDatastore) -> KubeSync:
    """A new kube-sync (a process start) after its first step, closed."""
    again = KubeSync(cluster, target)
    try:
        again.syncer.step()
    finally:
        again.close()
    return again


def held(target: EtcdDatastore) -> dict[str, dict[str, Any]]:
    return {kv.key: kv.value for kv in target.list(K8S_PREFIX)}


def revision(target: EtcdDatastore) -> int:
    """etcd's revision: one more for every put and every delete."""
    return target.snapshot(K8S_PREFIX).revision


def mirrored(cluster: Cluster, target: EtcdDatastore) -> Callable[[], bool]:
    return lambda: held(target) == cluster.objects()


def test_the_first_snapshot_copies_every_kind_as_the_agents_read_it(
    cluster: Cluster, target: EtcdDatastore, kube_sync: KubeSync, caplog: pytest.LogCaptureFixture
) -> None:
    """One step: every object of the five kinds is in etcd under its key with the value the
    `kubernetes` datastore yields (which the policy calculation parses without an error), a key
    the cluster does not hold is deleted, a key outside `/trellis/k8s/` is left, and the API
    server is asked for the five kinds only (no Leases, no Trellis resources: its RBAC)."""
    target.put(STALE, {"kind": "Pod", "metadata": {"namespace": "demo", "name": "gone"}})
    target.put(OUTSIDE, {"cidr": "10.244.1.0/26"})
    caplog.set_level(logging.INFO, logger="trellis.controller.kubesync")
    kube_sync.syncer.step()
    expected = cluster.objects()
    assert held(target) == expected
    assert {key.split("/")[3] for key in expected} == {r.plural for r in READ}
    assert target.get(OUTSIDE) is not None
    assert kube_sync.tallies == [Tally(put=len(expected), deleted=1)]
    inputs, errors = read_policy_inputs(held(target))
    assert errors == ()
    assert (len(inputs.pods), len(inputs.network_policies), len(inputs.cluster_network_policies)) == (2, 1, 1)
    assert "managedFields" not in held(target)["/trellis/k8s/nodes/trl-worker"]["metadata"]
    assert set(cluster.paths) == {r.collection_path() for r in READ}
    assert f"{len(expected)} objects; {len(expected)} put, 1 deleted, 0 unchanged" in caplog.text


def test_added_modified_and_deleted_objects_follow_one_write_each(
    cluster: Cluster, target: EtcdDatastore, kube_sync: KubeSync
) -> None:
    """After the snapshot, a new Pod, a relabelled Namespace and a deleted NetworkPolicy reach
    etcd as two puts and one delete, and nothing else is written."""
    kube_sync.syncer.step()
    before = revision(target)
    pod = _listed("pods.json")[0]
    pod["metadata"] = {**pod["metadata"], "name": NEW_POD.split("/")[1], "uid": str(uuid.uuid4())}
    namespace = _listed("namespaces.json")[1]
    namespace["metadata"]["labels"]["team"] = "payments"
    cluster.server.apply(pod)
    cluster.server.apply(namespace)
    cluster.server.remove(_listed("networkpolicies.json")[0])
    kube_sync.step_until(mirrored(cluster, target), "the three changes to reach etcd")
    assert revision(target) == before + 3
    assert held(target)[NAMESPACE_PREFIX + "demo"]["metadata"]["labels"]["team"] == "payments"
    assert POD_PREFIX + NEW_POD in held(target)
    assert not [key for key in held(target) if key.startswith(NETWORK_POLICY_PREFIX)]
    assert sum(t.put for t in kube_sync.tallies[1:]) == 2
    assert sum(t.deleted for t in kube_sync.tallies[1:]) == 1


def test_a_410_lists_again_and_the_key_deleted_meanwhile_goes(
    cluster: Cluster, target: EtcdDatastore, kube_sync: KubeSync
) -> None:
    """A Pod deleted while the history that tells it was compacted: the watch gets 410 Gone, the
    next snapshot no longer holds the Pod, and the reconcile deletes its key, writing nothing else."""
    kube_sync.syncer.step()
    gone = _listed("pods.json")[0]
    cluster.server.remove(gone)
    cluster.server.compact(cluster.server.revision)
    key = POD_PREFIX + f"demo/{gone['metadata']['name']}"
    before = revision(target)
    kube_sync.syncer.step()
    assert kube_sync.syncer.revision is None, "the watch was not answered 410"
    assert key in held(target)
    kube_sync.syncer.step()
    assert key not in held(target)
    assert held(target) == cluster.objects()
    assert revision(target) == before + 1
    assert kube_sync.tallies[-1] == Tally(deleted=1, unchanged=len(cluster.objects()))


def test_a_restart_on_a_target_in_sync_writes_nothing(
    cluster: Cluster, target: EtcdDatastore, kube_sync: KubeSync
) -> None:
    kube_sync.syncer.step()
    kube_sync.close()
    before = revision(target)
    again = restarted(cluster, target)
    assert revision(target) == before
    assert again.tallies == [Tally(unchanged=len(cluster.objects()))]


def test_a_restart_writes_what_changed_while_it_was_away(
    cluster: Cluster, target: EtcdDatastore, kube_sync: KubeSync
) -> None:
    """Stopped, then a Pod relabelled and a Namespace deleted: the next start puts one key,
    deletes one, and leaves every other as it is."""
    kube_sync.syncer.step()
    kube_sync.close()
    pod = _listed("pods.json")[1]
    pod["metadata"]["labels"]["role"] = "frontend"
    cluster.server.apply(pod)
    cluster.server.remove(_listed("namespaces.json")[0])
    before = revision(target)
    again = restarted(cluster, target)
    assert held(target) == cluster.objects()
    assert revision(target) == before + 2
    assert again.tallies == [Tally(put=1, deleted=1, unchanged=len(cluster.objects()) - 1)]


def test_a_key_another_writer_changed_is_set_right_by_the_next_list(
    cluster: Cluster, target: EtcdDatastore, kube_sync: KubeSync, caplog: pytest.LogCaptureFixture
) -> None:
    """Someone rewrites a Pod's key in etcd; the cluster then deletes the Pod. The delete
    compares the revision kube-sync wrote and finds a conflict; kube-sync says so, lists the
    cluster again and deletes the key then."""
    kube_sync.syncer.step()
    pod = _listed("pods.json")[0]
    key = POD_PREFIX + f"demo/{pod['metadata']['name']}"
    target.put(key, {"rewritten": True})
    cluster.server.remove(pod)
    kube_sync.step_until(mirrored(cluster, target), "the rewritten key to be deleted")
    assert "not at revision" in caplog.text
    assert "the target keeps what it holds until the cluster is listed again" in caplog.text
    assert kube_sync.tallies[-1].deleted == 1


def test_run_follows_the_cluster_until_stopped(cluster: Cluster, target: EtcdDatastore) -> None:
    """`run`, as `trellis kube-sync` calls it: on its own thread, in sync, following a change,
    and returning soon after it is told to stop."""
    source, stop = cluster.store(), threading.Event()
    thread = threading.Thread(target=run, args=(source, target, stop), name="trlks run")
    thread.start()
    try:
        wait_until(mirrored(cluster, target), WAIT_S, "the first snapshot in etcd")
        namespace = _listed("namespaces.json")[0]
        namespace["metadata"]["labels"]["trl"] = "yes"
        cluster.server.apply(namespace)
        wait_until(mirrored(cluster, target), WAIT_S, "the relabelled Namespace in etcd")
    finally:
        stop.set()
        thread.join(WAIT_S)
        source.close()
    assert not thread.is_alive()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--kubeconfig", "/trl/missing"], "kubernetes datastore: /trl/missing: Configuration file"),
        (["--datastore-location", "127.0.0.1:2379"], "etcd endpoint '127.0.0.1:2379': expected http(s)://"),
        (["--etcd-ca", "/trl/ca.pem"], "TLS files are given, yet the URL is http://"),
        (
            ["--datastore-location", "https://127.0.0.1:2379", "--etcd-ca", "/trl/ca.pem"],
            "TLS CA /trl/ca.pem: no such file",
        ),
    ],
    ids=["kubeconfig", "etcd-url", "tls-over-http", "ca-missing"],
)
def test_a_bad_setting_ends_the_command_with_one_line(
    arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real parser and command: status 1 and one line naming the setting, before anything runs."""
    defaults = {"--kubeconfig": str(KUBECONFIG), "--datastore-location": "http://127.0.0.1:2379"}
    given = dict(zip(arguments[::2], arguments[1::2], strict=True))
    argv = ["kube-sync", *(part for flag, value in {**defaults, **given}.items() for part in (flag, value))]
    args = build_parser().parse_args(argv)
    assert args.func(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("trellis kube-sync: ") and message in err, err
    assert no_watch_threads()
