"""Builds the one extension, fastcluster._core, from fastcluster/_core.pyx and csrc/*.c."""

import glob
import os
import sys

from setuptools import Extension, setup

if not sys.platform.startswith("linux"):
    sys.exit("fastcluster needs Linux (epoll, SOCK_SEQPACKET, memfd, PR_SET_PDEATHSIG)")

from Cython.Build import cythonize  # noqa: E402  (after the platform check)

# FASTCLUSTER_SANITIZE=address,undefined builds the core for the sanitizer runs.
sanitize = os.environ.get("FASTCLUSTER_SANITIZE", "")
extra_compile = ["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror"]
extra_link: list[str] = []
if sanitize:
    extra_compile += [f"-fsanitize={sanitize}", "-fno-omit-frame-pointer", "-O1", "-g"]
    extra_link += [f"-fsanitize={sanitize}"]

core = Extension(
    "fastcluster._core",
    sources=["fastcluster/_core.pyx", *sorted(glob.glob("csrc/*.c"))],
    include_dirs=["csrc"],
    extra_compile_args=extra_compile,
    extra_link_args=extra_link,
)

setup(ext_modules=cythonize([core], language_level=3, include_path=["fastcluster"]))
