"""The one exception the lab's commands raise for an expected failure.

The CLI prints its message as one line and exits non-zero, without a traceback: a lab that
does not exist, a bad manifest or an unknown pod is the user's input, not a bug.
"""


class LabError(Exception):
    """An expected failure; the message names the object and the cause."""


class LabNotFound(LabError):
    """The lab named does not exist (or was removed while the command waited for it)."""
