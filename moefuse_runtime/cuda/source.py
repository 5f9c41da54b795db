"""Kernel sources: the package's .cuh files, as MLX's NVRTC build wants them.

`mx.fast.cuda_kernel` compiles a header string and a kernel body; it has no
include path for our files. `header` returns a .cuh file with its local
``#include "..."`` lines replaced by the included files (each once), so the
sources stay ordinary CUDA files that an editor and nvcc read as they are
(scripts/check_kernel_source.py compiles them with -I).
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources

_LOCAL_INCLUDE = re.compile(r'^#include "([\w.]+)"\s*$', re.MULTILINE)


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
