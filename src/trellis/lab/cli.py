"""`trellis lab ...`: the commands of DESIGN.md §4, a virtual cluster on this machine.

Every command takes `--name` (default `lab`). Expected failures (no such lab, a bad manifest,
an unknown pod) print one line to stderr and exit 1, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from trellis.lab import bgp, cluster, demo, frr, nodes, outage
from trellis.lab.errors import LabError
from trellis.lab.manifest import PROTOCOLS, LabObject, parse
from trellis.lab.probe import checks_for
from trellis.lab.process import in_netns
from trellis.lab.state import LabPaths, check_lab_name, check_node_name, load
from trellis.lab.views import matrix_table, nodes_table, pods_table

Handler = Callable[[argparse.Namespace], int]


def _paths(args: argparse.Namespace) -> LabPaths:
    return LabPaths(args.name)


def read_manifest(source: str) -> list[LabObject]:
    """The objects of YAML file `source` ('-': stdin), all validated; LabError naming the fault."""
    if source == "-":
        return parse(sys.stdin.read(), "<stdin>")
    try:
        text = Path(source).read_text()
    except OSError as err:
        raise LabError(f"{source}: {err.strerror}") from None
    return parse(text, source)


def _up(args: argparse.Namespace) -> int:
    cluster.up(
        args.name,
        args.nodes,
        args.backend,
        args.datastore,
        args.subnets,
        report=print,
        bgp_topology=args.bgp_topology,
    )
    return 0


def _node(args: argparse.Namespace) -> int:
    if args.node_command == "add":
        nodes.add(args.name, args.node, report=print)
    else:
        nodes.remove(args.name, args.node, report=print)
    return 0


def _datastore(args: argparse.Namespace) -> int:
    if args.datastore_command == "stop":
        outage.stop_datastore(args.name, report=print)
    else:
        outage.start_datastore(args.name, report=print)
    return 0


def _down(args: argparse.Namespace) -> int:
    removed = cluster.down(args.name)
    print(f"lab {args.name} {'removed' if removed else 'does not exist: nothing to remove'}")
    return 0


def _apply(args: argparse.Namespace) -> int:
    cluster.apply(args.name, read_manifest(args.filename), report=print, wait=not args.no_wait)
    return 0


def _delete(args: argparse.Namespace) -> int:
    cluster.delete(args.name, read_manifest(args.filename), report=print, wait=not args.no_wait)
    return 0


def _probe(args: argparse.Namespace) -> int:
    state = load(_paths(args))
    matrices = cluster.measure(_paths(args), state, checks_for(args.port, args.protocol))
    if args.output == "json":
        out: Any = [m.to_json() for m in matrices]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
        return 0
    console = Console()
    for matrix in matrices:
        console.print(matrix_table(matrix))
    return 0


def _status(args: argparse.Namespace) -> int:
    paths = _paths(args)
    state = load(paths)
    nodes = cluster.node_status(paths, state)
    if args.output == "json":
        print(json.dumps(cluster.status_json(paths, state, nodes), indent=2))
        return 0
    console = Console()
    console.print(nodes_table(state, nodes))
    if state.bgp_topology == "tor":
        console.print(frr.summary(paths, state))
    console.print(pods_table(state))
    return 0


def _env(args: argparse.Namespace) -> int:
    paths = _paths(args)
    for name, value in cluster.env_exports(paths, load(paths), args.node).items():
        print(f"export {name}={shlex.quote(value)}")
    return 0


def _exec(args: argparse.Namespace) -> int:
    pod = load(_paths(args)).pod(args.pod)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise LabError(f"give the command after --, as in: trellis lab exec {args.pod} -- ip addr")
    sys.stdout.flush()
    try:
        in_netns(pod.netns)()  # this process has one thread: it may switch namespace, then exec
    except OSError as err:
        raise LabError(f"pod {args.pod}: cannot enter {pod.netns}: {err.strerror}") from None
    try:
        os.execvp(command[0], command)
    except OSError as err:
        raise LabError(f"{command[0]}: {err.strerror}") from None


def _demo(args: argparse.Namespace) -> int:
    return demo.run(args.name, Console())


def guarded(handler: Handler, command: str) -> Handler:
    """`handler`, printing an expected failure as one line, `COMMAND: message`, and exiting 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except LabError as err:
            print(f"{command}: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{command}: interrupted", file=sys.stderr)
            return 130

    return run


def argument_type(check: Callable[[str], str]) -> Callable[[str], str]:
    """An argparse `type` from a check that raises LabError: a bad value is a usage error."""

    def convert(text: str) -> str:
        try:
            return check(text)
        except LabError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return convert


def add_lab_parser(sub: Any) -> None:
    lab: argparse.ArgumentParser = sub.add_parser(
        "lab",
        help="a virtual cluster on this machine",
        description="A virtual cluster on this machine: network namespaces for a fabric, its nodes "
        "and their pods, a real agent per node, pods attached by the real CNI plugin.",
    )
    commands = lab.add_subparsers(dest="lab_command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--name", default="lab", type=argument_type(check_lab_name), help="the lab (default: lab)"
    )

    def command(name: str, handler: Handler, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(
            name, parents=[common], help=text, description=text
        )
        parser.set_defaults(func=guarded(handler, f"trellis lab {name}"))
        return parser

    up = command("up", _up, "build a lab: a fabric, nodes with their agents, the default namespace")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--backend", choices=cluster.BACKENDS, default="vxlan", help="default vxlan")
    up.add_argument(
        "--bgp-topology",
        choices=bgp.TOPOLOGIES,
        default="mesh",
        help="with --backend bgp: mesh (every node peers with every other), rr (route reflectors "
        "node-1, and node-2 from 4 nodes) or tor (the mesh, and every node peers with a ToR router "
        "running FRR that originates 192.0.2.0/24); default mesh",
    )
    up.add_argument("--datastore", choices=cluster.DATASTORES, default="sqlite", help="default sqlite")
    up.add_argument(
        "--subnets", type=int, default=1, help="underlay subnets the nodes alternate over (default 1)"
    )

    def group(
        name: str, handler: Handler, text: str, verbs: tuple[tuple[str, str], ...]
    ) -> list[argparse.ArgumentParser]:
        """`trellis lab NAME VERB` for each (verb, help) of `verbs`, all run by `handler`, which
        reads the verb from `args.<name>_command`."""
        parent: argparse.ArgumentParser = commands.add_parser(name, help=text, description=text)
        sub = parent.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")
        made: list[argparse.ArgumentParser] = []
        for verb, verb_text in verbs:
            parser: argparse.ArgumentParser = sub.add_parser(
                verb, parents=[common], help=verb_text, description=verb_text
            )
            parser.set_defaults(func=guarded(handler, f"trellis lab {name} {verb}"))
            made.append(parser)
        return made

    node_verbs = (
        ("add", "a new node joins: namespace, uplink, supervised agent; returns once it is registered"),
        ("remove", "a node leaves: its pods, agent, datastore object, namespace; others drop its routes"),
    )
    for verb in group("node", _node, "add a node to the lab, or remove one", node_verbs):
        verb.add_argument("node", type=argument_type(check_node_name), help="the node's name (a DNS label)")
    datastore_verbs = (
        ("stop", "kill the lab's etcd (SIGKILL) and keep it down; the agents keep the network as it is"),
        ("start", "start the lab's etcd again on its data; returns once it is healthy"),
    )
    datastore_text = "stop the lab's etcd (an outage on purpose), or start it again"
    group("datastore", _datastore, datastore_text, datastore_verbs)

    for name, handler, text in (
        ("apply", _apply, "create or update the Namespaces, Pods and policies of a YAML file"),
        ("delete", _delete, "delete the Namespaces (with their pods), Pods and policies of a YAML file"),
    ):
        parser = command(name, handler, text)
        parser.add_argument("-f", "--filename", required=True, help="the YAML file ('-': stdin)")
        parser.add_argument(
            "--no-wait", action="store_true", help="return without waiting for every agent to program it"
        )

    probe_parser = command("probe", _probe, "measure pod-to-pod reachability with real packets")
    probe_parser.add_argument("--port", type=int, help="one port (default: 80 and 81)")
    probe_parser.add_argument(
        "--protocol", type=str.upper, choices=PROTOCOLS, help="one protocol (default: TCP and UDP)"
    )
    probe_parser.add_argument("--output", choices=("table", "json"), default="table", help="default table")

    exec_parser = command("exec", _exec, "run a command inside a pod's network namespace")
    exec_parser.add_argument("pod", help="NAMESPACE/POD")
    exec_parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD...")

    env = command("env", _env, "print the exports for calling a node's CNI plugin by hand")
    env.add_argument("node", help="node-1, node-2, ...")

    status = command("status", _status, "nodes, agents and pods of the lab")
    status.add_argument("--output", choices=("table", "json"), default="table", help="default table")

    command("down", _down, "remove every namespace, link, process and file of the lab")
    command("demo", _demo, "the guided tour: up, pods, the reachability matrix, a policy, down")
