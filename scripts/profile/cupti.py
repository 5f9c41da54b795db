"""GPU timelines of MLX's kernels, taken with PyTorch's CUPTI profiler (the
lent GPU has it; the package never imports it)."""

from collections import defaultdict
from collections.abc import Callable

from torch.profiler import ProfilerActivity, profile


def busy_and_span(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """The union of the intervals' lengths (the GPU busy), and first start to last end."""
    intervals.sort()
    busy, end = 0.0, None
    for s, e in intervals:
        if end is None or s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy, intervals[-1][1] - intervals[0][0] if intervals else 0.0


def kernel_timeline(run: Callable[[], None], times: int) -> dict:
    """``run`` (which evaluates and synchronizes) profiled ``times`` times, each
    alone: per run, GPU busy and span in ms, and us per kernel name."""
    per_kernel: dict[str, float] = defaultdict(float)
    busy = span = 0.0
    for _ in range(times):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
        intervals = []
        for event in prof.events():
            if event.device_type.name == "CUDA" and event.device_time_total > 0:
                per_kernel[event.name[:80]] += event.device_time_total / times
                intervals.append((event.time_range.start, event.time_range.end))
        b, s = busy_and_span(intervals)
        busy, span = busy + b / times, span + s / times
    return {
        "gpu_busy_ms": busy / 1e3,
        "gpu_span_ms": span / 1e3,
        "kernels_us": dict(sorted(per_kernel.items(), key=lambda kv: -kv[1])),
    }
