"""One exception family for the whole toolchain.

Every error says what was asked, what was found and, where there is one, what to do. The CLI turns these
into one-line messages at the edge; library users catch `TrmExportError`.
"""

from __future__ import annotations

import re


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


# C0 controls but tab and newline, DEL, C1 controls (ESC's 8-bit twin CSI among them), and the Unicode line
# separators and bidirectional overrides that can make printed text read other than it is.
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` safe for a terminal: every character that could drive it (an ESC sequence that recolours, moves the
    cursor or retitles the window, a carriage return that overwrites the line) shown as an escape instead.

    The one sanitiser for whatever trm-export prints that came from a file, a bundle or a request: file names,
    graph input names, manifest values, request lines. Tabs and newlines stay (the CLI keeps errors to one line
    on its own)."""
    return _UNPRINTABLE.sub(lambda m: repr(m.group())[1:-1], text)
