"""One exception family for the whole toolchain.

Every error says what was asked, what was found and, where there is one, what to do. The CLI turns these
into one-line messages at the edge; library users catch `TrmExportError`.
"""

from __future__ import annotations


class TrmExportError(Exception):
    """Base class of every error the toolchain raises on purpose."""


class CheckpointError(TrmExportError):
    """A checkpoint file, its config or its data-set description cannot be used as given."""

    def __init__(self, path: object, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class ConfigError(TrmExportError):
    """A model configuration is incomplete or inconsistent."""


class InputError(TrmExportError):
    """Puzzles or other user data do not fit the model."""


class BundleError(TrmExportError):
    """A bundle is missing, corrupt, or does not match its manifest."""
