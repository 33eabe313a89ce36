"""Checking the arguments of dumpfile's public functions."""

from __future__ import annotations

import os
from typing import Any

from pycpt.errors import InvalidArgumentError


def _path_arg(value: Any, what: str) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value or "\0" in value:
        raise InvalidArgumentError(
            f"{what} must be a non-empty path (str or os.PathLike), not {value!r}"
        )
    return value
