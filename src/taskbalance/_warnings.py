"""Warnings attributed to the user's line: the first frame outside taskbalance and torch.

The depth of a balancer's call varies (``nn.Module``'s hooks, ``torch.compiler.disable``, DDP),
so a fixed ``stacklevel`` would point into the library; and a warning issued later from an
autograd hook has no frame of the user's above it at all (on a GPU the hook runs on
autograd's own thread), so its location is taken at the call.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import torch

#: Frames in these folders are not the user's: a warning points past them.
_LIBRARY_FOLDERS = tuple(os.path.dirname(path) + os.sep for path in (str(torch.__file__), __file__))

#: File, line and module globals of a frame.
Location = tuple[str, int, dict[str, Any]]


def callers_location() -> Location:
    """Where the first frame outside taskbalance and torch (above this call) is."""
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARY_FOLDERS):
        frame = frame.f_back
    return frame.f_code.co_filename, frame.f_lineno, frame.f_globals


def warn_at(location: Location, message: str) -> None:
    """A ``RuntimeWarning`` attributed to ``location``, through the warning filters (``-W
    error`` turns it into an exception here) and once per location by default."""
    filename, line, module_globals = location
    warnings.warn_explicit(
        message,
        RuntimeWarning,
        filename,
        line,
        module=module_globals.get("__name__"),
        registry=module_globals.setdefault("__warningregistry__", {}),
        module_globals=module_globals,
    )


def warn_at_callers_line(message: str) -> None:
    """A ``RuntimeWarning`` attributed to the user's line that led here."""
    warn_at(callers_location(), message)
