"""Kernel builds: each custom kernel variant compiled once per machine, at install.

MLX builds an ``mx.fast.cuda_kernel`` at its first launch in a process: NVRTC
compiles the generated translation unit and the module lives in memory only.
MLX's disk cache of compiled modules (``MLX_PTX_CACHE_DIR``, by default
``$TMPDIR/mlx/<version>/ptx``) is *read* for every module, custom kernels
included, but *written* only for MLX's own kernels
(mlx/backend/cuda/jit_module.cpp, custom_kernel.cpp). So every new process
compiled every variant again, on its first requests.

This module puts ours where MLX looks:

* `KernelSpec` is one variant as MLX sees it (name, inputs, template
  constants, header, body): `KernelSpec.mlx_source` is the translation unit
  MLX generates, `KernelSpec.module_name` the name MLX files it under
  (``<kernel>_<hex std::hash of that source>``; `std_hash` is libstdc++'s).
* `prepare` makes MLX's cache hold the variant's module: copied from the
  package's own store (`cache_dir`), or compiled with the NVRTC library MLX
  loaded and MLX's options (`compile_spec`, in a worker process: nvrtc.py),
  then written to both.
* `prepare_all` prepares many variants side by side; `install` calls it for
  every variant its fused layers can launch, and `launch` for any variant
  it did not foresee, before MLX first sees it.

A cache entry is never a correctness risk: the module name hashes the whole
source, whose header names a digest of the package's kernel files and the
GPU architecture (`source.kernel_header`), so an entry of other sources or
another GPU is simply never looked up; a store entry carries the SHA-256 of
its binary and is ignored when it does not match; every file appears by an
atomic rename, so concurrent or interrupted writers leave a whole file or
none. Whatever fails here (no NVRTC, a compile error, a read-only disk),
MLX compiles the variant itself at its first launch, as it would without
this module.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import cast

import mlx.core as mx

from ..config import CACHE_ENV
from . import nvrtc
from .nvrtc import NvrtcError

logger = logging.getLogger(__name__)

CUDA_TYPES = {
    mx.bfloat16: "__nv_bfloat16",
    mx.float16: "__half",
    mx.float32: "float",
    mx.uint8: "uint8_t",
    mx.uint32: "uint32_t",
    mx.int32: "int32_t",
}
"""MLX's ``dtype_to_cuda_type`` (mlx/backend/cuda/utils.cpp), for the dtypes the kernels take."""

TYPE_STRINGS = {
    mx.bfloat16: "bfloat16_t",
    mx.float16: "float16_t",
    mx.float32: "float",
    mx.uint8: "uint8_t",
    mx.uint32: "uint32_t",
    mx.int32: "int32_t",
}
"""MLX's ``get_type_string`` (mlx/backend/common/compiled.cpp): dtypes in kernel names."""

MLX_DEFAULT_HEADER = (
    '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
)
"""What MLX puts before every custom kernel's header (custom_kernel.cpp)."""

UTILS_STAND_IN = """#pragma once
#include "mlx/backend/cuda/device/config.h"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda/std/array>
namespace mlx::core::cu {
using Shape = cuda::std::array<int32_t, MAX_NDIM>;
using Strides = cuda::std::array<int64_t, MAX_NDIM>;
}
"""
"""What the kernels need of MLX's device/utils.cuh, which MLX compiles from
memory and does not ship: its includes and the Shape and Strides types of
kernel parameters. The kernels use nothing else of it."""


SHAPE_PARAMS = (("_shape", "Shape"), ("_strides", "Strides"), ("_ndim", "int"))
"""What MLX passes after an input its kernel body names ``<input><suffix>``."""


@dataclass(frozen=True)
class KernelSpec:
    """One kernel variant, as ``mx.fast.cuda_kernel`` is given it and launches it.

    ``inputs`` are (name, dtype, ndim) of the arrays passed, ``outputs``
    (name, dtype), ``template`` the template constants in order.
    """

    name: str
    inputs: tuple[tuple[str, mx.Dtype, int], ...]
    outputs: tuple[tuple[str, mx.Dtype], ...]
    template: tuple[tuple[str, object], ...]
    header: str
    source: str

    @property
    def kernel_name(self) -> str:
        """The ``__global__`` function MLX generates (custom_kernel.cpp:
        ``template_arguments_hash``)."""
        parts = []
        for _, value in self.template:
            if isinstance(value, bool):
                parts.append("_t" if value else "_f")
            elif isinstance(value, int):
                parts.append(f"_{value}")
            else:
                parts.append(f"_{TYPE_STRINGS[cast(mx.Dtype, value)]}")
        return f"custom_kernel_{self.name}{''.join(parts)}"

    def mlx_source(self) -> str:
        """The translation unit MLX builds (custom_kernel.cpp: ``build_kernel``)."""
        lines = [
            MLX_DEFAULT_HEADER,
            self.header,
            "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n",
            f"__global__ void {self.kernel_name}(\n",
        ]
        for name, dtype, ndim in self.inputs:
            lines.append(f"    const {CUDA_TYPES[dtype]}* {name},\n")
            if ndim > 0:
                for suffix, kind in SHAPE_PARAMS:
                    if name + suffix in self.source:
                        lines.append(f"    const __grid_constant__ {kind} {name}{suffix},\n")
        for i, (name, dtype) in enumerate(self.outputs):
            end = ",\n" if i < len(self.outputs) - 1 else ") {\n"
            lines.append(f"    {CUDA_TYPES[dtype]}* {name}{end}")
        for name, value in self.template:
            if isinstance(value, bool):
                lines.append(f"  constexpr bool {name} = {'true' if value else 'false'};\n")
            elif isinstance(value, int):
                lines.append(f"  constexpr int {name} = {value};\n")
            else:
                lines.append(f"  using {name} = {CUDA_TYPES[cast(mx.Dtype, value)]};\n")
        if self.template:
            lines.append("\n")
        lines += [self.source, "\n}\n\n} // namespace mlx::core::cu\n"]
        return "".join(lines)

    @cached_property
    def module_name(self) -> str:
        """The name MLX looks the compiled module up by (custom_kernel.cpp)."""
        return f"{self.kernel_name}_{std_hash(self.mlx_source().encode()):x}"


_MASK = (1 << 64) - 1
_MUL = (0xC6A4A793 << 32) + 0x5BD1E995
_SEED = 0xC70F6907


def _shift_mix(v: int) -> int:
    return v ^ (v >> 47)


def std_hash(data: bytes) -> int:
    """``std::hash<std::string>`` of libstdc++ on 64-bit Linux: ``_Hash_bytes``
    (libstdc++-v3/libsupc++/hash_bytes.cc) with its seed 0xc70f6907."""
    length = len(data)
    aligned = length & ~7
    h = (_SEED ^ (length * _MUL)) & _MASK
    for (word,) in struct.iter_unpack("<Q", data[:aligned]):
        h ^= (_shift_mix((word * _MUL) & _MASK) * _MUL) & _MASK
        h = (h * _MUL) & _MASK
    if length & 7:
        h ^= int.from_bytes(data[aligned:], "little")
        h = (h * _MUL) & _MASK
    h = (_shift_mix(h) * _MUL) & _MASK
    return _shift_mix(h)


# -- the device ---------------------------------------------------------------


def mlx_version() -> str:
    """MLX's version, which names its caches (MLX's stubs do not declare it)."""
    return str(getattr(mx, "__version__"))  # noqa: B009


def device_arch() -> str:
    """'sm_90' and the like, as MLX reports the default GPU."""
    return str(mx.device_info().get("architecture", ""))


def device_name() -> str:
    """The default GPU's name, as MLX reports it ('NVIDIA H100 80GB HBM3')."""
    return str(mx.device_info().get("device_name", ""))


def arch_number(arch: str) -> int:
    digits = arch.removeprefix("sm_").rstrip("a")
    return int(digits) if digits.isdigit() else 0


@cache
def kernel_arch() -> str:
    """The architecture the kernels are compiled for on this machine's GPU."""
    return nvrtc_arch(device_arch())


def nvrtc_arch(arch: str) -> str:
    """The ``--gpu-architecture`` MLX compiles for (jit_module.cpp): the SASS of
    the device, with the architecture-specific features from sm_90 on."""
    number = arch_number(arch)
    return f"sm_{number}{'a' if number >= 90 else ''}"


# -- where the modules live ---------------------------------------------------


def cache_dir() -> Path:
    """The package's store: ``MOEFUSE_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/moefuse_runtime``, else ``~/.cache/moefuse_runtime``."""
    own = os.environ.get(CACHE_ENV, "").strip()
    if own:
        return Path(own).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "moefuse_runtime"


def mlx_cache_dir() -> Path:
    """Where MLX reads compiled modules (jit_module.cpp: ``ptx_cache_dir``;
    ``std::filesystem::temp_directory_path`` reads TMPDIR, TMP, TEMP, TEMPDIR)."""
    own = os.environ.get("MLX_PTX_CACHE_DIR")
    if own:
        return Path(own)
    tmp = next(
        (os.environ[v] for v in ("TMPDIR", "TMP", "TEMP", "TEMPDIR") if os.environ.get(v)), "/tmp"
    )
    return Path(tmp) / "mlx" / mlx_version() / "ptx"


def mlx_module_path(directory: Path, module_name: str) -> Path:
    """jit_module.cpp: ``get_ptx_path`` (names over 245 characters become folders)."""
    limit = 245
    path = directory
    while len(module_name) > limit:
        path, module_name = path / module_name[:limit], module_name[limit:]
    return path / f"{module_name}.ptx"


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Module:
    """A compiled module: its cubin and the lowered name of its kernel."""

    binary: bytes
    mangled: str

    MAGIC = b"moefuse-kernel 1\n"

    def to_bytes(self) -> bytes:
        meta = {"mangled": self.mangled, "sha256": hashlib.sha256(self.binary).hexdigest()}
        return self.MAGIC + json.dumps(meta).encode() + b"\n" + self.binary

    @classmethod
    def from_bytes(cls, data: bytes) -> Module | None:
        """The module, or None for anything that is not a whole, intact entry."""
        if not data.startswith(cls.MAGIC):
            return None
        meta_line, _, binary = data[len(cls.MAGIC) :].partition(b"\n")
        try:
            meta = json.loads(meta_line)
            mangled, digest = str(meta["mangled"]), str(meta["sha256"])
        except (ValueError, KeyError, TypeError):
            return None
        if not binary or hashlib.sha256(binary).hexdigest() != digest:
            return None
        return cls(binary, mangled)


def store_path(module_name: str) -> Path:
    return cache_dir() / "kernels" / mlx_version() / f"{module_name}.bin"


def read_store(module_name: str) -> Module | None:
    try:
        return Module.from_bytes(store_path(module_name).read_bytes())
    except OSError:
        return None


def write_mlx_cache(spec: KernelSpec, module: Module) -> None:
    """The two files MLX reads: the names first, then the binary (MLX opens
    the binary first, and a binary without its names would find no kernel)."""
    path = mlx_module_path(mlx_cache_dir(), spec.module_name)
    names = f"mlx::core::cu::{spec.kernel_name}\t{module.mangled}\n".encode()
    _write_atomically(path.with_suffix(".txt"), names)
    _write_atomically(path, module.binary)


def in_mlx_cache(spec: KernelSpec, module: Module | None = None) -> bool:
    """Whether MLX's cache holds this variant (and, given one, this very binary)."""
    path = mlx_module_path(mlx_cache_dir(), spec.module_name)
    try:
        names = path.with_suffix(".txt").read_text()
        if module is None:
            return path.stat().st_size > 0 and names.endswith("\n")
        return names.endswith(f"\t{module.mangled}\n") and path.read_bytes() == module.binary
    except OSError:
        return False


# -- NVRTC --------------------------------------------------------------------


def _loaded_library(fragment: str) -> str | None:
    """The path of a shared library this process has mapped, by name fragment."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split(maxsplit=5)[-1].strip()
                if fragment in Path(path).name:
                    return path
    except OSError:
        pass
    return None


@cache
def nvrtc_library() -> str:
    """MLX's NVRTC: the copy mlx's CUDA backend mapped into this process, else
    the one the loader finds by its soname."""
    return _loaded_library("libnvrtc.so") or "libnvrtc.so.13"


def mlx_root() -> Path:
    """The mlx package folder (``mlx/include`` holds the headers MLX compiles with)."""
    return Path(mx.__file__).resolve().parent


def include_paths() -> list[Path]:
    """MLX's include paths for NVRTC (jit_module.cpp: ``include_path_args``)."""
    root = mlx_root()
    paths = [p for p in (root / "include", root / "include" / "cccl") if p.exists()]
    runtime = root.parent / "nvidia" / "cu13" / "include"
    if not runtime.exists():
        home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        runtime = Path(home) / "include"
    return [*paths, runtime]


def compile_options(arch: str) -> list[str]:
    """MLX's NVRTC options (jit_module.cpp: ``compile``) for this architecture."""
    includes = [f"--include-path={p}" for p in include_paths()]
    return ["--device-as-default-execution-space", f"--gpu-architecture={arch}", *includes]


COMPILE_TIMEOUT_S = 600


def compile_spec(spec: KernelSpec, arch: str) -> Module:
    """Compile a variant as MLX would, in a worker process (`nvrtc.py`): the
    compiler's memory never joins the server's and goes back when it ends,
    and a compiler crash is one failed variant; raises NvrtcError on failure."""
    request = {
        "library": nvrtc_library(),
        "source": spec.mlx_source(),
        "kernel": f"mlx::core::cu::{spec.kernel_name}",
        "options": compile_options(arch),
        "headers": {"mlx/backend/cuda/device/utils.cuh": UTILS_STAND_IN},
    }
    try:
        done = subprocess.run(
            [sys.executable, "-I", "-S", nvrtc.__file__],
            input=json.dumps(request).encode(),
            capture_output=True,
            timeout=COMPILE_TIMEOUT_S,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NvrtcError(f"compile worker: {error}") from None
    if done.returncode != 0:
        raise NvrtcError(done.stderr.decode(errors="replace").strip()[-2000:] or "compile failed")
    reply = json.loads(done.stdout)
    return Module(base64.b64decode(reply["cubin"]), reply["mangled"])


# -- preparing variants -------------------------------------------------------

READY, FROM_STORE, COMPILED, FAILED = "ready", "from store", "compiled", "failed"

_prepared: set[KernelSpec] = set()
_failures: dict[KernelSpec, str] = {}
"""Variants that could not be prepared, and why: tried once per process."""
_lock = threading.Lock()


Compiler = Callable[[KernelSpec, str], Module]


def prepare(spec: KernelSpec, arch: str, compiler: Compiler = compile_spec) -> str:
    """Make MLX's cache hold this variant; say where it came from.

    ``READY``: MLX's cache already had it (or this process prepared it);
    ``FROM_STORE``: copied from the package's store; ``COMPILED``: compiled
    here; ``FAILED``: neither, MLX will compile it at its first launch.
    """
    if spec in _prepared:
        return READY
    if spec in _failures:
        return FAILED
    name = spec.module_name
    try:
        module = read_store(name)
        if module is not None and in_mlx_cache(spec, module):
            outcome = READY
        elif module is not None:
            write_mlx_cache(spec, module)
            outcome = FROM_STORE
        else:
            module = compiler(spec, arch)
            _write_store(name, module)
            write_mlx_cache(spec, module)
            outcome = COMPILED
    except Exception as error:  # noqa: BLE001 - MLX compiles it itself, as before
        logger.debug("kernel %s not prepared (%s); MLX compiles it at first use", name, error)
        with _lock:
            _failures.setdefault(spec, f"{type(error).__name__}: {error}")
        return FAILED
    with _lock:
        _prepared.add(spec)
    return outcome


def _write_store(name: str, module: Module) -> None:
    try:
        _write_atomically(store_path(name), module.to_bytes())
    except OSError as error:  # a read-only home: MLX's cache still gets it
        logger.debug("kernel store not written (%s)", error)


@dataclass(frozen=True)
class BuildReport:
    """What `prepare_all` did: variants per outcome, and its wall time."""

    counts: dict[str, int]
    seconds: float

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        parts = ", ".join(f"{n} {k}" for k, n in self.counts.items() if n)
        return f"CUDA kernels: {self.total} variants in {self.seconds:.1f} s ({parts})"


MAX_WORKERS = 8
"""Compiles at once: each takes a core and some hundreds of MB."""


def prepare_all(
    specs: Iterable[KernelSpec],
    arch: str,
    workers: int | None = None,
    compiler: Compiler = compile_spec,
) -> BuildReport:
    """`prepare` every distinct variant, in parallel."""
    start = time.perf_counter()
    unique = list(dict.fromkeys(specs))
    workers = workers or min(MAX_WORKERS, max(1, os.cpu_count() or 1))
    counts = dict.fromkeys((READY, FROM_STORE, COMPILED, FAILED), 0)
    if unique:
        with ThreadPoolExecutor(max_workers=min(workers, len(unique))) as pool:
            for outcome in pool.map(lambda s: prepare(s, arch, compiler), unique):
                counts[outcome] += 1
    if counts[FAILED]:
        reason = next((_failures[s] for s in unique if s in _failures), "")
        logger.warning(
            "%d CUDA kernel variants not compiled ahead (%s): MLX compiles them "
            "at their first launch",
            counts[FAILED],
            reason,
        )
    return BuildReport(counts, time.perf_counter() - start)


def launch(spec: KernelSpec, kernel, **call):
    """Launch ``kernel`` (the ``mx.fast.cuda_kernel`` of ``spec``), preparing the
    variant first if install did not (a variant it could not foresee)."""
    if spec not in _prepared:
        prepare(spec, kernel_arch())
    return kernel(**call)
