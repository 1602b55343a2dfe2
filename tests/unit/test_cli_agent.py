"""`trellis agent` refusing its arguments: one line naming what is wrong and where, no traceback.

Run as a process: the agent sets its umask, which must not leak into the test's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from trellis.cli.main import main; main()", "agent", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_malformed_http_address_is_one_line_and_exit_2(tmp_path: Path) -> None:
    done = agent("--state-dir", str(tmp_path), "--http-address", "bogus")
    assert (done.returncode, done.stderr) == (2, "trellis agent: HTTP address 'bogus' is not HOST:PORT\n")
    assert not any(tmp_path.iterdir()), "refused before creating anything"


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--etcd-ca", "/nonexistent/trl-ca.pem"], "TLS CA /nonexistent/trl-ca.pem: no such file"),
        (["--etcd-cert", "/nonexistent/trl.pem"], "a client certificate needs its key"),
    ],
)
def test_unusable_etcd_tls_files_are_one_line_and_exit_1(
    tmp_path: Path, flags: list[str], words: str
) -> None:
    location = ("--datastore", "etcd", "--datastore-location", "https://127.0.0.1:1")
    done = agent("--state-dir", str(tmp_path), *location, "--http-address", "", *flags)
    assert done.returncode == 1
    assert done.stderr.startswith("trellis agent: etcd https://127.0.0.1:1: ")
    assert words in done.stderr and done.stderr.count("\n") == 1, done.stderr
