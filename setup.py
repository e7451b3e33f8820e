"""Builds the compiled kernel, ``fastfib._kernel``; all metadata is in pyproject.toml.

The extension is compiled against the GMP that the gmpy2 wheel ships: the
headers (gmp.h, gmpy2.h, gmpy2.pxd) are in the wheel's ``gmpy2/`` folder, and
the library is the hashed ``libgmp-*.so`` in ``gmpy2.libs/``, linked by its
file name with an rpath of ``$ORIGIN/../gmpy2.libs`` so that the process holds
one GMP, the one gmpy2 uses.

The kernel's two-thread mode (``fib(n, threads=2)``) uses POSIX threads and
semaphores, so the extension is compiled and linked with ``-pthread`` (on
glibc >= 2.34 these live in libc itself; the flag keeps older systems working).

Build knobs (environment variables):

- ``FASTFIB_DEBUG=1``: build with ``-O0 -g`` and Cython line tracing off.
- ``FASTFIB_CFLAGS``: extra compiler flags, split on spaces (e.g. ``-march=native``).
- ``FASTFIB_ANNOTATE=1``: write Cython's HTML annotation next to the .pyx.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


def _gmpy2_paths() -> tuple[str, str, str]:
    """The gmpy2 package folder, its bundled-libs folder and the libgmp file in it."""
    try:
        import gmpy2
    except ImportError:
        sys.exit("fastfib: building needs gmpy2 (it is in [build-system].requires; pip installs it)")
    pkg = os.path.dirname(os.path.abspath(gmpy2.__file__))
    if not os.path.exists(os.path.join(pkg, "gmpy2.h")) or not os.path.exists(os.path.join(pkg, "gmp.h")):
        sys.exit(f"fastfib: gmpy2 at {pkg} ships no C headers; install the gmpy2 wheel from PyPI")
    libs = os.path.join(os.path.dirname(pkg), "gmpy2.libs")
    found = sorted(glob.glob(os.path.join(libs, "libgmp-*.so*")))
    if not found:
        sys.exit(f"fastfib: no bundled libgmp in {libs}; fastfib links the GMP of the gmpy2 manylinux wheel")
    return pkg, libs, os.path.basename(found[0])


class BuildExt(build_ext):
    """An in-place build (for a development checkout) also records the absolute
    path of the venv's gmpy2.libs, since ``$ORIGIN/..`` is then the repository.

    An in-place build replaces the extension atomically: processes that run
    the checkout (servers, tests) keep the file they mapped, where an in-place
    overwrite could crash them.
    """

    def run(self):
        # setuptools clears self.inplace while it builds, so look before that.
        if self.inplace or getattr(self, "editable_mode", False):
            _, libs, _ = _gmpy2_paths()
            for ext in self.extensions:
                ext.runtime_library_dirs.append(os.path.abspath(libs))
        super().run()

    def build_extensions(self):
        # Some interpreters (pyenv's, for one) put an rpath to their own lib/ into
        # LDSHARED; the extension needs no libpython, and a wheel must not carry
        # a path of the build machine: gmpy2.libs is its only rpath.
        self.compiler.linker_so = [a for a in self.compiler.linker_so if not a.startswith("-Wl,-rpath")]
        super().build_extensions()

    def copy_file(self, infile, outfile, *args, **kwargs):
        # Only copy_extensions_to_source copies here: the built library onto the checkout's.
        tmp = f"{outfile}.tmp-{os.getpid()}"
        shutil.copy2(infile, tmp)
        os.replace(tmp, outfile)
        return outfile, 1


def _extension() -> Extension:
    from Cython.Build import cythonize

    pkg, libs, libgmp = _gmpy2_paths()
    debug = os.environ.get("FASTFIB_DEBUG") == "1"
    cflags = ["-O0", "-g"] if debug else ["-O3"]
    cflags += ["-pthread"]
    cflags += os.environ.get("FASTFIB_CFLAGS", "").split()
    ext = Extension(
        "fastfib._kernel",
        ["fastfib/_kernel.pyx"],
        include_dirs=[pkg],
        library_dirs=[libs],
        libraries=[":" + libgmp],
        runtime_library_dirs=["$ORIGIN/../gmpy2.libs"],
        extra_compile_args=cflags,
        extra_link_args=["-pthread"],
    )
    return cythonize(
        [ext],
        include_path=[os.path.dirname(pkg)],
        compiler_directives={"language_level": "3"},
        annotate=os.environ.get("FASTFIB_ANNOTATE") == "1",
    )[0]


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExt})
