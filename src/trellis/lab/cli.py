"""`trellis lab ...` (placeholder until the lab lands)."""

from __future__ import annotations

import argparse
from typing import Any


def add_lab_parser(sub: Any) -> None:
    lab: argparse.ArgumentParser = sub.add_parser("lab", help="a virtual cluster on this machine")
    lab.set_defaults(func=lambda _args: 2)
