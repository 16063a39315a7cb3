"""Exceptions shared by every pidrt module.

Every error a user can cause derives from ``PidrtError`` so the CLI and the HTTP service can
report it as a clean message instead of a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class PidrtError(Exception):
    """An error caused by input, configuration or environment, reported without a traceback."""


class MissingDependencyError(PidrtError, ImportError):
    """An optional package is not installed; the message names the pip extra that brings it."""


class FormatError(PidrtError, ValueError):
    """A file or tensor dictionary does not have the layout that was expected."""


def require(module: str, extra: str) -> ModuleType:
    """Import an optional heavy dependency, or fail naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"'{module}' is needed here but is not importable ({exc}). "
            f"Install it with: pip install 'pidrt[{extra}]'"
        ) from exc
