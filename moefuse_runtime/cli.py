"""``moefuse``: demo, bench (and run, inspect, make-demo-model)."""

from __future__ import annotations

import argparse
import sys

from . import bench, demo


def cmd_demo(args: argparse.Namespace) -> int:
    result = demo.run_demo(args.preset, args.steps, args.rounds, log=print)
    print(f"\nunfused tokens: {result.unfused_tokens[:16]} ...")
    print(f"fused tokens:   {result.fused_tokens[:16]} ...")
    print(f"identical: {result.identical}")
    ratio = result.fused_tokens_per_s / result.unfused_tokens_per_s
    print(
        f"decode: unfused {result.unfused_tokens_per_s:.1f} tok/s, fused "
        f"{result.fused_tokens_per_s:.1f} tok/s (x{ratio:.3f}, median of {args.rounds} "
        f"interleaved rounds; a smoke figure, see docs/benchmarks.md for measurements)"
    )
    return 0 if result.identical else 1


def cmd_bench(args: argparse.Namespace) -> int:
    if args.quick:
        args.shapes, args.kinds, args.tokens = ["qwen3-30b-a3b"], ["4bit"], [1, 16]
        args.layers, args.rounds, args.scale = 2, 3, 16
        args.model_preset, args.model_layers, args.model_rounds = "tiny", 2, 1
        args.decode_tokens = 8
    print(bench.LAYER_HEADER)
    result = bench.run_suite(
        args.out,
        shapes=args.shapes,
        kinds=args.kinds,
        tokens=tuple(args.tokens),
        layers=args.layers,
        rounds=args.rounds,
        scale=args.scale,
        model_preset=args.model_preset,
        model_layers=args.model_layers,
        model_rounds=args.model_rounds,
        decode_tokens=args.decode_tokens,
        log=print,
    )
    print(f"wrote {args.out}/bench.json and {args.out}/bench.png")
    return 0 if result["model"]["greedy_tokens_match"] else 1


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moefuse", description="Run-time gate/up fusion for MLX MoE models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("demo", help="fuse the built-in demo model and compare outputs")
    p.add_argument("--preset", choices=sorted(demo.PRESETS), default="tiny")
    p.add_argument("--steps", type=int, default=64, help="tokens to decode")
    p.add_argument("--rounds", type=int, default=3, help="interleaved A/B rounds")
    p.set_defaults(handler=cmd_demo)

    p = commands.add_parser("bench", help="benchmark fused vs unfused; JSON + PNG")
    p.add_argument("--out", default="bench-results", help="output folder")
    p.add_argument("--shapes", nargs="+", default=list(bench.LAYER_SHAPES),
                   choices=list(bench.LAYER_SHAPES))  # fmt: skip
    p.add_argument("--kinds", nargs="+", default=["4bit", "bf16"],
                   help="4bit, 8bit, bf16 or fp32 (the CPU backend has fp32 only)")  # fmt: skip
    p.add_argument("--tokens", nargs="+", type=int, default=list(bench.TOKENS))
    p.add_argument("--layers", type=int, default=4, help="distinct layers per shape")
    p.add_argument("--rounds", type=int, default=20, help="A/B rounds per point")
    p.add_argument("--scale", type=int, default=1,
                   help="divide experts and width by this (to fit small machines)")  # fmt: skip
    p.add_argument("--model-preset", default="qwen3-30b-a3b", choices=sorted(demo.PRESETS))
    p.add_argument("--model-layers", type=int, default=8)
    p.add_argument("--model-rounds", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    p.set_defaults(handler=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
