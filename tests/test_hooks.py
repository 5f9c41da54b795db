"""Zero-code activation: the loaders' hooks, in real Python processes."""

import sys
import textwrap

from conftest import run

PYTHON = sys.executable

LOAD_AND_REPORT = """
import sys
{before}
import mlx_lm
from mlx_lm.utils import load as utils_load
import mlx_lm.generate, mlx_lm.server
{after}
import moefuse_runtime
generate_module = sys.modules["mlx_lm.generate"]  # mlx_lm.generate is the function
for loader in (mlx_lm.load, utils_load, generate_module.load, mlx_lm.server.load):
    model, _ = loader(sys.argv[1])
    layers = [m for _, m in moefuse_runtime.find_switch_glus(model)]
    print("FUSED", sum(moefuse_runtime.is_fused(m) for m in layers), len(layers))
"""


def script(before="", after=""):
    return LOAD_AND_REPORT.format(before=before, after=after)


def fused_counts(out):
    return [line for line in out.stdout.splitlines() if line.startswith("FUSED")]


def test_moefuse_run_fuses_every_loader_alias(demo_model):
    out = run(["moefuse", "run", "--", PYTHON, "-c", script(), str(demo_model)])
    assert out.returncode == 0, out.stderr
    assert fused_counts(out) == ["FUSED 4 4"] * 4
    assert "fused 4/4 SwitchGLU layers" in out.stderr


def test_autopatch_after_mlx_lm_was_imported(demo_model):
    """mlx_lm and server's `from .utils import load` alias exist before autopatch."""
    after = "import moefuse_runtime; moefuse_runtime.autopatch()"
    out = run([PYTHON, "-c", script(after=after), str(demo_model)], env={"EXO_FUSED_MOE": ""})
    assert out.returncode == 0, out.stderr
    assert fused_counts(out) == ["FUSED 4 4"] * 4


def test_import_with_env_opts_in(demo_model):
    out = run(
        [PYTHON, "-c", script(before="import moefuse_runtime"), str(demo_model)],
        env={"EXO_FUSED_MOE": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert fused_counts(out) == ["FUSED 4 4"] * 4


def test_plain_import_does_not_patch(demo_model):
    out = run(
        [PYTHON, "-c", script(before="import moefuse_runtime"), str(demo_model)],
        env={"EXO_FUSED_MOE": ""},
    )
    assert out.returncode == 0, out.stderr
    assert fused_counts(out) == ["FUSED 0 4"] * 4


def test_env_zero_under_moefuse_run_disables(demo_model):
    out = run(
        ["moefuse", "run", "--", PYTHON, "-c", script(), str(demo_model)],
        env={"EXO_FUSED_MOE": "0"},
    )
    assert out.returncode == 0, out.stderr
    assert fused_counts(out) == ["FUSED 0 4"] * 4
    assert "disabled by EXO_FUSED_MOE=0" in out.stderr


def test_bad_env_value_is_refused_by_moefuse_run():
    out = run(["moefuse", "run", "--", PYTHON, "-c", "pass"], env={"EXO_FUSED_MOE": "ture"})
    assert out.returncode == 2
    assert "EXO_FUSED_MOE='ture' is not understood" in out.stderr
    assert "Traceback" not in out.stderr


def test_autopatch_is_idempotent_and_unpatch_restores(demo_model):
    code = textwrap.dedent(
        """
        import sys, mlx_lm, mlx_lm.server, mlx_lm.utils
        import moefuse_runtime
        from moefuse_runtime import find_switch_glus, is_fused
        kept = [mlx_lm.utils.load]  # module globals get rebound; a list item does not
        moefuse_runtime.autopatch(); moefuse_runtime.autopatch()
        wrapped = mlx_lm.utils.load
        assert wrapped is not kept[0] and wrapped.__wrapped__ is kept[0]
        original = kept[0]
        assert mlx_lm.load is wrapped and mlx_lm.server.load is wrapped
        model, _ = mlx_lm.load(sys.argv[1])
        assert all(is_fused(m) for _, m in find_switch_glus(model))
        moefuse_runtime.unpatch()
        assert mlx_lm.utils.load is original and mlx_lm.server.load is original
        model, _ = mlx_lm.load(sys.argv[1])
        assert not any(is_fused(m) for _, m in find_switch_glus(model))
        moefuse_runtime.autopatch()
        assert mlx_lm.server.load.__wrapped__ is kept[0]
        print("OK")
        """
    )
    out = run([PYTHON, "-c", code, str(demo_model)], env={"EXO_FUSED_MOE": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "OK"


def test_mlx_lm_generate_prints_the_same_text(demo_model):
    args = ["--model", str(demo_model), "--prompt", "Hello, how are you?", "--max-tokens", "24"]
    plain = run(["mlx_lm.generate", *args], env={"EXO_FUSED_MOE": ""})
    fused = run(["moefuse", "run", "--", "mlx_lm.generate", *args])
    assert plain.returncode == 0 and fused.returncode == 0, fused.stderr
    text = plain.stdout.split("==========")[1]
    assert len(text.strip()) > 0
    assert fused.stdout.split("==========")[1] == text
    assert "fused 4/4 SwitchGLU layers" in fused.stderr


# A stand-in for exo's MLX engine (exo is not on PyPI; see README): the same
# module path, a load_mlx_items generator that loads lazily with
# mlx_lm.utils.load_model, evaluates layer by layer, yields progress and returns
# (model, tokenizer, vision), and a builder that imported it by name.
EXO_UTILS = """
from pathlib import Path
from mlx_lm.utils import load_model
import mlx.core as mx

def load_mlx_items(bound_instance, group):
    model, _ = load_model(Path(bound_instance), lazy=True, strict=False)
    for i, layer in enumerate(model.layers):
        mx.eval(layer)
        yield i
    return model, "tokenizer", None
"""
EXO_BUILDER = """
from .utils_mlx import load_mlx_items

def build(path):
    progress = []
    model, tokenizer, vision = yield from load_mlx_items(path, None)
    return model
"""


def exo_stand_in(root):
    package = root / "exo" / "worker" / "engines" / "mlx"
    package.mkdir(parents=True)
    for folder in (root / "exo", root / "exo" / "worker", root / "exo" / "worker" / "engines"):
        (folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "utils_mlx.py").write_text(EXO_UTILS)
    (package / "builder.py").write_text(EXO_BUILDER)


EXO_RUN = """
import sys
{before}
from exo.worker.engines.mlx import builder
{after}
import moefuse_runtime
gen = builder.build(sys.argv[1])
try:
    while True:
        next(gen)
except StopIteration as stop:
    model = stop.value
layers = [m for _, m in moefuse_runtime.find_switch_glus(model)]
print("FUSED", sum(moefuse_runtime.is_fused(m) for m in layers), len(layers))
"""


def test_exo_stand_in_under_moefuse_run(tmp_path, demo_model):
    exo_stand_in(tmp_path)
    code = EXO_RUN.format(before="", after="")
    out = run(["moefuse", "run", "--", PYTHON, "-c", code, str(demo_model)], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert fused_counts(out) == ["FUSED 4 4"]


def test_exo_stand_in_patched_after_its_import(tmp_path, demo_model):
    exo_stand_in(tmp_path)
    code = EXO_RUN.format(before="", after="import moefuse_runtime; moefuse_runtime.autopatch()")
    out = run([PYTHON, "-c", code, str(demo_model)], cwd=tmp_path, env={"EXO_FUSED_MOE": ""})
    assert out.returncode == 0, out.stderr
    assert fused_counts(out) == ["FUSED 4 4"]


SHARDED = """
import hashlib, sys
import mlx.core as mx
from mlx_lm.utils import sharded_load
import moefuse_runtime
model, tokenizer = sharded_load(sys.argv[1])
layers = [m for _, m in moefuse_runtime.find_switch_glus(model)]
logits = model(mx.array([tokenizer.encode("Hello, how are you? " * 8)]))
digest = hashlib.sha256(bytes(memoryview(logits.astype(mx.float32)))).hexdigest()[:16]
rank = mx.distributed.init().rank()
open(f"{sys.argv[2]}/rank{rank}.txt", "w").write(
    f"{sum(moefuse_runtime.is_fused(m) for m in layers)}/{len(layers)} {digest}"
)
"""


def fused_counts_and_digests_on_two_ranks(tmp_path, model_dir, script: str) -> dict:
    """Run ``script`` on 2 ring ranks under ``moefuse run``, with
    EXO_FUSED_MOE 0 and 1: {mode: [[fused/total, logits digest] per rank]}."""
    from test_sharding import LAUNCH, free_port

    (tmp_path / "script.py").write_text(script)
    results = {}
    for mode in ("0", "1"):
        out_dir = tmp_path / mode
        out_dir.mkdir()
        launch = [
            PYTHON,
            "-c",
            LAUNCH,
            "--backend",
            "ring",
            "-n",
            "2",
            "-p",
            str(free_port()),
            "--",
            PYTHON,
            str(tmp_path / "script.py"),
            str(model_dir),
            str(out_dir),
        ]
        out = run(["moefuse", "run", "--", *launch], env={"EXO_FUSED_MOE": mode}, timeout=240)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        results[mode] = [(out_dir / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    return results


def assert_fused_alike_on_two_ranks(results: dict) -> None:
    assert [fused for fused, _ in results["0"]] == ["0/4", "0/4"]
    assert [fused for fused, _ in results["1"]] == ["4/4", "4/4"]
    # Same logits on each rank, fused or not.
    assert [digest for _, digest in results["1"]] == [digest for _, digest in results["0"]]


def test_sharded_load_on_two_ranks_under_moefuse_run(tmp_path, demo_model):
    """moefuse run wraps mlx.launch: its rank processes inherit the activation,
    sharded_load shards the model, then each rank fuses its shards."""
    assert_fused_alike_on_two_ranks(
        fused_counts_and_digests_on_two_ranks(tmp_path, demo_model, SHARDED)
    )


VLM_SHARDED = """
import hashlib, sys
import mlx.core as mx
from mlx_vlm.utils import sharded_load
import moefuse_runtime
model, processor = sharded_load(sys.argv[1])
layers = [m for _, m in moefuse_runtime.find_switch_glus(model)]
tokenizer = getattr(processor, "tokenizer", processor)
out = model.language_model(mx.array([tokenizer.encode("Hello, how are you? " * 8)]))
logits = getattr(out, "logits", out)
digest = hashlib.sha256(bytes(memoryview(logits.astype(mx.float32)))).hexdigest()[:16]
rank = mx.distributed.init().rank()
open(f"{sys.argv[2]}/rank{rank}.txt", "w").write(
    f"{sum(moefuse_runtime.is_fused(m) for m in layers)}/{len(layers)} {digest}"
)
"""


def test_mlx_vlm_sharded_load_on_two_ranks_under_moefuse_run(tmp_path, demo_model):
    """mlx_vlm.utils.sharded_load in two real ranks: the hook fuses what it
    returns. mlx-vlm 0.7.10 shards only models whose top-level Model has
    ``shard`` (qwen3_vl_moe, kimi_k25), so this text model loads whole on
    each rank and each fuses alone (no group: nothing is split). Fusion of
    mlx-vlm's sharded layers, both orders, is test_sharding's."""
    import pytest

    pytest.importorskip("mlx_vlm", reason="mlx-vlm is pinned in requirements-test.txt")
    assert_fused_alike_on_two_ranks(
        fused_counts_and_digests_on_two_ranks(tmp_path, demo_model, VLM_SHARDED)
    )


def test_mlx_vlm_generate_prints_the_same_text(demo_model):
    import pytest

    pytest.importorskip("mlx_vlm", reason="mlx-vlm is pinned in requirements-test.txt")
    args = ["--model", str(demo_model), "--prompt", "Hello, how are you?", "--max-tokens", "24"]
    plain = run(["mlx_vlm.generate", *args], env={"EXO_FUSED_MOE": ""})
    fused = run(["moefuse", "run", "--", "mlx_vlm.generate", *args])
    assert plain.returncode == 0 and fused.returncode == 0, fused.stderr
    assert len(plain.stdout.strip()) > 0
    assert fused.stdout == plain.stdout
    assert "fused 4/4 SwitchGLU layers" in fused.stderr
    assert "fused" not in plain.stderr.lower()


def test_sitecustomize_watches_every_hooked_module():
    from moefuse_runtime import hooks

    source = hooks.__file__.removesuffix("hooks.py") + "_sitecustomize/sitecustomize.py"
    with open(source) as file:
        text = file.read()
    assert all(f'"{module}"' in text for module in {t.module for t in hooks.TARGETS})
