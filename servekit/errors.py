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


class SpecError(ServekitError, ValueError):
    """A mistake in the spec (``models.yaml``), located by model, version and field.

    Raised by the build's spec (``servekit.build.spec``) and by the rollout's reading of a model's
    ``rollout:`` section (``servekit.deploy.rollout.settings``): both read the same file.
    """

    def __init__(self, message: str, model: str | None = None, version: str | None = None, field: str | None = None):
        where = " ".join(part for part in (model, version) if part)
        location = ": ".join(part for part in (where, field) if part)
        super().__init__(f"{location}: {message}" if location else message)
        self.model, self.version, self.field = model, version, field
