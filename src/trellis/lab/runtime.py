"""A container runtime's CNI side, as libcni does it: run a conflist's plugins as executables.

ADD runs the plugins in order, each given the previous one's result as `prevResult`; the
final result is cached, and DEL and CHECK hand that cache back as `prevResult`, DEL running
the plugins in reverse. GC and STATUS go to every plugin. Plugins are exec'd from CNI_PATH
with the CNI environment, inside the node's network namespace, exactly as a runtime on that
node would run them. The lab, the tests and the benchmarks all attach pods through this.
"""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trellis.dataplane.kernel.netns import enter


class PluginError(Exception):
    """A plugin exited non-zero; carries its CNI error object."""

    def __init__(self, plugin: str, command: str, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{plugin} {command}: code {code}: {msg}" + (f" ({details})" if details else ""))
        self.plugin = plugin
        self.command = command
        self.code = code
        self.msg = msg
        self.details = details


@dataclass(frozen=True)
class Invocation:
    """One exec of one plugin: what a benchmark times and a test inspects."""

    exit_code: int
    stdout: bytes
    stderr: bytes


class CniRuntime:
    """Runs the conflist at `conflist` with plugins from `cni_path`, inside network namespace `node_netns`.

    Plugins are exec'd from worker threads that entered the node's namespace once and do
    nothing else, so each child inherits the namespace and `subprocess` can vfork it, as a Go
    runtime on the node does (a `preexec_fn` would force a full fork of this process: about
    2 ms more per exec here). `close()` ends the workers.
    """

    EXEC_WORKERS = 8
    """Plugin execs that may run at once (the runtime's own concurrency, as kubelet's)."""

    def __init__(
        self, conflist: Path, cni_path: list[Path], cache_dir: Path, node_netns: str | None = None
    ) -> None:
        self.conflist_path = conflist
        self.cni_path = cni_path
        self.cache_dir = cache_dir
        self.conflist: dict[str, Any] = json.loads(conflist.read_text())
        self._node: ThreadPoolExecutor | None = None
        if node_netns is not None:
            self._node = ThreadPoolExecutor(
                max_workers=self.EXEC_WORKERS,
                thread_name_prefix=f"cni:{node_netns}",
                initializer=enter,
                initargs=(node_netns,),
            )

    def close(self) -> None:
        if self._node is not None:
            self._node.shutdown()

    def __enter__(self) -> CniRuntime:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def network(self) -> str:
        return str(self.conflist["name"])

    def _find(self, plugin_type: str) -> Path:
        for directory in self.cni_path:
            candidate = directory / plugin_type
            if candidate.is_file() and os.access(candidate, os.X_OK):
                return candidate
        raise FileNotFoundError(
            f"CNI plugin {plugin_type!r} not found in {':'.join(map(str, self.cni_path))}"
        )

    def exec_plugin(self, plugin: Path, env: dict[str, str], stdin: bytes) -> Invocation:
        """Exec one plugin with the CNI environment (in the node's namespace, if any)."""
        if self._node is None:
            return self._exec(plugin, env, stdin)
        return self._node.submit(self._exec, plugin, env, stdin).result()

    @staticmethod
    def _exec(plugin: Path, env: dict[str, str], stdin: bytes) -> Invocation:
        full_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), **env}
        proc = subprocess.run([str(plugin)], input=stdin, env=full_env, capture_output=True, check=False)
        return Invocation(proc.returncode, proc.stdout, proc.stderr)

    def _conf(self, plugin: dict[str, Any], extra: dict[str, Any]) -> bytes:
        conf = {"cniVersion": self.conflist["cniVersion"], "name": self.network, **plugin, **extra}
        return json.dumps(conf).encode()

    def _run(
        self, command: str, plugin: dict[str, Any], env: dict[str, str], extra: dict[str, Any]
    ) -> dict[str, Any]:
        plugin_type = str(plugin["type"])
        env = {**env, "CNI_COMMAND": command, "CNI_PATH": ":".join(map(str, self.cni_path))}
        inv = self.exec_plugin(self._find(plugin_type), env, self._conf(plugin, extra))
        if inv.exit_code != 0:
            try:
                err = json.loads(inv.stdout)
                raise PluginError(
                    plugin_type,
                    command,
                    int(err["code"]),
                    str(err.get("msg", "")),
                    str(err.get("details", "")),
                )
            except (ValueError, KeyError, TypeError):
                text = (inv.stdout + inv.stderr).decode(errors="replace").strip()
                raise PluginError(plugin_type, command, 999, f"exit {inv.exit_code}: {text[:500]}") from None
        if not inv.stdout.strip():
            return {}
        result: dict[str, Any] = json.loads(inv.stdout)
        return result

    def _cache_file(self, container_id: str, ifname: str) -> Path:
        return self.cache_dir / f"{self.network}-{container_id}-{ifname}.json"

    @staticmethod
    def _env(container_id: str, netns: str, ifname: str, args: dict[str, str]) -> dict[str, str]:
        env = {"CNI_CONTAINERID": container_id, "CNI_IFNAME": ifname}
        if netns:
            env["CNI_NETNS"] = netns
        if args:
            env["CNI_ARGS"] = ";".join(f"{k}={v}" for k, v in args.items())
        return env

    @staticmethod
    def _runtime_config(plugin: dict[str, Any], capabilities: dict[str, Any]) -> dict[str, Any]:
        wanted = {k: v for k, v in capabilities.items() if plugin.get("capabilities", {}).get(k)}
        return {"runtimeConfig": wanted} if wanted else {}

    def add(
        self,
        container_id: str,
        netns: str,
        ifname: str = "eth0",
        args: dict[str, str] | None = None,
        capabilities: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        env = self._env(container_id, netns, ifname, args or {})
        result: dict[str, Any] | None = None
        for plugin in self.conflist["plugins"]:
            extra = self._runtime_config(plugin, capabilities or {})
            if result is not None:
                extra["prevResult"] = result
            result = self._run("ADD", plugin, env, extra) or result
        assert result is not None
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        record = {"containerID": container_id, "ifname": ifname, "result": result}
        self._cache_file(container_id, ifname).write_text(json.dumps(record))
        return result

    def cached_result(self, container_id: str, ifname: str = "eth0") -> dict[str, Any] | None:
        try:
            record = json.loads(self._cache_file(container_id, ifname).read_text())
        except FileNotFoundError:
            return None
        result: dict[str, Any] = record["result"]
        return result

    def delete(
        self,
        container_id: str,
        netns: str,
        ifname: str = "eth0",
        args: dict[str, str] | None = None,
        capabilities: dict[str, Any] | None = None,
    ) -> None:
        env = self._env(container_id, netns, ifname, args or {})
        prev = self.cached_result(container_id, ifname)
        for plugin in reversed(self.conflist["plugins"]):
            extra = self._runtime_config(plugin, capabilities or {})
            if prev is not None:
                extra["prevResult"] = prev
            self._run("DEL", plugin, env, extra)
        self._cache_file(container_id, ifname).unlink(missing_ok=True)

    def check(
        self, container_id: str, netns: str, ifname: str = "eth0", args: dict[str, str] | None = None
    ) -> None:
        prev = self.cached_result(container_id, ifname)
        if prev is None:
            raise FileNotFoundError(f"no cached result for {container_id}/{ifname}: was it added?")
        env = self._env(container_id, netns, ifname, args or {})
        for plugin in self.conflist["plugins"]:
            self._run("CHECK", plugin, env, {"prevResult": prev})

    @property
    def speaks_1_1(self) -> bool:
        """GC and STATUS exist from spec 1.1.0; before it libcni synthesizes DEL for GC."""
        return tuple(int(p) for p in str(self.conflist["cniVersion"]).split(".")) >= (1, 1, 0)

    def gc(self, valid: list[tuple[str, str]]) -> None:
        if not self.speaks_1_1:
            keep = set(valid)
            for cached in sorted(self.cache_dir.glob(f"{self.network}-*.json")):
                record = json.loads(cached.read_text())
                if (record["containerID"], record["ifname"]) not in keep:
                    self.delete(record["containerID"], "", record["ifname"])
            return
        attachments = [{"containerID": cid, "ifname": ifname} for cid, ifname in valid]
        extra = {"cni.dev/valid-attachments": attachments, "cni.dev/attachments": attachments}
        for plugin in self.conflist["plugins"]:
            self._run("GC", plugin, {}, extra)

    def status(self) -> None:
        if not self.speaks_1_1:
            return
        for plugin in self.conflist["plugins"]:
            self._run("STATUS", plugin, {}, {})
