"""Validation of the command's --json output against its documented schemas."""

from __future__ import annotations

from typing import Any

import jsonschema

from pycpt.cli import JSON_SCHEMAS


def validate(data: Any, verb: str) -> None:
    """Raise jsonschema.ValidationError unless `data` fits what `pycpt VERB --json` says."""
    jsonschema.validate(data, JSON_SCHEMAS[verb], cls=jsonschema.Draft202012Validator)
