"""Type aliases shared by pycpt's modules."""

import os
from typing import Union

#: A file system path as pycpt's functions take it: text or an os.PathLike of text.
PathLike = Union[str, "os.PathLike[str]"]
