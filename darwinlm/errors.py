"""Specific exceptions of the library, and the exit codes the entrypoints map them to.

Entrypoints (the CLI, the Kubernetes jobs) return :func:`exit_code`: ``SpecError``,
``InfeasibleTargetError``, ``PlanError`` and ``WorldConfigError`` are permanent (the same input fails
the same way again), ``StoreError`` and connection errors are retriable, ``PeerFailure`` is whichever its
cause was. The operator's retry policy reads the same codes.
"""

from __future__ import annotations

EXIT_OK, EXIT_ERROR, EXIT_PERMANENT, EXIT_RETRIABLE = 0, 1, 2, 3
"""0 done; 1 anything else (a crash: retried and counted); 2 permanent (retrying cannot help); 3 retriable
(store unreachable, a distributed peer lost)."""


class DarwinLMError(Exception):
    """Base class of every error the library raises on purpose."""


class SpecError(DarwinLMError):
    """The spec is invalid. ``errors`` lists every problem as ``(field_path, message)``.

    ``field_path`` uses dots and indices, e.g. ``search.selection[2].survivors``.
    """

    def __init__(self, errors: list[tuple[str, str]] | str, path: str | None = None):
        if isinstance(errors, str):
            errors = [(path or "", errors)]
        self.errors: list[tuple[str, str]] = list(errors)
        super().__init__(self._render())

    def _render(self) -> str:
        lines = [f"{p or '<root>'}: {m}" for p, m in self.errors]
        head = f"{len(lines)} error(s) in spec" if len(lines) != 1 else "invalid spec"
        return head + ":\n  " + "\n  ".join(lines)

    @property
    def first_path(self) -> str:
        return self.errors[0][0] if self.errors else ""


class StoreError(DarwinLMError):
    """An artifact store operation failed (network, permissions, missing bucket...). Retriable."""


class ArtifactNotFound(StoreError):
    """The requested key does not exist (or its write never completed)."""


class ChecksumMismatch(StoreError):
    """The bytes read do not match the checksum recorded when they were written.

    ``uri``: the corrupt artifact (``<store uri>/<key>``), so a caller can recompute it."""

    def __init__(self, message: str, uri: str | None = None):
        super().__init__(message)
        self.uri = uri


class InfeasibleTargetError(DarwinLMError):
    """The search target cannot be reached with the level ladders (e.g. beyond the last level)."""


class PlanError(DarwinLMError):
    """Named tasks cannot run: not tasks of the spec's plan, an earlier phase is incomplete, or several
    workers for a task that runs on one (permanent: a usage error)."""


class WorldConfigError(DarwinLMError, ValueError):
    """The distributed environment variables are missing or inconsistent (permanent)."""


class PeerFailure(DarwinLMError):
    """Another rank failed (or died) during a distributed generation. ``permanent`` when its error was."""

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def exit_code(error: BaseException) -> int:
    """The exit code an entrypoint returns for ``error`` (see the module docstring)."""
    if isinstance(error, PeerFailure):
        return EXIT_PERMANENT if error.permanent else EXIT_RETRIABLE
    if isinstance(error, (SpecError, InfeasibleTargetError, PlanError, WorldConfigError)):
        return EXIT_PERMANENT
    if isinstance(error, (StoreError, ConnectionError, TimeoutError)):
        return EXIT_RETRIABLE
    return EXIT_ERROR
