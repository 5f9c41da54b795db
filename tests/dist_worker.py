"""One rank of a distributed test; run by test_sharding.py under mlx.launch.

Prints one JSON line per check ({"rank", "check", "family", "ok", ...}) and
exits non-zero on the first exception, so a failing rank fails the test with
its traceback shown.
"""

import argparse
import json

import mlx.core as mx
from helpers import build_family, logits_sequence, same
from mlx.utils import tree_flatten
from mlx_lm.models.pipeline import PipelineMixin

import moefuse_runtime


def same_parameters(a, b):
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    return pa.keys() == pb.keys() and all(mx.array_equal(pa[k], pb[k]).item() for k in pa)


OUT = None


def emit(group, check, family, ok, **extra):
    line = json.dumps({"rank": group.rank(), "check": check, "family": family, "ok": ok, **extra})
    with open(f"{OUT}/rank{group.rank()}.jsonl", "a") as f:
        f.write(line + "\n")


DENSE = False
VLM = False  # the families are mlx-vlm's language models


def fused_count(model):
    return sum(moefuse_runtime.is_fused(m) for _, m in moefuse_runtime.find_switch_glus(model))


def dense_fused(model):
    from moefuse_runtime.walk import find_targets

    kinds = [(kind.name, kind.is_fused(m)) for _, m, kind in find_targets(model, dense=True)]
    return sum(fused for name, fused in kinds if name == "dense MLP")


def both_orders(group, family, quantized, split, names):
    """Split (shard or pipeline) then install, and install then split: each
    must give the unfused split model's logits. Returns the pieces for more."""
    reference_model = build_family(family, quantized, VLM)
    split(reference_model)
    reference = logits_sequence(reference_model)

    after = build_family(family, quantized, VLM)
    split(after)
    report = moefuse_runtime.install(after, group=group, reserve_bytes=0, dense=DENSE)
    ok = same(logits_sequence(after), reference)
    emit(
        group,
        names[0],
        family,
        ok,
        fused=fused_count(after),
        total=report.total,
        notes=list(report.notes),
        dense_fused=dense_fused(after),
        dense_total=report.dense_total,
    )

    before = build_family(family, quantized, VLM)
    moefuse_runtime.install(before, reserve_bytes=0, dense=DENSE)
    split(before)
    ok = same(logits_sequence(before), reference)
    emit(
        group,
        names[1],
        family,
        ok,
        fused=fused_count(before),
        total=report.total,
        dense_fused=dense_fused(before),
        dense_total=report.dense_total,
    )
    return reference_model, reference, before, report.total


def tensor_parallel(group, family, quantized):
    reference_model, reference, before, total = both_orders(
        group,
        family,
        quantized,
        lambda m: m.shard(group),
        ("shard-then-install", "install-then-shard"),
    )
    moefuse_runtime.uninstall(before)
    ok = same(logits_sequence(before), reference) and same_parameters(before, reference_model)
    emit(group, "uninstall-after-shard", family, ok, fused=fused_count(before), total=total)


def pipelined(model):
    """The model's PipelineMixin part (model.model in most families)."""
    return next(m for _, m in model.named_modules() if isinstance(m, PipelineMixin))


def pipeline(group, family, quantized):
    both_orders(
        group,
        family,
        quantized,
        lambda m: pipelined(m).pipeline(group),
        ("pipeline-then-install", "install-then-pipeline"),
    )


def agreement(group, family, quantized):
    """Rank 1 has no headroom: with the group, no rank fuses; without, ranks diverge."""
    starved = group.rank() == 1
    for with_group in (True, False):
        model = build_family(family, quantized, VLM)
        model.shard(group)
        reference = logits_sequence(model)
        report = moefuse_runtime.install(
            model, group=group if with_group else None, reserve_bytes=(1 << 60) if starved else 0
        )
        emit(
            group,
            f"agreement-{'group' if with_group else 'local'}",
            family,
            same(logits_sequence(model), reference),
            fused=len(report.fused),
            total=report.total,
            reasons=sorted(set(report.skipped.values())),
        )


def fault(group, family, quantized):
    """Rank 1 raises while checking one layer and while probing another's
    headroom: every rank must finish, with that layer unfused everywhere."""
    from moefuse_runtime import installer, projections

    model = build_family(family, quantized, VLM)
    model.shard(group)
    reference = logits_sequence(model)
    if group.rank() == 1:
        calls = {"mismatch": 0, "headroom": 0}
        mismatch, headroom = projections.mismatch, installer.headroom

        def faulty_mismatch(*args):
            calls["mismatch"] += 1
            if calls["mismatch"] == 1:  # the first layer
                raise RuntimeError("injected in checking")
            return mismatch(*args)

        def faulty_headroom():
            calls["headroom"] += 1
            if calls["headroom"] == 1:  # the second: the first never got here
                raise OSError("injected in the probe")
            return headroom()

        projections.mismatch, installer.headroom = faulty_mismatch, faulty_headroom
    report = moefuse_runtime.install(model, group=group, reserve_bytes=0)
    emit(
        group,
        "fault",
        family,
        same(logits_sequence(model), reference),
        fused=len(report.fused),
        total=report.total,
        skipped=[report.skipped[p] for p in sorted(report.skipped)],
    )


def segments(group, family, quantized):
    """Shard a fused qwen3_moe by hand, its stacked gate_up as 1 or 2 segments
    (the model's own shard() is qwen3_moe.Model.shard; this mirrors it)."""
    from mlx.nn.layers.distributed import shard_inplace, shard_linear

    assert family == "qwen3_moe", "this control mirrors qwen3_moe's shard()"
    reference_model = build_family(family, quantized, VLM)
    reference_model.shard(group)
    reference = logits_sequence(reference_model)
    for count in (1, 2):
        model = build_family(family, quantized, VLM)
        moefuse_runtime.install(model, reserve_bytes=0)
        for layer in model.model.layers:
            attn = layer.self_attn
            for name, how in (
                ("q", "all-to-sharded"),
                ("k", "all-to-sharded"),
                ("v", "all-to-sharded"),
                ("o", "sharded-to-all"),
            ):
                attn[f"{name}_proj"] = shard_linear(attn[f"{name}_proj"], how, group=group)
            attn.n_heads //= group.size()
            attn.n_kv_heads //= group.size()
            mlp = layer.mlp
            if "switch_mlp" in mlp:
                mlp.sharding_group = group
                shard_inplace(
                    mlp.switch_mlp.gate_up_proj, "all-to-sharded", segments=count, group=group
                )
                shard_inplace(mlp.switch_mlp.down_proj, "sharded-to-all", group=group)
            else:
                mlp.gate_proj = shard_linear(mlp.gate_proj, "all-to-sharded", group=group)
                mlp.up_proj = shard_linear(mlp.up_proj, "all-to-sharded", group=group)
                mlp.down_proj = shard_linear(mlp.down_proj, "sharded-to-all", group=group)
        emit(group, f"segments-{count}", family, same(logits_sequence(model), reference))


CHECKS = {
    "tensor": tensor_parallel,
    "pipeline": pipeline,
    "agreement": agreement,
    "fault": fault,
    "segments": segments,
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("check", choices=sorted(CHECKS))
    parser.add_argument("--families", nargs="+", required=True)
    parser.add_argument("--quantized", action="store_true")
    parser.add_argument("--dense", action="store_true", help="install(dense=True)")
    parser.add_argument("--vlm", action="store_true", help="mlx-vlm's language models")
    parser.add_argument("--out", required=True, help="folder for rank<N>.jsonl")
    args = parser.parse_args()
    global OUT, DENSE, VLM
    OUT, DENSE, VLM = args.out, args.dense, args.vlm
    group = mx.distributed.init(strict=True)
    for family in args.families:
        CHECKS[args.check](group, family, args.quantized)


if __name__ == "__main__":
    main()
