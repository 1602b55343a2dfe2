"""etcd v3 datastore: the store of a multi-node cluster, as Calico and Flannel use it.

Why the JSON gateway (`etcd3gw`) and not gRPC: the agent is thread-based and the gateway is
plain synchronous HTTP, so every call is an ordinary blocking request with a time-out, safe to
make from any thread; the gRPC clients for Python are unmaintained or asyncio-only. etcd3gw
gives the session (client certificate, connection pool) and the URL scheme. Its key-value
helpers are not used: they drop the response header, which carries the revisions this
Protocol returns, and its watch runs a callback thread that silently drops the compaction
answer and any stream error. Nor is its `post`: it has one time-out for connecting and
answering, and it leaves the CA to the session, which `requests` lets the environment's
REQUESTS_CA_BUNDLE override (psf/requests#3829), so `--etcd-ca` would be ignored wherever that
variable is set. Here every request is written out with its CA and its two time-outs, a
compare-and-swap is one transaction comparing `mod_revision` (create: `create_revision == 0`),
and watch is one streaming request per call, read until the first events or the time-out.

Time-outs are short because a CNI ADD waits on them: connecting gets CONNECT_TIMEOUT_S, an
answer REQUEST_TIMEOUT_S. With etcd down (connection refused) a call fails at once; with its
host gone or etcd hung, after a few seconds; either way as Unavailable, with the cause in a
few words (`connection refused`, `no answer within 3.0 s`), which the agent turns into CNI
error 11 and kubelet retries. A TLS handshake the server refuses, or a server certificate the
client does not trust, is a plain DatastoreError that says which (retrying will not help).

Keys live under a configurable prefix so that several clusters (or tests) can share one etcd;
values are JSON. etcd compacts history itself (`--auto-compaction-retention`): a watch from
before that raises Compacted, exactly as the SQLite store's bounded log does.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import json
import ssl
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import etcd3gw
import requests
from urllib3.exceptions import ReadTimeoutError

from trellis.datastore.base import (
    KV,
    AlreadyExists,
    ClientTls,
    Compacted,
    Conflict,
    DatastoreError,
    Event,
    EventKind,
    LeaseExpired,
    Snapshot,
    Unavailable,
    decode_value,
)

_GRPC_NOT_FOUND = 5
"""gRPC status of etcd's `requested lease not found`, the only NotFound of the KV and lease APIs."""
_GRPC_RETRYABLE = (4, 14)
"""gRPC DEADLINE_EXCEEDED and UNAVAILABLE: etcd has no leader, or timed out a request."""
_HTTP_RETRYABLE = (408, 503, 504)
"""What the gateway answers for those, and what a proxy in between may answer."""

DEFAULT_PORT = 2379
CONNECT_TIMEOUT_S = 1.0
"""Seconds to connect (and shake hands) before a request counts as Unavailable."""
REQUEST_TIMEOUT_S = 3.0
"""Seconds to wait for an answer once connected (a watch waits its own time-out instead)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text)


def _prefix_range(prefix: bytes) -> dict[str, str]:
    """The range of every key starting with `prefix` (clientv3's GetPrefixRangeEnd)."""
    end = bytearray(prefix)
    while end and end[-1] == 0xFF:
        end.pop()
    if end:
        end[-1] += 1
    else:
        end = bytearray(b"\0")
    return {"key": _b64(prefix or b"\0"), "range_end": _b64(bytes(end))}


def _grpc_status(response: requests.Response) -> tuple[int | None, str]:
    """(gRPC code, message) from the gateway's error body; (None, what there is) without one."""
    try:
        body = response.json()
        return int(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        return None, f"HTTP {response.status_code} {response.text.strip()[:200]}"


def _root_cause(err: BaseException) -> BaseException:
    """The error under requests' and urllib3's wrappers: a TLS error, else the deepest with an errno."""
    found: BaseException = err
    seen: set[int] = set()
    cause: BaseException | None = err
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, ssl.SSLError):
            return cause
        if isinstance(cause, OSError) and cause.errno is not None:
            found = cause
        # urllib3 keeps the cause in `reason` (MaxRetryError) or `args[0]` (its SSLError).
        reason = getattr(cause, "reason", None)
        first = cause.args[0] if cause.args else None
        if isinstance(reason, BaseException):
            cause = reason
        elif isinstance(first, BaseException):
            cause = first
        else:
            cause = cause.__cause__ or cause.__context__
    return found


def _describe(cause: BaseException, client_cert: bool) -> str:
    """A failed connection's cause in a few words: `connection refused`, `TLS: ...`.

    A server that refuses a client during the handshake either sends an alert or just closes
    the connection, whichever reaches the client first: both read as one refusal here.
    """
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate is not trusted ({cause.verify_message})"
    if isinstance(cause, ssl.SSLError):
        if isinstance(cause, ssl.SSLEOFError):
            how = "the server closed the connection"
        else:
            how = (cause.reason or cause.strerror or str(cause)).lower().replace("_", " ")
        suspect = (
            "it may not accept this client certificate"
            if client_cert
            else "it may require a client certificate, and none is configured"
        )
        return f"TLS: handshake refused: {how} ({suspect})"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(cause)


def _check_tls(endpoint: str, scheme: str, tls: ClientTls) -> None:
    """DatastoreError naming the fault if `tls` cannot work for `endpoint`."""
    files = {"CA": tls.ca_cert, "client certificate": tls.cert, "client key": tls.key}
    if scheme == "http" and any(files.values()):
        raise DatastoreError(f"etcd {endpoint}: TLS files are given, yet the URL is http:// (use https://)")
    if (tls.cert is None) != (tls.key is None):
        raise DatastoreError(
            f"etcd {endpoint}: a client certificate needs its key, and a key its certificate"
        )
    for what, path in files.items():
        if path is not None and not Path(path).is_file():
            raise DatastoreError(f"etcd {endpoint}: TLS {what} {path}: no such file")


class EtcdDatastore:
    """The `etcd` Datastore: a real etcd v3 server (3.4 or later) at `endpoint`."""

    def __init__(
        self,
        endpoint: str,
        *,
        prefix: str = "",
        tls: ClientTls | None = None,
        timeout_s: float = REQUEST_TIMEOUT_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        """`endpoint`: http(s)://HOST[:PORT]; `prefix` goes before every key; `timeout_s` for
        each answer and `connect_timeout_s` for each connection (seconds)."""
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise DatastoreError(f"etcd endpoint {endpoint!r}: expected http(s)://HOST[:PORT]")
        tls = tls or ClientTls()
        _check_tls(endpoint, url.scheme, tls)
        self.endpoint = endpoint
        self.prefix = prefix.encode()
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self._verify: str | bool = True if tls.ca_cert is None else str(tls.ca_cert)
        """Per request: a session's CA would yield to REQUESTS_CA_BUNDLE (see the module note)."""
        self._client = etcd3gw.Etcd3Client(
            host=url.hostname,
            port=url.port or DEFAULT_PORT,
            protocol=url.scheme,
            cert_cert=None if tls.cert is None else str(tls.cert),
            cert_key=None if tls.key is None else str(tls.key),
            api_path="/v3/",  # etcd 3.4 and later; saves the discovery round trip
        )

    # -- requests ----------------------------------------------------------------------------

    def _post(
        self, path: str, body: dict[str, Any], answer_s: float, stream: bool = False
    ) -> requests.Response:
        """One gateway request, with this store's CA and time-outs (`answer_s` to answer)."""
        return self._client.session.post(
            self._client.get_url(path),
            json=body,
            stream=stream,
            verify=self._verify,
            timeout=(self.connect_timeout_s, answer_s),
        )

    def _unreachable(self, where: str, err: requests.RequestException) -> DatastoreError:
        """Unavailable naming why a request got no answer; a TLS refusal is a DatastoreError:
        trying again will not fix the certificates."""
        if isinstance(err, requests.ConnectTimeout):
            return Unavailable(f"{where}: no connection within {self.connect_timeout_s} s")
        if isinstance(err, requests.Timeout):
            return Unavailable(f"{where}: no answer within {self.timeout_s} s")
        cause = _root_cause(err)
        error = DatastoreError if isinstance(cause, ssl.SSLError) else Unavailable
        return error(f"{where}: {_describe(cause, self._client.session.cert is not None)}")

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One gateway request's answer; LeaseExpired on etcd's NotFound, Unavailable when etcd
        cannot be reached, does not answer in time or has no leader."""
        where = f"etcd {self.endpoint}: {path}"
        try:
            response = self._post(path, body, self.timeout_s)
            if response.status_code == requests.codes.ok:
                return cast(dict[str, Any], response.json())
        except requests.RequestException as err:
            raise self._unreachable(where, err) from err
        code, message = _grpc_status(response)
        if code in _GRPC_RETRYABLE or (code is None and response.status_code in _HTTP_RETRYABLE):
            raise Unavailable(f"{where}: {message}")
        raise (LeaseExpired if code == _GRPC_NOT_FOUND else DatastoreError)(f"{where}: {message}")

    def _txn(self, compare: list[dict[str, Any]], success: dict[str, Any]) -> int | None:
        """The new revision when every comparison holds and `success` ran, else None."""
        answer = self._call("/kv/txn", {"compare": compare, "success": [success]})
        return int(answer["header"]["revision"]) if answer.get("succeeded") else None

    def _key(self, key: str) -> str:
        return _b64(self.prefix + key.encode())

    def _unkey(self, key: str) -> str:
        return _unb64(key)[len(self.prefix) :].decode()

    def _kv(self, raw: dict[str, Any]) -> KV:
        key = self._unkey(raw["key"])
        return KV(key, decode_value(key, _unb64(raw["value"])), int(raw["mod_revision"]))

    def _put_request(self, key: str, value: dict[str, Any], lease: int) -> dict[str, Any]:
        return {
            "key": self._key(key),
            "value": _b64(json.dumps(value, sort_keys=True).encode()),
            "lease": lease,
        }

    def _is_at(self, key: str, mod_revision: int) -> list[dict[str, Any]]:
        """Comparisons: `key` exists and was last changed at `mod_revision`."""
        k = self._key(key)
        return [
            {"key": k, "target": "VERSION", "result": "GREATER", "version": 0},
            {"key": k, "target": "MOD", "result": "EQUAL", "mod_revision": mod_revision},
        ]

    # -- the Datastore protocol --------------------------------------------------------------

    def get(self, key: str) -> KV | None:
        kvs = self._call("/kv/range", {"key": self._key(key)}).get("kvs", [])
        return self._kv(kvs[0]) if kvs else None

    def list(self, prefix: str) -> list[KV]:
        return self.snapshot(prefix).items

    def snapshot(self, prefix: str) -> Snapshot:
        answer = self._call("/kv/range", _prefix_range(self.prefix + prefix.encode()))
        items = [self._kv(raw) for raw in answer.get("kvs", [])]
        return Snapshot(items, int(answer["header"]["revision"]))

    def watch(self, prefix: str, after_revision: int, timeout_s: float) -> builtins.list[Event]:
        request = {
            "create_request": {
                **_prefix_range(self.prefix + prefix.encode()),
                "start_revision": after_revision + 1,
            }
        }
        where = f"etcd {self.endpoint}: watch of {prefix} from revision {after_revision + 1}"
        try:
            # A fresh stream per call: closing it (leaving the block) cancels the watch in etcd.
            # The read time-out restarts with each chunk; etcd's "created" answer comes at once,
            # so a quiet watch returns [] about `timeout_s` (plus one round trip) after the call.
            with self._post("/watch", request, max(timeout_s, 0.001), stream=True) as response:
                if response.status_code != requests.codes.ok:
                    raise Unavailable(f"{where}: {_grpc_status(response)[1]}")
                for line in response.iter_lines(chunk_size=None):
                    if line:
                        events = self._watch_answer(json.loads(line), where)
                        if events:
                            return events
        except requests.ReadTimeout:
            return []
        except requests.RequestException as err:
            # A time-out inside the stream arrives wrapped in a ConnectionError.
            if err.args and isinstance(err.args[0], ReadTimeoutError):
                return []
            raise self._unreachable(where, err) from err
        raise Unavailable(f"{where}: the stream ended")

    def _watch_answer(self, message: dict[str, Any], where: str) -> builtins.list[Event]:
        """The events of one streamed watch answer; raises for a cancelled watch or an error."""
        if "error" in message:
            raise Unavailable(f"{where}: {message['error']}")
        result = message["result"]
        if int(result.get("compact_revision", 0)):
            raise Compacted(f"{where}: history before {result['compact_revision']} is compacted")
        if result.get("canceled"):
            raise DatastoreError(f"{where}: cancelled by etcd: {result.get('cancel_reason', '')}")
        return [self._event(raw) for raw in result.get("events", [])]

    def _event(self, raw: dict[str, Any]) -> Event:
        kv = raw["kv"]
        revision = int(kv["mod_revision"])
        if raw.get("type") == "DELETE":
            return Event(EventKind.DELETE, self._unkey(kv["key"]), None, revision)
        key = self._unkey(kv["key"])
        return Event(EventKind.PUT, key, decode_value(key, _unb64(kv["value"])), revision)

    def create(self, key: str, value: dict[str, Any], lease: int = 0) -> int:
        absent = {"key": self._key(key), "target": "CREATE", "result": "EQUAL", "create_revision": 0}
        revision = self._txn([absent], {"request_put": self._put_request(key, value, lease)})
        if revision is None:
            raise AlreadyExists(key)
        return revision

    def update(self, key: str, value: dict[str, Any], mod_revision: int, lease: int = 0) -> int:
        revision = self._txn(
            self._is_at(key, mod_revision), {"request_put": self._put_request(key, value, lease)}
        )
        if revision is None:
            raise Conflict(f"{key}: not at revision {mod_revision}")
        return revision

    def put(self, key: str, value: dict[str, Any], lease: int = 0) -> int:
        return int(self._call("/kv/put", self._put_request(key, value, lease))["header"]["revision"])

    def delete(self, key: str, mod_revision: int) -> None:
        deleted = self._txn(self._is_at(key, mod_revision), {"request_delete_range": {"key": self._key(key)}})
        if deleted is None:
            raise Conflict(f"{key}: not at revision {mod_revision}")

    def grant_lease(self, ttl_s: int) -> int:
        return int(self._call("/lease/grant", {"TTL": ttl_s})["ID"])

    def keepalive(self, lease: int) -> None:
        # etcd answers a keepalive of an unknown lease with no TTL rather than an error.
        if not int(self._call("/lease/keepalive", {"ID": lease})["result"].get("TTL", 0)):
            raise LeaseExpired(f"etcd {self.endpoint}: lease {lease} is gone")

    def revoke_lease(self, lease: int) -> None:
        with contextlib.suppress(LeaseExpired):
            self._call("/kv/lease/revoke", {"ID": lease})

    def compact(self, revision: int) -> None:
        """Forget the history before `revision` (after the last compaction, at most the current one)."""
        self._call("/kv/compaction", {"revision": revision, "physical": True})

    def close(self) -> None:
        self._client.session.close()
