"""The `trellis` CNI executable: a thin client of the node agent.

Why this shape: the runtime execs the plugin once per pod and command, so its start-up time is
part of every pod's creation. This module therefore imports nothing but `posix`, `sys` and
`_socket`, all built into the interpreter (`os` costs 0.8 ms, `socket` pulls in `enum` and
`selectors`, about 4 ms, and `json` about 6.8 ms with `re`), and never parses JSON: it
forwards the CNI environment and stdin to the agent verbatim and prints the agent's reply.
All validation and every CNI rule live in the agent (`trellis.cni.spec`).

It imports nothing of Trellis either: `trellis install-cni` copies this file, as one module,
beside the plugin in the runtime's CNI_PATH, with the agent socket written into AGENT_SOCKET.

Wire format (version 1), both directions over one unix stream connection:
  request:  b"TRL1\\0" + b"NAME=value\\0" for each CNI variable + b"\\0" + stdin bytes, then EOF
  reply:    b"<exit code>\\n" + bytes for stdout
"""

import _socket
import posix
import sys

AGENT_SOCKET = "/run/trellis/agent.sock"
"""Where the agent listens; `trellis install-cni` rewrites this line."""

SUPPORTED_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")
"""CNI spec versions the plugin speaks; the agent imports this tuple too."""

WIRE_MAGIC = b"TRL1\0"
FORWARDED = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS", "CNI_PATH")
TIMEOUT_S = 120.0
"""How long to wait for the agent's answer; kubelet's own CNI timeout is longer."""

TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50


def encode_request(env: dict[str, str], stdin: bytes) -> bytes:
    """The request as sent on the wire (the agent decodes it with `decode_request`)."""
    parts = [WIRE_MAGIC]
    for name in FORWARDED:
        value = env.get(name)
        if value is not None:
            parts.append(f"{name}={value}\0".encode("utf-8", "surrogateescape"))
    parts.append(b"\0")
    parts.append(stdin)
    return b"".join(parts)


def decode_request(data: bytes) -> tuple[dict[str, str], bytes]:
    """Inverse of `encode_request`; raises ValueError on a malformed request."""
    if not data.startswith(WIRE_MAGIC):
        raise ValueError("not a Trellis CNI request (bad magic)")
    env: dict[str, str] = {}
    pos = len(WIRE_MAGIC)
    while True:
        end = data.find(b"\0", pos)
        if end < 0:
            raise ValueError("not a Trellis CNI request (no end of environment)")
        if end == pos:
            return env, data[end + 1 :]
        name, eq, value = data[pos:end].decode("utf-8", "surrogateescape").partition("=")
        if not eq:
            raise ValueError(f"not a Trellis CNI request (item {name!r} has no '=')")
        env[name] = value
        pos = end + 1


def _json_string(text: str) -> str:
    """A JSON string literal of `text` without importing json (see the module note)."""
    out = ['"']
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch < " ":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def error_json(code: int, msg: str, details: str = "", version: str = "1.1.0") -> str:
    """A CNI error object, as the spec defines it."""
    return (
        f'{{"cniVersion": {_json_string(version)}, "code": {code}, '
        f'"msg": {_json_string(msg)}, "details": {_json_string(details)}}}\n'
    )


def version_json() -> str:
    versions = ", ".join(_json_string(v) for v in SUPPORTED_VERSIONS)
    return f'{{"cniVersion": "1.1.0", "supportedVersions": [{versions}]}}\n'


def _exchange(path: str, request: bytes) -> bytes:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(TIMEOUT_S)
        sock.connect(path)
        sock.sendall(request)
        sock.shutdown(_socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        sock.close()


def run(env: dict[str, str], stdin: bytes, socket_path: str) -> tuple[int, bytes]:
    """Handle one CNI invocation; returns (exit code, bytes for stdout)."""
    command = env.get("CNI_COMMAND", "")
    if command == "VERSION":
        return 0, version_json().encode()
    try:
        reply = _exchange(socket_path, encode_request(env, stdin))
    except OSError as err:
        reason = err.strerror or str(err)
        if command == "STATUS":
            msg = f"Trellis agent not available at {socket_path}: {reason}"
            return 1, error_json(NOT_AVAILABLE, msg).encode()
        msg = f"Trellis agent unreachable at {socket_path}: {reason}"
        return 1, error_json(TRY_AGAIN_LATER, msg, "is the trellis agent running on this node?").encode()
    code_text, sep, body = reply.partition(b"\n")
    if not sep or not code_text.isdigit():
        msg = f"Trellis agent at {socket_path} sent a malformed reply"
        return 1, error_json(TRY_AGAIN_LATER, msg, repr(reply[:200])).encode()
    return int(code_text), body


def _environ() -> dict[str, str]:
    """The process environment as text (`posix.environ` holds bytes)."""
    return {
        k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
        for k, v in posix.environ.items()
    }


def main() -> None:
    stdin = b"" if sys.stdin is None else sys.stdin.buffer.read()
    env = _environ()
    code, out = run(env, stdin, env.get("TRELLIS_AGENT_SOCKET", AGENT_SOCKET))
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    sys.exit(code)


if __name__ == "__main__":
    main()
