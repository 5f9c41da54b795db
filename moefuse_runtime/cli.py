"""``moefuse``: run, inspect, make-demo-model, demo, bench, tune.

Errors a user can make (a missing folder, a folder that is not a model, a
model without MoE layers, a command that does not exist) end with one line on
stderr and a non-zero exit code, never a traceback.

Each subcommand imports what it needs when it runs: ``run`` execs its
command having imported nothing but this module and the standard library.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from .config import ENABLE_ENV, env_flag
from .presets import DENSE_SHAPES, LAYER_SHAPES, PRESETS, TOKENS

SITECUSTOMIZE_DIR = Path(__file__).resolve().parent / "_sitecustomize"


class UsageError(Exception):
    """A mistake of the user's: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its mistakes in one line (exit code 2) like ours."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (--help says more)\n")


def whole_number_from(lowest: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``lowest`` (0 rounds or
    -1 steps would end in a traceback or never end)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, not {value}")
        return value

    return parse


positive_int = whole_number_from(1)
non_negative_int = whole_number_from(0)


def model_directory(text: str) -> str:
    """A local model directory (with its config.json), checked before anything runs."""
    from .server_bench import model_directory as checked

    try:
        return str(checked(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def command_line(text: str) -> list[str]:
    """Arguments given as one string, split as a shell would."""
    try:
        return shlex.split(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"cannot be split as a shell would: {error}") from None


def sequences_by_tokens(text: str) -> tuple[int, int]:
    """``8x948``: a batch of 8 prompts of up to 948 tokens."""
    sequences, _, tokens = text.partition("x")
    try:
        return positive_int(sequences), positive_int(tokens)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be SEQUENCESxTOKENS of whole numbers from 1, e.g. 8x948, not {text!r}"
        ) from None


def gigabytes(text: str) -> float:
    """An argparse type: a finite, non-negative number of GB."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of GB, not {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite, non-negative number, not {text}")
    return value


def cmd_run(args: argparse.Namespace) -> int:
    """exec CMD with fusion active in it and in every Python child it starts."""
    command = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not command:
        raise UsageError("moefuse run: give a command, e.g. moefuse run -- mlx_lm.server ...")
    env = dict(os.environ)
    env.setdefault(ENABLE_ENV, "1")
    os.environ[ENABLE_ENV] = env[ENABLE_ENV]
    try:
        env_flag(ENABLE_ENV, default=True)
    except ValueError as error:
        raise UsageError(f"moefuse run: {error}") from None
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([str(SITECUSTOMIZE_DIR), *([path] if path else [])])
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        print(f"moefuse run: command not found: {command[0]}", file=sys.stderr)
        return 127
    except OSError as error:  # not executable, not a program (ENOEXEC), ...
        print(f"moefuse run: cannot execute {command[0]}: {error.strerror}", file=sys.stderr)
        return 126


def _model_dir(path: str, command: str) -> Path:
    folder = Path(path)
    if not folder.is_dir():
        raise UsageError(f"moefuse {command}: no such directory: {path}")
    if not (folder / "config.json").is_file():
        raise UsageError(f"moefuse {command}: not an MLX model directory (no config.json): {path}")
    if not any(folder.glob("*.safetensors")):
        raise UsageError(f"moefuse {command}: no weights (*.safetensors) in {path}")
    return folder


def cmd_inspect(args: argparse.Namespace) -> int:
    """Dry run: load lazily, say per SwitchGLU what install would do, change nothing."""
    from mlx_lm.utils import load_model

    from .installer import plan
    from .memory import default_reserve_bytes, format_bytes, headroom

    folder = _model_dir(args.model, "inspect")
    try:
        model, config = load_model(folder, lazy=True, strict=False)
    except Exception as error:  # noqa: BLE001 - any loader error is the user's model
        print(f"moefuse inspect: cannot load {folder}: {error}", file=sys.stderr)
        return 1
    reserve = default_reserve_bytes() if args.reserve_gb is None else int(args.reserve_gb * 1e9)
    report = plan(model, reserve_bytes=reserve)
    print(f"model: {folder} ({config.get('model_type', '?')})")
    room = headroom()
    print(
        f"headroom now: {format_bytes(room.available)} ({room.source}); "
        f"reserve kept free: {format_bytes(reserve)}"
    )
    if report.total == 0:
        print(
            "moefuse inspect: no SwitchGLU layers in this model: nothing to fuse", file=sys.stderr
        )
        return 1
    print(report)
    return 0


def cmd_make_demo_model(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"moefuse make-demo-model: {folder} exists and is not a directory")
    from . import demo

    if folder.exists() and any(folder.iterdir()) and not args.force:
        raise UsageError(f"moefuse make-demo-model: {folder} is not empty (use --force)")
    demo.write_demo_model(folder, args.preset)
    print(f"wrote a {args.preset} 4-bit qwen3_moe model with random weights to {folder}")
    print(f"try: HF_HUB_OFFLINE=1 moefuse run -- mlx_lm.server --model {folder}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

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
    if args.server:
        from . import server_bench

        if args.server_model is not None and args.server_layers is not None:
            print(
                "moefuse bench: --server-layers sizes the model the benchmark writes; "
                "it cannot apply to --server-model",
                file=sys.stderr,
            )
            return 2
        server_bench.run(
            args.out,
            model_dir=args.server_model,
            preset=args.server_preset,
            layers=args.server_layers,
            rounds=args.server_rounds,
            smoke=args.quick,
            app=server_bench.APPS[args.server_app],
            server_args=args.server_args,
            warmup=args.server_warmup and not args.quick,
            starts=args.server_starts,
            bound=args.server_bound,
            loop=args.server_loop,
            log=print,
        )
        print(f"wrote {args.out}/server.json and {args.out}/server.png")
        return 0
    if args.cuda:
        from .cuda import bench as cuda_bench
        from .memory import backend

        if backend() != "cuda":
            print(
                f"moefuse bench --cuda: needs MLX's CUDA backend (this machine: {backend()})",
                file=sys.stderr,
            )
            return 2

        cuda_bench.run(
            args.out,
            layers=args.model_layers,
            rounds=args.model_rounds,
            parts=args.cuda,
            prefill_tokens=args.prefill_tokens,
            decode_batches=args.decode_batches,
            batched_prefill=args.batched_prefill,
            layer_tokens=tuple(args.layer_tokens),
            stream_tokens=args.decode_tokens,
            log=print,
        )
        print(f"wrote {args.out}/cuda.json and {args.out}/cuda.png")
        return 0
    from . import bench

    if args.quick:
        args.shapes, args.kinds, args.tokens = ["qwen3-30b-a3b"], ["4bit"], [1, 16]
        args.layers, args.rounds, args.scale = 2, 3, 16
        args.model_preset, args.model_layers, args.model_rounds = "tiny", 2, 1
        args.decode_tokens = 8
        args.dense_shapes = ["deepseek-v2-lite-shared"]
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
        dense_shapes=tuple(args.dense_shapes),
        model_dense=args.model_dense,
        log=print,
    )
    print(f"wrote {args.out}/bench.json and {args.out}/bench.png")
    return 0 if result["model"]["greedy_tokens_match"] else 1


def cmd_tune(args: argparse.Namespace) -> int:
    """Measure the tensor-core tilings on this GPU; write a tile table."""
    from tqdm import tqdm

    from .cuda import device, jit, tiles, tune
    from .cuda.formats import FORMATS
    from .memory import backend

    if backend() != "cuda":
        print(
            f"moefuse tune: needs MLX's CUDA backend (this machine: {backend()})", file=sys.stderr
        )
        return 1
    if args.model:
        try:
            shape = tune.shape_of_model(_model_dir(args.model, "tune"))
        except ValueError as error:
            raise UsageError(f"moefuse tune: {error}") from None
    elif args.bits not in FORMATS["affine"][0]:
        raise UsageError(
            f"moefuse tune: --bits {args.bits}: the kernels read {FORMATS['affine'][0]}"
        )
    else:
        hidden, experts, top_k, width = LAYER_SHAPES[args.preset]
        shape = tune.Shape(args.preset, hidden, experts, top_k, width, args.bits)
    arch, name = jit.device_arch(), jit.device_name()
    limits = device.device_limits(arch)
    print(f"tuning {shape} on {name} ({arch}; {limits})", file=sys.stderr)

    def progress(items, total):
        return tqdm(items, total=total, desc="moefuse tune", unit="tiling", file=sys.stderr)

    timer, measured = tune.GpuTimer(), dict[str, object]()
    partial = Path(args.out).with_suffix(".partial.json")

    def hung(what, so_far) -> None:
        """What was measured goes to ``partial`` before tune stops."""
        kind = "tensor_cores" if isinstance(so_far, list) else "decode"
        timings = tune.timings(so_far) if kind == "tensor_cores" else tune.decode_timings(so_far)
        tune.write(partial, {**measured, kind: timings, "hung": what})
        print(
            f"\nmoefuse tune: {what} has run for {tune.CANDIDATE_SECONDS:.0f} s, as a kernel "
            f"that never finishes would: stopped; what was measured is in {partial}",
            file=sys.stderr,
        )

    watchdog = tune.Watchdog(tune.CANDIDATE_SECONDS, hung)
    build = timer.prepare(shape, tune.plan(shape, args.tokens, limits), args.decode)
    print(build.summary(), file=sys.stderr)
    points = tune.measure(shape, args.tokens, limits, timer, progress, watchdog)
    measured["tensor_cores"] = tune.timings(points)
    decode = (
        tune.measure_decode(shape, timer.decode, timer.path, progress, watchdog)
        if args.decode
        else None
    )
    base = tiles.table_for(name, arch)
    table = tune.table(shape, points, name, arch, base, decode)
    tiles.parse(str(args.out), table)  # the file reads back as a table
    tune.write(Path(args.out), table)
    for point in points:
        kernel = "gate_up" if point.gate_up else "down"
        print(f"{point.tokens} tokens, {kernel}: {point.best()}", file=sys.stderr)
    if decode is not None:
        print(f"decode kernels: {table['decode']}", file=sys.stderr)
    print(f"wrote {args.out}: MOEFUSE_TILES={args.out} uses it")
    return 0


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moefuse", description="Run-time gate/up fusion for MLX MoE models.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "run",
        help="run a command with fusion active (e.g. moefuse run -- mlx_lm.server ...)",
        description="Run CMD with EXO_FUSED_MOE=1 (unless set) and a sitecustomize "
        "that fuses every model mlx-lm's or exo's loaders return, in CMD and its "
        "Python children.",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(handler=cmd_run)

    p = commands.add_parser("inspect", help="dry run: what install would do to a model")
    p.add_argument("model", metavar="MODEL_DIR", help="a local MLX model directory")
    p.add_argument("--reserve-gb", type=gigabytes, default=None, help="memory to keep free (GB)")
    p.set_defaults(handler=cmd_inspect)

    p = commands.add_parser("make-demo-model", help="write a small random MoE model directory")
    p.add_argument("dir", metavar="DIR")
    p.add_argument("--preset", choices=["tiny", "small"], default="tiny")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory")
    p.set_defaults(handler=cmd_make_demo_model)

    p = commands.add_parser("demo", help="fuse the built-in demo model and compare outputs")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--steps", type=positive_int, default=64, help="tokens to decode")
    p.add_argument("--rounds", type=positive_int, default=3, help="interleaved A/B rounds")
    p.set_defaults(handler=cmd_demo)

    p = commands.add_parser("bench", help="benchmark fused vs unfused; JSON + PNG")
    p.add_argument("--out", default="bench-results", help="output folder")
    p.add_argument("--shapes", nargs="+", default=list(LAYER_SHAPES), choices=list(LAYER_SHAPES))
    p.add_argument(
        "--kinds",
        nargs="+",
        default=["4bit", "bf16"],
        help="4bit, 8bit, bf16 or fp32 (the CPU backend has fp32 only)",
    )
    p.add_argument("--tokens", nargs="+", type=int, default=list(TOKENS))
    p.add_argument("--layers", type=positive_int, default=4, help="distinct layers per shape")
    p.add_argument("--rounds", type=positive_int, default=20, help="A/B rounds per point")
    p.add_argument(
        "--scale",
        type=positive_int,
        default=1,
        help="divide experts and width by this (to fit small machines)",
    )
    p.add_argument("--model-preset", default="qwen3-30b-a3b", choices=sorted(PRESETS))
    p.add_argument("--model-layers", type=positive_int, default=8)
    p.add_argument("--model-rounds", type=positive_int, default=5)
    p.add_argument("--decode-tokens", type=positive_int, default=64)
    p.add_argument(
        "--dense-shapes",
        nargs="*",
        default=[],
        choices=list(DENSE_SHAPES),
        help="dense gated MLP shapes to time too",
    )
    p.add_argument(
        "--model-dense", action="store_true", help="the fused model copy also fuses its dense MLPs"
    )
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke run")
    p.add_argument(
        "--cuda",
        nargs="+",
        choices=["layers", "model", "pairs", "fidelity", "stream"],
        help="the CUDA kernel paths instead (GPU): layer FLOP rates with the torch "
        "peer, prefill and batched decode with the FFN-free bound, pair sweep, "
        "top-1 agreement with float32, single-stream decode (--decode-tokens "
        "per round); uses --model-layers and --model-rounds",
    )
    p.add_argument(
        "--prefill-tokens",
        nargs="*",
        type=int,
        default=[512, 2048],
        help="--cuda model: prompt lengths",
    )
    p.add_argument(
        "--layer-tokens",
        nargs="+",
        type=positive_int,
        default=[512, 2048],
        help="--cuda layers: token counts of the one-layer FLOP rates",
    )
    p.add_argument(
        "--batched-prefill",
        type=sequences_by_tokens,
        default=None,
        metavar="SEQUENCESxTOKENS",
        help="--cuda model: also a right-padded batch of prompts, as mlx-lm's "
        "BatchGenerator prefills concurrent requests (e.g. 8x948)",
    )
    p.add_argument(
        "--decode-batches",
        nargs="*",
        type=int,
        default=[4, 16, 32, 64],
        help="--cuda model: sequences per batched decode step",
    )
    p.add_argument(
        "--server",
        action="store_true",
        help="a real server (--server-app), plain and under `moefuse run`, on a model "
        "directory it writes: start-up, first request, single, concurrent and "
        "long-prompt workloads (with --quick: a tiny smoke run)",
    )
    p.add_argument(
        "--server-loop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--server: also decode the single request's prompt without a server, in "
        "mlx-lm's own loop (mlx_lm generate) and its BatchGenerator, plain, fused and "
        "bound, to show what the server adds per token",
    )
    p.add_argument(
        "--server-app",
        default="mlx_lm",
        choices=("mlx_lm", "mlx_vlm"),
        help="--server: mlx_lm.server or mlx_vlm.server",
    )
    served = p.add_mutually_exclusive_group()
    served.add_argument(
        "--server-preset",
        default="qwen3-30b-a3b",
        choices=sorted(PRESETS),
        help="--server: the dimensions of the model it writes (random 4-bit weights)",
    )
    served.add_argument(
        "--server-model",
        metavar="MODEL_DIR",
        type=model_directory,
        default=None,
        help="--server: serve this local model directory instead (a real checkpoint)",
    )
    p.add_argument(
        "--server-layers", type=positive_int, default=None, help="--server: model layers"
    )
    p.add_argument(
        "--server-rounds",
        type=positive_int,
        default=2,
        help="--server: rounds of two fresh servers each",
    )
    p.add_argument(
        "--server-starts",
        type=non_negative_int,
        default=4,
        help="--server: start-only servers of each kind, timed until /health answers",
    )
    p.add_argument(
        "--server-warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--server: a round before the measured ones, kept apart (on a machine that never "
        "ran MLX, its first server fills MLX's own kernel cache)",
    )
    p.add_argument(
        "--server-bound",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--server: a third server per round with every MoE FFN replaced by a broadcast "
        "of its input (the most any FFN could give)",
    )
    p.add_argument(
        "--server-args",
        type=command_line,
        default=None,
        metavar="'ARGS'",
        help="--server: the server's arguments, one quoted string (--server-args "
        "'--decode-concurrency 16'; default: mlx_lm.server --decode-concurrency 32 "
        "--prompt-concurrency 8, mlx_vlm.server --max-num-seqs 32)",
    )
    p.set_defaults(handler=cmd_bench)

    p = commands.add_parser(
        "tune",
        help="measure the tensor-core tilings on this GPU and write a tile table",
        description="Time every candidate tiling of the tensor-core kernels that fits this "
        "GPU, for one MoE layer shape at several token counts, and the decode kernels' "
        "tilings and where the tensor cores overtake them, and write the fastest as a "
        "tile table (JSON): MOEFUSE_TILES=FILE uses it. Needs MLX's CUDA backend.",
    )
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--model", metavar="MODEL_DIR", help="tune for this model's MoE layers")
    shape.add_argument("--preset", default="qwen3-30b-a3b", choices=sorted(LAYER_SHAPES))
    p.add_argument("--bits", type=positive_int, default=4, help="--preset: weight bits (affine)")
    p.add_argument(
        "--tokens",
        nargs="+",
        type=positive_int,
        default=[16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
        help="token counts to measure",
    )
    p.add_argument(
        "--decode",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the decode kernels' tilings at 1 and 4 tokens and the layer on each "
        "path at 1-32 tokens, for the table's decode settings (--no-decode keeps the base's)",
    )
    p.add_argument("--out", default="moefuse-tiles.json", help="the table to write")
    p.set_defaults(handler=cmd_tune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    try:
        return args.handler(args)
    except UsageError as error:
        print(error, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
