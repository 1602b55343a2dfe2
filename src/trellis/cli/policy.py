"""`trellis policy ...`: why a connection is allowed or denied, and what a policy file would change.

Both commands read a lab (`--name`, default `lab`): its datastore holds the cluster's
Kubernetes objects, and its nodes' kernels hold what the agents programmed from them. The
logic lives in `trellis.lab.policy`; this module only parses arguments and prints, as a rich
table or, with `--output json`, as JSON. Expected failures print one line and exit 1.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console

from trellis.lab import policy
from trellis.lab.cli import Handler, argument_type, guarded, read_manifest
from trellis.lab.manifest import PROTOCOLS
from trellis.lab.probe import checks_for
from trellis.lab.state import LabPaths, check_lab_name, load
from trellis.lab.views import diff_table, explanation_table
from trellis.model.k8s import Protocol


def _explain(args: argparse.Namespace) -> int:
    paths = LabPaths(args.name)
    explanation = policy.explain(paths, load(paths), args.src, args.dst, args.port, Protocol(args.protocol))
    if args.output == "json":
        print(json.dumps(explanation.to_json(), indent=2))
    else:
        Console().print(explanation_table(explanation))
    return 0


def _diff(args: argparse.Namespace) -> int:
    paths = LabPaths(args.name)
    objects = read_manifest(args.filename)
    result = policy.diff(paths, load(paths), objects, checks_for(args.port, args.protocol))
    if args.output == "json":
        print(json.dumps(result.to_json(), indent=2))
        return 0
    console = Console()
    console.print(diff_table(result))
    if result.new_pods:
        console.print(f"not in the matrix (the file creates them): {', '.join(result.new_pods)}")
    return 0


def add_policy_parser(sub: Any) -> None:
    parser: argparse.ArgumentParser = sub.add_parser(
        "policy",
        help="explain a lab's policy decisions; preview what a policy file would change",
        description="Explain a lab's policy decisions, and preview what a policy file would change.",
    )
    commands = parser.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--name", default="lab", type=argument_type(check_lab_name), help="the lab (default: lab)"
    )
    common.add_argument("--output", choices=("table", "json"), default="table", help="default table")

    def command(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        verb: argparse.ArgumentParser = commands.add_parser(
            name, parents=[common], help=text, description=text
        )
        verb.set_defaults(func=guarded(handler, f"trellis policy {name}"))
        return verb

    explain = command(
        "explain",
        _explain,
        "the verdict on a connection, the tier, policy and rule that decide it in each direction, "
        "and the kernel counter of that rule",
    )
    explain.add_argument("src", help="NAMESPACE/POD or an IPv4 address")
    explain.add_argument("dst", help="NAMESPACE/POD or an IPv4 address")
    explain.add_argument("--port", type=int, required=True, help="destination port")
    explain.add_argument(
        "--protocol", type=str.upper, choices=[p.value for p in Protocol], default="TCP", help="default TCP"
    )

    diff = command(
        "diff",
        _diff,
        "the reachability cells a YAML file would change if applied (nothing is applied)",
    )
    diff.add_argument("-f", "--filename", required=True, help="the YAML file ('-': stdin)")
    diff.add_argument("--port", type=int, help="one port (default: 80 and 81)")
    diff.add_argument(
        "--protocol", type=str.upper, choices=PROTOCOLS, help="one protocol (default: TCP and UDP)"
    )
