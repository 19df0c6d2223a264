"""The one exception type for expected, user-facing failures.

Library code raises :class:`ZkdError` with a one-line message that names the problem and the fix; the CLI
prints it without a traceback and exits non-zero. Anything else escaping is a bug and keeps its traceback.
"""

__all__ = ["ZkdError"]


class ZkdError(Exception):
    """An expected failure caused by the user's input or environment (bad option, missing file, ...)."""
