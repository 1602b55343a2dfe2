"""How lab commands tell what they do: a callback given one line at a time.

Why a callback and not print: the CLI prints plain lines, the demo indents them into its tour,
and tests or scripts may stay quiet; the commands need not know which.
"""

from __future__ import annotations

from collections.abc import Callable

Report = Callable[[str], None]


def quiet(_line: str) -> None:
    """The default report: say nothing."""
