"""A server's threads: installs that race, and forwards that overlap an install.

Python switches threads every few microseconds here (a tiny switch
interval), so that every interleaving of the swaps is tried many times.
"""

from __future__ import annotations

import sys
import threading

import mlx.core as mx
import pytest
from helpers import build_family

import moefuse_runtime

ROUNDS = 12


@pytest.fixture(autouse=True)
def tiny_switch_interval():
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(previous)


def run_threads(targets) -> list[BaseException]:
    errors: list[BaseException] = []

    def guarded(target):
        try:
            target()
        except BaseException as error:  # noqa: BLE001 - collected and asserted empty
            errors.append(error)

    threads = [threading.Thread(target=guarded, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


def test_installs_that_race_fuse_once(capfd):
    for _ in range(ROUNDS):
        model = build_family("qwen3_moe", quantized=True)
        reports: list = []
        errors = run_threads([lambda m=model, r=reports: r.append(moefuse_runtime.install(m))] * 4)
        assert errors == []
        layers = len(reports[0].layers)
        assert sorted(len(r.fused) for r in reports) == [0, 0, 0, layers]
        assert all(len(r.already_fused) == layers for r in reports if not r.fused)
        assert all(not r.skipped for r in reports)


def test_uninstalls_that_race_unfuse_once():
    for _ in range(ROUNDS):
        model = build_family("qwen3_moe", quantized=True)
        moefuse_runtime.install(model)
        reports: list = []
        errors = run_threads(
            [lambda m=model, r=reports: r.append(moefuse_runtime.uninstall(m))] * 4
        )
        assert errors == [] and sorted(len(r.unfused) for r in reports)[-1] > 0
        assert sum(len(r.unfused) for r in reports) == len(reports[0].layers)


def test_forwards_overlapping_installs_compute_the_same(cpu_device):
    model = build_family("qwen3_moe", quantized=True)
    x = mx.random.randint(0, 128, (2, 5))
    want = model(x)
    mx.eval(want)
    stop = threading.Event()
    outputs = []

    def forwards():
        while not stop.is_set():
            out = model(x)
            mx.eval(out)
            outputs.append(out)

    def swaps():
        for _ in range(ROUNDS * 3):
            moefuse_runtime.install(model)
            moefuse_runtime.uninstall(model)
        stop.set()

    errors = run_threads([forwards, forwards, swaps])
    assert errors == []
    assert len(outputs) > 10
    assert all(mx.array_equal(out, want).item() for out in outputs)
