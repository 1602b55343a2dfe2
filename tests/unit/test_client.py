"""The thin CNI client (`trellis.cni.client`): wire format, local answers, unreachable agent."""

from __future__ import annotations

import ast
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.helpers import cni_env, cni_error, net_conf
from trellis.cni import client

ENV_VALUES = (
    st.binary(max_size=40)
    .filter(lambda b: b"\0" not in b)
    .map(lambda b: b.decode("utf-8", "surrogateescape"))
)
"""Environment values as `os.environ` holds them: any bytes but NUL, undecodable ones escaped."""


@given(
    env=st.dictionaries(st.sampled_from(client.FORWARDED), ENV_VALUES),
    other=st.dictionaries(st.sampled_from(["PATH", "HOME", "TRELLIS_AGENT_SOCKET"]), ENV_VALUES),
    stdin=st.binary(max_size=200),
)
def test_wire_round_trip(env: dict[str, str], other: dict[str, str], stdin: bytes) -> None:
    """decode(encode(env, stdin)) gives back the CNI variables and stdin; nothing else is forwarded."""
    assert client.decode_request(client.encode_request({**other, **env}, stdin)) == (env, stdin)


@given(data=st.binary(max_size=60))
def test_decode_accepts_or_rejects_with_value_error(data: bytes) -> None:
    """Any bytes decode to (env, stdin) or raise ValueError, the one error the server handles."""
    try:
        env, _ = client.decode_request(client.WIRE_MAGIC + data)
    except ValueError as err:
        assert "not a Trellis CNI request" in str(err)
    else:
        assert all(isinstance(value, str) for value in env.values())


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"TRL0\0\0{}", "bad magic"),
        (b"", "bad magic"),
        (b"TRL1\0CNI_COMMAND=ADD\0", "no end of environment"),
        (b"TRL1\0CNI_COMMAND\0\0{}", "has no '='"),
    ],
)
def test_decode_names_what_is_malformed(data: bytes, why: str) -> None:
    """Malformed requests are rejected with a reason."""
    with pytest.raises(ValueError, match=why):
        client.decode_request(data)


@given(code=st.integers(0, 999), msg=st.text(), details=st.text())
def test_error_json_is_json(code: int, msg: str, details: str) -> None:
    """The client's hand-made error JSON parses back to the same fields, whatever the text."""
    out = json.loads(client.error_json(code, msg, details, "0.4.0"))
    assert out == {"cniVersion": "0.4.0", "code": code, "msg": msg, "details": details}


def test_version_is_answered_without_an_agent(tmp_path: Path) -> None:
    """VERSION never contacts the agent and lists every supported version."""
    code, out = client.run(cni_env("VERSION"), b"", str(tmp_path / "absent.sock"))
    assert code == 0
    assert json.loads(out)["supportedVersions"] == list(client.SUPPORTED_VERSIONS)


@pytest.mark.parametrize(("command", "expected"), [("ADD", 11), ("DEL", 11), ("GC", 11), ("STATUS", 50)])
def test_missing_agent_socket_is_try_again_later_or_not_available(
    tmp_path: Path, command: str, expected: int
) -> None:
    """An agent that is not there is code 11 (try again later), or 50 for STATUS, naming the socket."""
    path = str(tmp_path / "absent.sock")
    code, out = client.run(cni_env(command), net_conf(), path)
    error_code, msg = cni_error(out)
    assert (code, error_code) == (1, expected)
    assert path in msg


class FakeAgent:
    """A unix socket server answering every connection with fixed bytes; records what it read."""

    def __init__(self, path: Path, reply: bytes) -> None:
        self.path = path
        self.reply = reply
        self.received: list[bytes] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen()
        self._thread = threading.Thread(target=self._serve_one, daemon=True)
        self._thread.start()

    def _serve_one(self) -> None:
        conn, _ = self._sock.accept()
        with conn:
            chunks = []
            while chunk := conn.recv(65536):
                chunks.append(chunk)
            self.received.append(b"".join(chunks))
            conn.sendall(self.reply)

    def close(self) -> None:
        self._thread.join(timeout=10)
        self._sock.close()


@pytest.fixture
def fake_agent(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[FakeAgent]:
    agent = FakeAgent(tmp_path / "agent.sock", request.param)
    try:
        yield agent
    finally:
        agent.close()


@pytest.mark.parametrize("fake_agent", [b'0\n{"cniVersion": "1.1.0"}\n'], indirect=True)
def test_reply_exit_code_and_body_are_passed_through(fake_agent: FakeAgent) -> None:
    """The agent's exit code and stdout bytes reach the runtime unchanged; the request is on the wire."""
    env, stdin = cni_env("ADD"), net_conf()
    assert client.run(env, stdin, str(fake_agent.path)) == (0, b'{"cniVersion": "1.1.0"}\n')
    fake_agent.close()
    assert fake_agent.received == [client.encode_request(env, stdin)]


@pytest.mark.parametrize("fake_agent", [b"", b"garbage", b"x1\nbody"], indirect=True)
def test_malformed_reply_is_try_again_later(fake_agent: FakeAgent) -> None:
    """A reply without a numeric exit code line (an agent that died mid-request) is code 11."""
    code, out = client.run(cni_env("ADD"), net_conf(), str(fake_agent.path))
    assert code == 1 and cni_error(out)[0] == 11


def test_client_imports_only_os_sys_and_socket_core() -> None:
    """The executable imports `posix`, `sys` and `_socket` only (all built in), anywhere in the module."""
    tree = ast.parse(Path(client.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    assert imported == {"posix", "sys", "_socket"}
