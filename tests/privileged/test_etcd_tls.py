"""etcd with TLS client certificates: a real etcd 3.4, certificates made by openssl for the test.

The server listens on the loopback of a throwaway namespace `trlt-<random>` with
`--client-cert-auth`: only a client whose certificate the test's CA signed gets in. Every
client here (the store, the agent) runs inside that namespace. Teardown kills etcd by its PID
and deletes the namespace, even when a test failed.
"""

from __future__ import annotations

import functools
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from tests.helpers import cni_env, net_conf, wait_until
from tests.privileged.nodes import delete_namespaces, run
from trellis.cni import client
from trellis.dataplane.kernel.netns import call_in_netns, enter
from trellis.datastore import ClientTls, open_datastore
from trellis.datastore.base import DatastoreError, EventKind, Unavailable
from trellis.datastore.etcd import EtcdDatastore

# Starting and stopping etcd come from this plugin. Loaded as a plugin (so that pytest rewrites
# its assertions), it is imported inside the functions that use it, not at the top.
pytest_plugins = ["tests.unit.datastore_backends"]

pytestmark = pytest.mark.privileged

T = TypeVar("T")

URL = "https://127.0.0.1:2379"
PEER = "http://127.0.0.1:2380"
READY_TIMEOUT_S = 30.0
AGENT = Path(sys.executable).with_name("trellis")


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, the server's certificate (SAN 127.0.0.1), a client's, and a stranger's
    (a client certificate signed by another CA)."""

    dir: Path

    def __getitem__(self, name: str) -> Path:
        return self.dir / name

    def tls(self, client: str | None = "client", ca: bool = True) -> ClientTls:
        """The TLS files of client `client` (None: no certificate), trusting the CA or not."""
        return ClientTls(
            self["ca.crt"] if ca else None,
            None if client is None else self[f"{client}.crt"],
            None if client is None else self[f"{client}.key"],
        )


def _openssl(*args: str | Path) -> None:
    run("openssl", *map(str, args))


def _ca(pki: Path, name: str) -> None:
    """A P-256 key `name.key` and a self-signed CA certificate `name.crt`."""
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", pki / f"{name}.key")
    _openssl("req", "-x509", *key, "-out", pki / f"{name}.crt", "-days", "1", "-subj", f"/CN={name}")


def _certificate(pki: Path, name: str, ca: str, extensions: str) -> None:
    """A P-256 key `name.key` and its certificate `name.crt` with `extensions`, signed by CA `ca`."""
    key = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", pki / f"{name}.key")
    _openssl("req", *key, "-out", pki / f"{name}.csr", "-subj", f"/CN={name}")
    (pki / f"{name}.ext").write_text(extensions)
    signer = ("-CA", pki / f"{ca}.crt", "-CAkey", pki / f"{ca}.key", "-CAcreateserial")
    _openssl("x509", "-req", "-in", pki / f"{name}.csr", *signer, "-days", "1",
             "-out", pki / f"{name}.crt", "-extfile", pki / f"{name}.ext")  # fmt: skip


def make_pki(pki: Path) -> Pki:
    pki.mkdir()
    _ca(pki, "ca")
    _ca(pki, "other-ca")
    # etcd's gateway dials etcd's own gRPC port with the server's certificate: it must allow both uses.
    _certificate(pki, "server", "ca", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n")
    _certificate(pki, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _certificate(pki, "stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    return Pki(pki)


@dataclass(frozen=True)
class TlsEtcd:
    netns: str
    pki: Pki

    def call(self, func: Callable[[], T]) -> T:
        """`func()` run inside the server's namespace (where its loopback is)."""
        return call_in_netns(self.netns, func)

    def store(self, tls: ClientTls) -> EtcdDatastore:
        return EtcdDatastore(URL, tls=tls)

    def answers(self) -> bool:
        """Whether the server answers a read over TLS (False while it is not listening yet)."""
        store = self.store(self.pki.tls())
        try:
            self.call(lambda: store.get("/"))
        except Unavailable:
            return False
        finally:
            store.close()
        return True


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsEtcd]:
    """etcd requiring client certificates on 127.0.0.1 of a fresh namespace; removed afterwards."""
    from tests.unit.datastore_backends import etcd_server

    work = tmp_path_factory.mktemp("etcd-tls")
    server = TlsEtcd(f"trlt-{secrets.token_hex(3)}", make_pki(work / "pki"))
    pki = server.pki
    try:
        run("ip", "netns", "add", server.netns)
        run("ip", "-n", server.netns, "link", "set", "lo", "up")
        flags = (
            "--client-cert-auth",
            f"--trusted-ca-file={pki['ca.crt']}",
            f"--cert-file={pki['server.crt']}",
            f"--key-file={pki['server.key']}",
        )
        with etcd_server(work, URL, PEER, *flags, ready=server.answers, netns=server.netns):
            yield server
    finally:
        assert not delete_namespaces([server.netns])


def test_a_client_with_its_certificate_puts_gets_and_watches(etcd: TlsEtcd) -> None:
    """Through open_datastore, as the agent opens it: writes, reads, a lease and a watch, all over TLS."""
    store = open_datastore("etcd", URL, tls=etcd.pki.tls())
    prefix = f"/tls-{secrets.token_hex(3)}/"
    try:

        def session() -> None:
            first = store.put(prefix + "a", {"n": 1})
            assert store.get(prefix + "a") is not None
            assert store.get(prefix + "a").value == {"n": 1}  # type: ignore[union-attr]
            lease = store.grant_lease(10)
            store.create(prefix + "b", {"n": 2}, lease=lease)
            store.keepalive(lease)
            events = store.watch(prefix, first - 1, 5.0)
            assert [(e.kind, e.key, e.value) for e in events][:1] == [(EventKind.PUT, prefix + "a", {"n": 1})]
            later = store.watch(prefix, first, 5.0)
            assert [(e.kind, e.key) for e in later] == [(EventKind.PUT, prefix + "b")]
            store.revoke_lease(lease)
            assert [kv.key for kv in store.list(prefix)] == [prefix + "a"]

        etcd.call(session)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("client", "trusts_ca", "suspect"),
    [
        (None, True, "it may require a client certificate, and none is configured"),
        ("stranger", True, "it may not accept this client certificate"),
    ],
    ids=["no-certificate", "certificate-of-another-ca"],
)
def test_a_client_the_server_refuses_gets_a_clear_error(
    etcd: TlsEtcd, client: str | None, trusts_ca: bool, suspect: str
) -> None:
    """No certificate, or one the server's CA did not sign: refused in one line naming the
    endpoint, the request and the likely cause; a DatastoreError, not Unavailable ('try later').

    The server either sends an alert or closes the connection, whichever the client sees first.
    """
    refused = _refused(etcd, etcd.pki.tls(client, ca=trusts_ca))
    assert refused.startswith(f"etcd {URL}: /kv/range: TLS: handshake refused: "), refused
    assert refused.endswith(f" ({suspect})"), refused


def test_a_server_the_client_does_not_trust_is_refused_with_a_clear_error(etcd: TlsEtcd) -> None:
    refused = _refused(etcd, etcd.pki.tls(ca=False))
    assert refused == (
        f"etcd {URL}: /kv/range: TLS: the server's certificate is not trusted "
        "(unable to get local issuer certificate)"
    )


def _refused(etcd: TlsEtcd, tls: ClientTls) -> str:
    """The message of the error a read with `tls` raises (it must be a DatastoreError, not Unavailable)."""
    store = etcd.store(tls)
    try:
        with pytest.raises(DatastoreError) as refused:
            etcd.call(lambda: store.get("/a"))
    finally:
        store.close()
    assert not isinstance(refused.value, Unavailable)
    return str(refused.value)


def test_tls_settings_that_cannot_work_are_refused_at_once(etcd: TlsEtcd, tmp_path: Path) -> None:
    pki = etcd.pki
    for endpoint, tls, says in (
        ("http://127.0.0.1:2379", pki.tls(), "TLS files are given, yet the URL is http:// (use https://)"),
        (URL, ClientTls(pki["ca.crt"], pki["client.crt"], None), "a client certificate needs its key"),
        (URL, ClientTls(tmp_path / "missing.crt"), f"TLS CA {tmp_path / 'missing.crt'}: no such file"),
    ):
        with pytest.raises(DatastoreError) as refused:
            EtcdDatastore(endpoint, tls=tls)
        assert str(refused.value).startswith(f"etcd {endpoint}: {says}")


def test_the_agent_reaches_etcd_with_its_certificate_flags(etcd: TlsEtcd, tmp_path: Path) -> None:
    """`trellis agent --etcd-ca --etcd-cert --etcd-key`: its CNI STATUS, which reads the store,
    answers 0 (it would answer 50 without the client certificate)."""
    pki = etcd.pki
    socket = tmp_path / "agent.sock"
    log_path = tmp_path / "agent.log"
    command = [
        *(str(AGENT), "agent", "--node", "tls", "--socket", str(socket), "--state-dir", str(tmp_path)),
        *("--datastore", "etcd", "--datastore-location", URL, "--etcd-ca", str(pki["ca.crt"])),
        *("--etcd-cert", str(pki["client.crt"]), "--etcd-key", str(pki["client.key"])),
    ]
    from tests.unit.datastore_backends import stop

    with log_path.open("wb") as log:
        agent = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=functools.partial(enter, etcd.netns),  # noqa: PLW1509 (setns before exec only)
        )
    try:
        answers: list[tuple[int, bytes]] = []

        def status_ok() -> bool:
            if agent.poll() is not None:
                raise AssertionError(f"agent exited {agent.returncode}: {log_path.read_text()[-2000:]}")
            if not socket.exists():
                return False
            answers.append(client.run(cni_env("STATUS"), net_conf(), str(socket)))
            return answers[-1][0] == 0

        wait_until(status_ok, READY_TIMEOUT_S, f"the agent's STATUS to answer 0 (last: {answers[-1:]})")
        assert answers[-1] == (0, b"")
    finally:
        stop(agent, timeout_s=30)
