"""etcd v3 datastore: the store of a multi-node cluster, as Calico and Flannel use it.

Why the JSON gateway (`etcd3gw`) and not gRPC: the agent is thread-based and the gateway is
plain synchronous HTTP, so every call is an ordinary blocking request with a time-out, safe to
make from any thread; the gRPC clients for Python are unmaintained or asyncio-only. etcd3gw
gives the session (TLS, connection pool), the URL scheme and the mapping of HTTP failures to
exceptions. Its key-value helpers are not used: they drop the response header, which carries
the revisions this Protocol returns, and its watch runs a callback thread that silently drops
the compaction answer and any stream error. Here every request is written out, a compare-and-
swap is one transaction comparing `mod_revision` (create: `create_revision == 0`), and watch
is one streaming request per call, read until the first events or the time-out.

Keys live under a configurable prefix so that several clusters (or tests) can share one etcd;
values are JSON. etcd compacts history itself (`--auto-compaction-retention`): a watch from
before that raises Compacted, exactly as the SQLite store's bounded log does.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import json
from typing import Any, cast
from urllib.parse import urlsplit

import etcd3gw
import requests
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception
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
)

_GRPC_NOT_FOUND = 5
"""gRPC status of etcd's `requested lease not found`, the only NotFound of the KV and lease APIs."""

DEFAULT_PORT = 2379


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


def _grpc_status(err: Etcd3Exception) -> tuple[int | None, str]:
    """(gRPC code, message) from the gateway's error body; (None, what there is) without one."""
    try:
        body = json.loads(err.detail_text or "")
        return int(body["code"]), str(body["message"])
    except (ValueError, KeyError, TypeError):
        return None, err.detail_text or str(err)


class EtcdDatastore:
    """The `etcd` Datastore: a real etcd v3 server (3.4 or later) at `endpoint`."""

    def __init__(
        self,
        endpoint: str,
        *,
        prefix: str = "",
        tls: ClientTls | None = None,
        timeout_s: float = 5.0,
    ) -> None:
        """`endpoint`: http(s)://HOST[:PORT]; `prefix` goes before every key; `timeout_s` per request."""
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise DatastoreError(f"etcd endpoint {endpoint!r}: expected http(s)://HOST[:PORT]")
        self.endpoint = endpoint
        self.prefix = prefix.encode()
        self.timeout_s = timeout_s
        tls = tls or ClientTls()
        self._client = etcd3gw.Etcd3Client(
            host=url.hostname,
            port=url.port or DEFAULT_PORT,
            protocol=url.scheme,
            ca_cert=None if tls.ca_cert is None else str(tls.ca_cert),
            cert_cert=None if tls.cert is None else str(tls.cert),
            cert_key=None if tls.key is None else str(tls.key),
            timeout=timeout_s,
            api_path="/v3/",  # etcd 3.4 and later; saves the discovery round trip
        )

    # -- requests ----------------------------------------------------------------------------

    def _call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """One gateway request; LeaseExpired on etcd's NotFound, Unavailable when unreachable."""
        try:
            return cast(dict[str, Any], self._client.post(self._client.get_url(path), json=body))
        except Etcd3Exception as err:
            code, message = _grpc_status(err)
            if isinstance(err, ConnectionFailedError | ConnectionTimeoutError):
                error: type[DatastoreError] = Unavailable
            else:
                error = LeaseExpired if code == _GRPC_NOT_FOUND else DatastoreError
            raise error(f"etcd {self.endpoint}: {path}: {message}") from err
        except requests.RequestException as err:
            raise Unavailable(f"etcd {self.endpoint}: {path}: {err}") from err

    def _txn(self, compare: list[dict[str, Any]], success: dict[str, Any]) -> int | None:
        """The new revision when every comparison holds and `success` ran, else None."""
        answer = self._call("/kv/txn", {"compare": compare, "success": [success]})
        return int(answer["header"]["revision"]) if answer.get("succeeded") else None

    def _key(self, key: str) -> str:
        return _b64(self.prefix + key.encode())

    def _unkey(self, key: str) -> str:
        return _unb64(key)[len(self.prefix) :].decode()

    def _kv(self, raw: dict[str, Any]) -> KV:
        return KV(self._unkey(raw["key"]), json.loads(_unb64(raw["value"])), int(raw["mod_revision"]))

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
            with self._client.session.post(
                self._client.get_url("/watch"),
                json=request,
                stream=True,
                timeout=(self.timeout_s, max(timeout_s, 0.001)),
            ) as response:
                if response.status_code != requests.codes.ok:
                    raise Unavailable(f"{where}: HTTP {response.status_code} {response.text}")
                for line in response.iter_lines(chunk_size=None):
                    if line:
                        events = self._watch_answer(json.loads(line), where)
                        if events:
                            return events
        except requests.ConnectTimeout as err:
            raise Unavailable(f"{where}: {err}") from err
        except requests.ReadTimeout:
            return []
        except requests.ConnectionError as err:
            # A time-out inside the stream arrives wrapped in a ConnectionError.
            if err.args and isinstance(err.args[0], ReadTimeoutError):
                return []
            raise Unavailable(f"{where}: {err}") from err
        except requests.RequestException as err:
            raise Unavailable(f"{where}: {err}") from err
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
        return Event(EventKind.PUT, self._unkey(kv["key"]), json.loads(_unb64(kv["value"])), revision)

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
