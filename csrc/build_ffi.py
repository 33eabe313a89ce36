"""cffi build script (API mode): one extension, pycpt._cpt, from every csrc/<area>.c.

Each area has three files: <area>.c (the shims), <area>.h (their prototypes, included by
the extension) and <area>.cdef (what Python may call; constants written as `...` so the
compiler supplies their values).
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
AREAS = sorted(p.stem for p in HERE.glob("*.cdef"))

ffibuilder = FFI()
ffibuilder.cdef("\n".join((HERE / f"{a}.cdef").read_text() for a in AREAS))
ffibuilder.set_source(
    "pycpt._cpt",
    "\n".join(f'#include "{a}.h"' for a in AREAS),
    sources=[str((HERE / f"{a}.c").relative_to(HERE.parent)) for a in AREAS],
    include_dirs=[str(HERE.relative_to(HERE.parent))],
    extra_compile_args=["-std=gnu11", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
