"""The frame every benchmark shares: the command line, the root check, the facts of the machine
and the run, the JSON file, a SIGTERM that unwinds through teardown, and rich tables."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from rich.table import Table

from common.host import BenchError

RESULTS_DIR = Path(__file__).resolve().parent.parent / "results"


def table(title: str, columns: Sequence[str]) -> Table:
    """A table whose first column is a left-aligned label and every other a right-aligned figure."""
    made = Table(title=title)
    for n, column in enumerate(columns):
        made.add_column(column, justify="right" if n else "left")
    return made


def verdict(met: bool) -> str:
    return "[green]met[/]" if met else "[red]missed[/]"


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def run_facts() -> dict[str, Any]:
    """When and where: UTC date, kernel, CPUs, 1-minute load average (completed by `finish_facts`)."""
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "loadavg_1min": [os.getloadavg()[0]],
    }


def finish_facts(facts: dict[str, Any]) -> dict[str, Any]:
    facts["loadavg_1min"].append(os.getloadavg()[0])
    return facts


def load_line(facts: dict[str, Any]) -> str:
    start, end = facts["loadavg_1min"]
    return f"1-minute load average at start {start:.2f}, at end {end:.2f} (other work adds noise)"


def count(least: int) -> Callable[[str], int]:
    """An argparse `type`: an integer of at least `least`."""

    def convert(text: str) -> int:
        if not text.isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"{text!r}: expected an integer of at least {least}")
        return int(text)

    return convert


def _terminate(signum: int, _frame: object) -> NoReturn:
    sys.exit(128 + signum)  # unwinds through every teardown


def main(
    parser: argparse.ArgumentParser,
    measure: Callable[[argparse.Namespace], dict[str, Any]],
    render: Callable[[dict[str, Any]], None],
    name: str,
    argv: list[str] | None = None,
    omit: Sequence[str] = (),
) -> int:
    """Parse, check for root, measure, write `results/<name>.json`, print a table (or the JSON
    without the keys `omit`, e.g. raw samples)."""
    default = RESULTS_DIR / f"{name}.json"
    parser.add_argument("--results", type=Path, default=default, help=f"JSON file (default {default})")
    parser.add_argument("--output", choices=["table", "json"], default="table", help="default table")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("needs root: it creates network namespaces")
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = measure(args)
    except BenchError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 1
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    if args.output == "json":
        print(json.dumps({k: v for k, v in result.items() if k not in omit}, indent=2))
    else:
        render(result)
        print(f"written to {args.results}")
    return 0
