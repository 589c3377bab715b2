"""The one base of every error servekit reports to a person: a one-line message and an exit status.

Each area keeps its own subclass so callers can catch what they handle (``DeployError``,
``ProxyError``, ``GuardError``, ``ServerError``, ``StateLockError``, ``IntegrityError``,
``TorchServeError``, ``StateError``, ``SpecError``, ``BuildError``); the command lines catch
``ServekitError`` once and print ``str(error)`` on one line (click's ``ClickException`` does the same):

    try:
        ...
    except ServekitError as error:
        print(f"servekit: error: {error}", file=sys.stderr)
        return error.exit_code

Pure Python with no imports: the torch-free operator side and the build side both derive from it.
"""

from __future__ import annotations


class ServekitError(RuntimeError):
    """A failure or refusal whose message is meant for the user, on one line."""

    exit_code = 1


def one_line(text: object, limit: int = 300) -> str:
    """``text`` with every run of white space (newlines included) folded to one space, cut at ``limit``."""
    return " ".join(str(text).split())[:limit]
