"""Build hook: compiles the cffi extension pycpt._cpt from csrc/ (metadata is in pyproject.toml)."""

from setuptools import setup
from setuptools.command.build_ext import build_ext


class build_ext_with_hint(build_ext):
    """Turn a compiler failure into a message that names what to install."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # distutils raises several unrelated types here
            raise SystemExit(
                f"pycpt: building the C layer failed ({exc}).\n"
                "It needs a C compiler and the Python headers: on Debian/Ubuntu run\n"
                "    apt-get install gcc python3-dev\n"
                "(on Fedora: dnf install gcc python3-devel), then install pycpt again."
            ) from exc


setup(
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
    cmdclass={"build_ext": build_ext_with_hint},
)
