"""Kernel builds (cuda/jit.py): MLX's module names, the two caches, and the
variants install prepares. CPU: the compiler is a stand-in; the GPU tests
(tests/test_jit_gpu.py) compile with NVRTC and launch."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time

import mlx.core as mx
import mlx.nn as nn
import pytest
from kernel_checks import quantized_layer

import moefuse_runtime
from moefuse_runtime import cuda
from moefuse_runtime.cuda import grouped, jit

CXX = shutil.which("g++")


@pytest.mark.skipif(CXX is None, reason="needs g++ for libstdc++'s std::hash")
def test_std_hash_is_libstdcxx(tmp_path):
    # MLX names a custom kernel's module by std::hash<std::string> of its source
    spec = jit.KernelSpec(
        "k",
        (("x", mx.bfloat16, 2),),
        (("out", mx.bfloat16),),
        (("T", mx.bfloat16), ("N", 3)),
        "// h\n",
        "out[0] = x[0];",
    )
    samples = ["", "a", "abcdefg", "abcdefgh", "abcdefghi", "x" * 1000, spec.mlx_source()]
    program = tmp_path / "hash.cpp"
    program.write_text(
        "#include <fstream>\n#include <iostream>\n#include <sstream>\n#include <string>\n"
        "int main(int argc, char** argv) { for (int i = 1; i < argc; ++i) {"
        " std::ifstream f(argv[i], std::ios::binary); std::stringstream s; s << f.rdbuf();"
        " std::cout << std::hex << std::hash<std::string>{}(s.str()) << '\\n'; } }\n"
    )
    subprocess.run([CXX, "-O1", "-o", tmp_path / "hash", program], check=True)
    files = []
    for i, text in enumerate(samples):
        files.append(tmp_path / f"s{i}")
        files[-1].write_bytes(text.encode())
    out = subprocess.run([tmp_path / "hash", *files], capture_output=True, text=True, check=True)
    assert out.stdout.split() == [f"{jit.std_hash(t.encode()):x}" for t in samples]


def route_like_spec(**changes) -> jit.KernelSpec:
    spec = grouped.route_spec(128, (16, 64))
    return jit.KernelSpec(**{**spec.__dict__, **changes}) if changes else spec


def test_mlx_source_follows_build_kernel():
    # custom_kernel.cpp: default header, header, the signature with shapes of the
    # inputs the body names, the outputs, the template constants, the body
    spec = grouped.route_spec(128, (16, 64))
    text = spec.mlx_source()
    assert text.startswith(
        '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include '
        "<cooperative_groups.h>\n\n" + spec.header
    )
    assert (
        "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        "__global__ void custom_kernel_moefuse_route_128_16_64(\n"
        "    const uint32_t* experts,\n"
        "    const __grid_constant__ Shape experts_shape,\n"
        "    uint32_t* order,\n    int32_t* tiles_a,\n    int32_t* tiles_b) {\n"
        "  constexpr int E = 128;\n  constexpr int BM_A = 16;\n  constexpr int BM_B = 64;\n\n"
        + grouped.ROUTE_SOURCE
        + "\n}\n\n} // namespace mlx::core::cu\n"
    ) in text
    template = (("T", mx.float16), ("B", False), ("N", 7))
    typed = jit.KernelSpec(
        "g", (("x", mx.float16, 2),), (("out", mx.float16),), template, "", "out[0] = x[0];"
    )
    assert typed.kernel_name == "custom_kernel_g_float16_t_f_7"
    assert "  using T = __half;\n  constexpr bool B = false;\n  constexpr int N = 7;\n" in (
        typed.mlx_source()
    )
    assert "x_shape" not in typed.mlx_source()  # the body reads no shape


def test_module_names_change_with_what_the_binary_depends_on():
    spec = grouped.route_spec(128, (16, 64))
    assert spec.module_name.startswith("custom_kernel_moefuse_route_128_16_64_")
    assert grouped.route_spec(128, (16, 32)).module_name != spec.module_name
    other_gpu = route_like_spec(header=spec.header.replace("for ", "for sm_80 "))
    assert other_gpu.module_name != spec.module_name  # the header names the GPU
    assert "moefuse_runtime kernels " in spec.header  # and a digest of the kernel files


def test_the_module_path_splits_long_names_as_mlx(tmp_path):
    assert jit.mlx_module_path(tmp_path, "short") == tmp_path / "short.ptx"
    name = "n" * 300
    assert jit.mlx_module_path(tmp_path, name) == tmp_path / ("n" * 245) / ("n" * 55 + ".ptx")


def test_cache_folders_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MOEFUSE_CACHE_DIR", str(tmp_path / "own"))
    assert jit.cache_dir() == tmp_path / "own"
    monkeypatch.delenv("MOEFUSE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert jit.cache_dir() == tmp_path / "xdg" / "moefuse_runtime"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert jit.cache_dir() == tmp_path / "home" / ".cache" / "moefuse_runtime"
    monkeypatch.delenv("MLX_PTX_CACHE_DIR", raising=False)
    for name in ("TMPDIR", "TMP", "TEMP", "TEMPDIR"):
        monkeypatch.delenv(name, raising=False)
    assert jit.mlx_cache_dir() == jit.Path("/tmp/mlx") / mx.__version__ / "ptx"
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert jit.mlx_cache_dir() == tmp_path / "mlx" / mx.__version__ / "ptx"
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "mlx-own"))
    assert jit.mlx_cache_dir() == tmp_path / "mlx-own"


def test_store_entries_are_checked():
    module = jit.Module(b"\x7fELF binary", "_Z6kernelv")
    data = module.to_bytes()
    assert jit.Module.from_bytes(data) == module
    assert jit.Module.from_bytes(data[:-1]) is None  # truncated
    assert jit.Module.from_bytes(data[:-1] + b"X") is None  # altered
    assert jit.Module.from_bytes(b"garbage") is None
    assert jit.Module.from_bytes(jit.Module.MAGIC + b"{}\n" + b"bin") is None


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """Empty caches and a process that prepared nothing yet."""
    monkeypatch.setenv("MOEFUSE_CACHE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("MLX_PTX_CACHE_DIR", str(tmp_path / "mlx"))
    monkeypatch.setattr(jit, "_prepared", set())
    monkeypatch.setattr(jit, "_failures", {})
    return tmp_path


class FakeCompiler:
    def __init__(self, delay: float = 0.0):
        self.calls: list[str] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, spec: jit.KernelSpec, arch: str) -> jit.Module:
        time.sleep(self.delay)
        with self.lock:
            self.calls.append(spec.module_name)
        return jit.Module(f"cubin of {spec.module_name} for {arch}".encode(), "_Z1kv")


def test_a_variant_is_compiled_once_per_machine(fresh, monkeypatch):
    spec, compiler = grouped.route_spec(128, (16, 64)), FakeCompiler()
    assert jit.prepare(spec, "sm_90a", compiler) == jit.COMPILED
    path = jit.mlx_module_path(fresh / "mlx", spec.module_name)
    assert path.read_bytes() == f"cubin of {spec.module_name} for sm_90a".encode()
    assert path.with_suffix(".txt").read_text() == (
        f"mlx::core::cu::{spec.kernel_name}\t_Z1kv\n"  # what MLX reads to find the kernel
    )
    assert jit.prepare(spec, "sm_90a", compiler) == jit.READY  # this process: done
    monkeypatch.setattr(jit, "_prepared", set())  # a second process
    assert jit.prepare(spec, "sm_90a", compiler) == jit.READY
    monkeypatch.setattr(jit, "_prepared", set())  # after a reboot cleared MLX's cache
    shutil.rmtree(fresh / "mlx")
    assert jit.prepare(spec, "sm_90a", compiler) == jit.FROM_STORE
    assert path.is_file() and compiler.calls == [spec.module_name]


def test_damaged_entries_are_never_used(fresh, monkeypatch):
    spec, compiler = grouped.route_spec(128, (16, 64)), FakeCompiler()
    jit.prepare(spec, "sm_90a", compiler)
    path = jit.mlx_module_path(fresh / "mlx", spec.module_name)
    path.write_bytes(b"half a cub")  # MLX's copy damaged: rewritten from the store
    monkeypatch.setattr(jit, "_prepared", set())
    assert jit.prepare(spec, "sm_90a", compiler) == jit.FROM_STORE
    assert path.read_bytes().startswith(b"cubin of")
    store = jit.store_path(spec.module_name)
    store.write_bytes(store.read_bytes()[:-3])  # the store's copy damaged: compiled again
    monkeypatch.setattr(jit, "_prepared", set())
    assert jit.prepare(spec, "sm_90a", compiler) == jit.COMPILED
    assert jit.Module.from_bytes(store.read_bytes()) is not None
    assert len(compiler.calls) == 2


def test_a_failed_compile_leaves_mlx_to_compile(fresh, caplog):
    def broken(spec, arch):
        raise jit.NvrtcError("compile failed: error: expected a ';'")

    specs = [grouped.route_spec(128, (16, bm)) for bm in (16, 32, 64)]
    report = jit.prepare_all(specs, "sm_90a", compiler=broken)
    assert report.counts[jit.FAILED] == 3 and report.total == 3
    assert not (fresh / "mlx").exists() and not (fresh / "store").exists()
    assert "3 CUDA kernel variants not compiled ahead (NvrtcError" in caplog.text
    assert jit.prepare(specs[0], "sm_90a", FakeCompiler()) == jit.FAILED  # tried once


def test_concurrent_preparers_leave_whole_files(fresh, monkeypatch):
    # two servers starting at once: both may compile, neither sees half a file
    specs = [grouped.route_spec(128, (16, bm)) for bm in (16, 32, 64, 128)]
    compiler = FakeCompiler(delay=0.01)
    outcomes: list[str] = []

    def server():
        for spec in specs:
            outcomes.append(jit.prepare(spec, "sm_90a", compiler))

    threads = [threading.Thread(target=server) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(outcomes) <= {jit.COMPILED, jit.READY, jit.FROM_STORE}
    for spec in specs:
        binary = jit.mlx_module_path(fresh / "mlx", spec.module_name).read_bytes()
        assert binary == f"cubin of {spec.module_name} for sm_90a".encode()
        assert jit.read_store(spec.module_name) is not None
    assert not [p for p in fresh.rglob("*.tmp")]


def test_prepare_all_runs_in_parallel(fresh):
    specs = [grouped.route_spec(128, (16, bm)) for bm in (16, 32, 64, 128)]
    compiler = FakeCompiler(delay=0.2)
    report = jit.prepare_all(specs * 2, "sm_90a", workers=4, compiler=compiler)
    assert report.counts[jit.COMPILED] == 4 and report.total == 4  # duplicates once
    assert report.seconds < 0.6  # four 0.2 s compiles side by side, not 0.8 s in a row
    assert "4 variants" in report.summary() and "4 compiled" in report.summary()


class Block(nn.Module):
    """A MoE block as mlx-lm writes them: a router, top_k, the experts."""

    def __init__(self, layer: nn.Module, experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(layer.gate_proj.weight.shape[-1] * 8, experts, bias=False)
        self.gate.set_dtype(mx.bfloat16)
        self.switch_mlp = layer

    def __call__(self, x):
        indices = mx.argpartition(-self.gate(x), kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        return self.switch_mlp(x, indices).sum(axis=-2)


class StandInDown(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.hidden = hidden

    def __call__(self, h, indices):
        return mx.zeros((*indices.shape, 1, self.hidden), h.dtype)


def same_array(a: mx.array, b: mx.array) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and mx.array_equal(a, b).item()


def route_of(tokens: int, experts: int, top_k: int) -> mx.array:
    rows = [list(range(t % experts, t % experts + top_k)) for t in range(tokens)]
    return (mx.array([rows]) % experts).astype(mx.uint32)


@pytest.mark.parametrize("mode", ["affine", "mxfp4"])
@pytest.mark.parametrize("quantize_down", [True, False])
def test_install_prepares_every_variant_a_call_launches(launches, monkeypatch, mode, quantize_down):
    prepared: list[jit.KernelSpec] = []

    def record_all(specs, arch, workers=None, compiler=None):
        prepared.extend(specs)
        return jit.BuildReport({jit.COMPILED: len(prepared)}, 0.0)

    monkeypatch.setattr(cuda, "prepare_all", record_all)
    experts, top_k = 64, 4
    layer = quantized_layer(256, 128, experts, mode=mode, quantize_down=quantize_down)
    block = Block(layer, experts, top_k)
    report = moefuse_runtime.install(block, reserve_bytes=0)
    assert f"CUDA kernels: {len(prepared)} variants" in report.summary()
    if not quantize_down:  # MLX's CPU gather_mm takes float32 only: down stands in
        block.switch_mlp.down_proj = StandInDown(256)
    for tokens in (1, 2, 7, 8, 9, 16, 40, 100, 250, 700, 2000, 5000):
        x = mx.zeros((1, tokens, 256), mx.bfloat16)
        mx.eval(block.switch_mlp(x, route_of(tokens, experts, top_k)))
    launched = {spec for spec, _ in launches}
    assert launched and launched <= set(prepared)
    decode_only = {s for s in launched if s.name.startswith("moefuse_gate_up")}
    assert decode_only and any(s.name == grouped.GEMM_NAME for s in launched)


def test_a_call_reads_the_arrays_and_launches_nothing_else(launches, monkeypatch):
    # the hot path: layouts, tilings per size class and compiled functions are
    # bound at install; a call picks its path and reads the layer's arrays as
    # they are now (weights replaced after install are the ones launched)
    layer = quantized_layer(256, 128, 64)
    moefuse_runtime.install(layer, reserve_bytes=0)
    for looked_up in ("buckets", "table_named"):
        monkeypatch.setattr(grouped, looked_up, lambda *_: pytest.fail("looked up per call"))
    monkeypatch.setattr(cuda.QuantizedArrays, "of", lambda *_: pytest.fail("read per call"))
    weight = layer.gate_up_proj.weight = layer.gate_up_proj.weight ^ 1  # other weights
    down_scales = layer.down_proj.scales = layer.down_proj.scales * 2
    mx.disable_compile()  # the compiled calls run as Python: their inputs are seen
    try:
        grouped_kernels = ({grouped.GEMM_NAME}, {grouped.WGMMA_NAME})  # as the table picks
        for tokens, gemms in (
            (1, [{"moefuse_gate_up", "moefuse_down"}]),
            (300, [{grouped.ROUTE_NAME} | kernel for kernel in grouped_kernels]),
        ):
            launches.clear()
            x = mx.zeros((1, tokens, 256), mx.bfloat16)
            mx.eval(layer(x, route_of(tokens, 64, 4)))
            assert {spec.name for spec, _ in launches} in gemms
            weights = [inputs[1:3] for _, inputs in launches if len(inputs) > 2]
            assert any(same_array(w[0], weight) for w in weights)
            assert any(same_array(w[1], down_scales) for w in weights)
    finally:
        mx.enable_compile()


def test_a_block_without_top_k_compiles_at_first_call(as_cuda, monkeypatch):
    monkeypatch.setattr(cuda, "prepare_all", lambda specs, arch, **_: jit.BuildReport({}, 0.0))
    block = Block(quantized_layer(256, 128, 64), 64, 4)
    del block.top_k
    report = moefuse_runtime.install(block, reserve_bytes=0)
    assert "1 layers' blocks name no top-k" in report.summary()


def test_the_stand_in_header_covers_what_the_kernels_use():
    # MLX compiles device/utils.cuh from memory; the kernels use its includes
    # and the Shape type of a parameter, nothing else of it
    used = " ".join(cuda.source.read(f) for f in cuda.source.KERNEL_FILES)
    for name in ("Strides", "Limits", "AlignedVector", "WARP_SIZE", "cu::", "complex"):
        assert name not in used
    assert "Shape" in jit.UTILS_STAND_IN and "cuda_bf16.h" in jit.UTILS_STAND_IN


def test_tests_keep_the_kernel_caches_out_of_the_users_home():
    assert os.environ["MOEFUSE_CACHE_DIR"] != str(jit.Path.home() / ".cache" / "moefuse_runtime")


def test_the_compile_worker_reports_its_failure(monkeypatch, tmp_path):
    # the worker runs as a plain script in a process of its own; a library it
    # cannot load is an NvrtcError with the loader's words, not a hang or a crash
    monkeypatch.setattr(jit, "nvrtc_library", lambda: str(tmp_path / "libnvrtc.so.99"))
    with pytest.raises(jit.NvrtcError, match="libnvrtc.so.99"):
        jit.compile_spec(grouped.route_spec(128, (16, 64)), "sm_90a")


def test_fused_layers_on_the_kernels_deep_copy(as_cuda, monkeypatch):
    # MLX's Dtype neither pickles nor deep-copies: the kernel paths carry their
    # activation dtypes by name, so a fused model on CUDA copies (as mlx-lm's
    # tests copy every model) and its kernel paths pickle
    import copy
    import pickle

    monkeypatch.setattr(cuda, "prepare_all", lambda specs, arch, **_: jit.BuildReport({}, 0.0))
    block = Block(quantized_layer(256, 128, 64), 64, 4)
    moefuse_runtime.install(block, reserve_bytes=0)
    kernels = block.switch_mlp.kernels
    assert kernels is not None and kernels.decode.dtypes == (mx.bfloat16,)
    assert copy.deepcopy(kernels) == kernels
    assert pickle.loads(pickle.dumps(kernels)) == kernels
    copied = copy.deepcopy(block)
    assert moefuse_runtime.is_fused(copied.switch_mlp) and copied.switch_mlp.kernels == kernels
