"""Type aliases shared by pycpt's modules."""

import enum
import os
from typing import Union

#: A file system path as pycpt's functions take it: text or an os.PathLike of text.
PathLike = Union[str, "os.PathLike[str]"]


class NamedIntEnum(enum.IntEnum):
    """An IntEnum that prints as its name (`FROZEN`, not `2`), while it still compares, and
    goes into JSON, as its number."""

    def __str__(self) -> str:
        return self.name

    def __format__(self, spec: str) -> str:
        return self.name if not spec else format(int(self), spec)
