"""NVRTC through ctypes, and a compile worker: ``python nvrtc.py < request``.

Standard library only, so that `jit.compile_spec` runs it as a script in a
process of its own (``python -I -S``: no site packages, nothing of MLX or
this package imported): NVRTC compiles one program at a time per process,
and several worker processes compile side by side.

The request (JSON on stdin): ``library`` (the path of libnvrtc), ``source``,
``kernel`` (the name expression to lower), ``options`` and ``headers``
(name to text, compiled from memory). The reply (JSON on stdout): the cubin,
base64, and the kernel's ``mangled`` name; a failure exits 1 with the log.
"""

from __future__ import annotations

import base64
import ctypes
import json
import sys


class NvrtcError(RuntimeError):
    pass


class Nvrtc:
    """The functions of libnvrtc that compile one program to a cubin."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.lib = library
        self.lib.nvrtcGetErrorString.restype = ctypes.c_char_p

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            raise NvrtcError(f"{what}: {self.lib.nvrtcGetErrorString(result).decode()}")

    def compile(
        self, source: str, kernel: str, options: list[str], headers: dict[str, str]
    ) -> tuple[bytes, str]:
        """``source`` compiled to a cubin, and ``kernel``'s lowered name."""
        lib, prog = self.lib, ctypes.c_void_p()
        texts = (ctypes.c_char_p * len(headers))(*(t.encode() for t in headers.values()))
        names = (ctypes.c_char_p * len(headers))(*(n.encode() for n in headers))
        created = lib.nvrtcCreateProgram(
            ctypes.byref(prog), source.encode(), b"moefuse.cu", len(headers), texts, names
        )
        self._check(created, "nvrtcCreateProgram")
        try:
            self._check(lib.nvrtcAddNameExpression(prog, kernel.encode()), "nvrtcAddNameExpression")
            args = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
            if lib.nvrtcCompileProgram(prog, len(options), args) != 0:
                raise NvrtcError(f"compile failed: {self._log(prog)[-2000:]}")
            lowered = ctypes.c_char_p()
            self._check(
                lib.nvrtcGetLoweredName(prog, kernel.encode(), ctypes.byref(lowered)),
                "nvrtcGetLoweredName",
            )
            size = ctypes.c_size_t()
            self._check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
            binary = ctypes.create_string_buffer(size.value)
            self._check(lib.nvrtcGetCUBIN(prog, binary), "nvrtcGetCUBIN")
            return binary.raw, (lowered.value or b"").decode()
        finally:
            lib.nvrtcDestroyProgram(ctypes.byref(prog))

    def _log(self, prog: ctypes.c_void_p) -> str:
        size = ctypes.c_size_t()
        self.lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value + 1)
        self.lib.nvrtcGetProgramLog(prog, log)
        return log.value.decode(errors="replace")


def main() -> int:
    request = json.load(sys.stdin)
    try:
        compiler = Nvrtc(ctypes.CDLL(request["library"]))
        binary, mangled = compiler.compile(
            request["source"], request["kernel"], request["options"], request["headers"]
        )
    except (OSError, NvrtcError) as error:
        print(error, file=sys.stderr)
        return 1
    json.dump({"cubin": base64.b64encode(binary).decode(), "mangled": mangled}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
