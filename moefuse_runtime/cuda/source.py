"""Kernel sources: the package's .cuh files, as MLX's NVRTC build wants them.

`mx.fast.cuda_kernel` compiles a header string and a kernel body. Two forms:

* `header`: a .cuh file with its local ``#include "..."`` lines replaced by
  the included files (each once): the whole source as one string, which
  MLX compiles where the package's files are not plain files on disk;
* `kernel_header`, what the launchers pass: one ``#include`` of the file by
  its absolute path (NVRTC reads it, and its own includes beside it, from
  disk), and a line naming a digest of every kernel file and the GPU
  architecture. MLX hashes a custom kernel's whole source at every launch
  to find its compiled module (mlx/backend/cuda/custom_kernel.cpp:
  ``std::hash`` of the source for the module name), so a short source
  keeps that cheap, and the digest line makes the module name change
  whenever a kernel file or the GPU does (cached modules, jit.py). Inlined
  when the package's files are not plain files on disk (a zip import).

The sources stay ordinary CUDA files that an editor and nvcc read as they are.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from importlib import resources
from pathlib import Path

_LOCAL_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$', re.MULTILINE)
_PLAIN_PATH = re.compile(r"^[\w./+-]+$")
"""Paths that an #include line carries as they are (no quotes, backslashes, spaces)."""


def read(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text()


@cache
def header(name: str) -> str:
    """``name`` with its local includes inlined, each file once."""
    seen: set[str] = set()

    def expand(file: str) -> str:
        if file in seen:
            return ""
        seen.add(file)
        text = read(file).replace("#pragma once\n", "")
        return _LOCAL_INCLUDE.sub(lambda m: expand(m.group(1)), text)

    return expand(name)


KERNEL_FILES = ("common.cuh", "gemv.cuh", "grouped_gemm.cuh", "grouped_wgmma.cuh")


@cache
def digest() -> str:
    """SHA-256 of the kernel files, in order: what a compiled module was built from."""
    sha = hashlib.sha256()
    for file in KERNEL_FILES:
        sha.update(read(file).encode())
    return sha.hexdigest()[:32]


@cache
def kernel_header(name: str, arch: str) -> str:
    """What a launcher passes to MLX: an #include of the file where it lies
    on disk, else the inlined `header`, and the line naming what the
    compiled module depends on."""
    path = on_disk(name)
    text = f'#include "{path}"\n' if path is not None else header(name)
    return f"{text}// moefuse_runtime kernels {digest()} for {arch}\n"


def on_disk(name: str) -> Path | None:
    """The absolute path of a source file, if it is a plain file an #include can name."""
    try:
        path = Path(str(resources.files(__package__).joinpath(name))).resolve()
    except (TypeError, OSError):
        return None
    return path if path.is_file() and _PLAIN_PATH.match(path.as_posix()) else None
