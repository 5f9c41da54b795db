"""Copies of a model in every state this package leaves it in: armed (the
load_model hook), fused, and fused with compiled MoE blocks. ``pickle`` and
``copy.deepcopy`` each give a model of the same twin classes that computes
the same function, and the copy goes on from there on its own."""

from __future__ import annotations

import copy
import pickle

import pytest
from helpers import build_family, logits_sequence, same

import moefuse_runtime
from moefuse_runtime import blocks, first_forward, installer, twins
from moefuse_runtime.layer import FusedSwitchGLU

COPIES = {"pickle": lambda m: pickle.loads(pickle.dumps(m)), "deepcopy": copy.deepcopy}


def switch_glus(model):
    return [layer for _, layer in moefuse_runtime.find_switch_glus(model)]


@pytest.fixture(scope="module")
def reference():
    return logits_sequence(build_family("qwen3_moe", quantized=True))


@pytest.mark.parametrize("copy_of", COPIES.values(), ids=COPIES.keys())
def test_a_fused_model_copies(reference, copy_of):
    model = build_family("qwen3_moe", quantized=True)
    moefuse_runtime.install(model)
    copied = copy_of(model)
    assert [type(m).__name__ for m in switch_glus(copied)] == ["FusedSwitchGLU"] * 2
    assert all(twins.original_class(type(m)).__name__ == "SwitchGLU" for m in switch_glus(copied))
    assert same(logits_sequence(copied), reference)
    assert len(moefuse_runtime.uninstall(copied).unfused) == 2
    assert same(logits_sequence(copied), reference)
    assert all(moefuse_runtime.is_fused(m) for m in switch_glus(model))  # the original stays


@pytest.mark.parametrize("copy_of", COPIES.values(), ids=COPIES.keys())
def test_an_armed_model_copies_armed(reference, copy_of):
    model = build_family("qwen3_moe", quantized=True)
    installer.arm(model)
    copied = copy_of(model)
    assert first_forward.is_armed(copied)
    assert same(logits_sequence(copied), reference)  # fuses on its first forward
    assert all(moefuse_runtime.is_fused(m) for m in switch_glus(copied))
    assert first_forward.is_armed(model)  # the original fuses on its own first call


class GatherQmm:
    """Kernel paths that take no call (gather_qmm runs): compiled blocks on
    the CPU, as on CUDA."""

    def __call__(self, layer, gate_up_proj, x, indices):
        return None

    def variants(self, layer, block):
        return []


@pytest.mark.parametrize("copy_of", COPIES.values(), ids=COPIES.keys())
def test_a_model_with_compiled_blocks_copies(reference, copy_of, monkeypatch):
    monkeypatch.setattr("moefuse_runtime.layer.kernels_for", lambda *_: (GatherQmm(), "test"))
    model = build_family("qwen3_moe", quantized=True)
    model.eval()  # as mlx_lm.load leaves it: compiled blocks run in eval mode
    moefuse_runtime.install(model, reserve_bytes=0)
    assert same(logits_sequence(model), reference)  # traces the graphs
    copied = copy_of(model)
    compiled = [m for m in copied.modules() if blocks.is_compiled(m)]
    assert len(compiled) == 2 and all(type(b).__name__.startswith("Compiled") for b in compiled)
    assert all(b.__dict__[blocks.STATE].graph is None for b in compiled)  # traces its own
    assert same(logits_sequence(copied), reference)
    assert all(b.__dict__[blocks.STATE].graph is not None for b in compiled)


def test_twin_classes_are_made_once_per_pair():
    base = type(switch_glus(build_family("qwen3_moe", quantized=True))[0])
    twin = twins.twin_class(FusedSwitchGLU, base)
    assert twins.twin_class(FusedSwitchGLU, base) is twin
    assert twin.__name__ == "FusedSwitchGLU" and twin.original is base
    assert twins.original_class(twin) is base and twins.original_class(base) is base
    armed = first_forward.armed_class_for(base)
    assert armed.__name__ == "ArmedSwitchGLU" and first_forward.unarmed_class(armed) is base
    assert first_forward.unarmed_class(twin) is twin  # disarming never unfuses
