"""Specific exceptions of the library.

Entrypoints (CLI, jobs) map them to exit codes: ``SpecError``/``InfeasibleTargetError`` are permanent
(the same input fails the same way again), ``StoreError`` is retriable unless it is a checksum mismatch
of an artifact that will never change.
"""

from __future__ import annotations


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
    """The bytes read do not match the checksum recorded when they were written."""


class InfeasibleTargetError(DarwinLMError):
    """The search target cannot be reached with the level ladders (e.g. beyond the last level)."""
