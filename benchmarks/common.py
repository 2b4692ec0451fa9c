"""Shared pieces of the speed benchmarks: environment record, synchronised timing, peak memory, FLOP counts,
the device's measured matrix-product rate, the JAX anchor table, JSON output and tables.

Every number a benchmark reports travels with ``environment()``: device (CPU model or GPU name), cores,
torch version, dtype, torch threads and the load average when it was taken (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing: `python benchmarks/run_all.py`
    sys.path.insert(0, str(ROOT))

from vgf_prob.fast import packed_linear_available  # noqa: E402

OBS_DIM, ACTION_DIM, BATCH_SIZE = 17, 6, 256

# The authors' jit-compiled JAX implementation (jax 0.7.1, float32, 2 threads) on the issue's machine kind
# (2-core Intel Xeon with AVX-512 and AMX-BF16), ms per call, from issue 15's side-by-side run.
JAX_ANCHOR_MS = {
    "paper": 736.0,
    "paper_L1": 355.0,
    "small": 43.5,
    "amortized": 215.0,
    "act_L0": 3.45,
    "act_L1": 6.79,
    "act_L3": 13.1,
}
TARGET_SPEEDUP = 1.5

# name -> VGFConfig overrides (paper defaults otherwise: critic and BC flow 4 x 512, 2 heads, Stein + Adam).
UPDATE_CONFIGS: dict[str, dict[str, Any]] = {
    "paper": dict(num_particles=10, flow_steps=10, train_budget=5),
    "paper_L1": dict(num_particles=10, flow_steps=10, train_budget=1),
    "small": dict(critic_hidden_dims=(256, 256), bc_hidden_dims=(256, 256), num_particles=8, flow_steps=5,
                  train_budget=2),
    "amortized": dict(variant="amortized", num_particles=5, flow_steps=10, train_budget=5),
}
# scaling rows: the paper configuration with one knob changed
SCALING_N = (5, 10, 20, 40)
SCALING_L = (0, 1, 3, 5)


def scaling_configs() -> dict[str, dict[str, Any]]:
    rows = {f"N{n}": {**UPDATE_CONFIGS["paper"], "num_particles": n} for n in SCALING_N}
    rows |= {f"L{L}": {**UPDATE_CONFIGS["paper"], "train_budget": L} for L in SCALING_L}
    return rows


# ------------------------------------------------------------------------------------------ environment
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))
    except OSError:
        pass
    return []


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Where and how a number was measured."""
    info: dict[str, Any] = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "load_average": load_average(),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
    return info


def describe(env: dict[str, Any]) -> str:
    return (
        f"{env['device']} ({env['device_name']}, {env['cpu_cores']} cores), torch {env['torch']}, "
        f"{env['dtype']}, {env['threads']} threads, load {env['load_average']}"
    )


# ------------------------------------------------------------------------------------------ arguments
def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks; the median block is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before the timed blocks")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")


def setup(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: CUDA is not available in this torch build/machine")
    torch.manual_seed(args.seed)
    return device, getattr(torch, args.dtype)


# ------------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_blocks(
    fn: Callable[[], Any], device: torch.device, blocks: int = 5, calls_per_block: int = 1, warmup: int = 2
) -> dict[str, Any]:
    """Seconds per call: ``warmup`` untimed calls, then ``blocks`` timed blocks of ``calls_per_block`` calls.

    On CUDA each block is bracketed by events and the device is synchronised once per block (never inside
    ``fn``). Also records the process CPU seconds per call (on a loaded CPU, wall >> cpu / threads).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    per_call, cpu_per_call = [], []
    for _ in range(blocks):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls_per_block):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            per_call.append(start.elapsed_time(end) / 1000.0 / calls_per_block)
            continue
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(calls_per_block):
            fn()
        synchronize(device)
        per_call.append((time.perf_counter() - t0) / calls_per_block)
        cpu_per_call.append((time.process_time() - cpu0) / calls_per_block)
    result = {
        "median_s": statistics.median(per_call),
        "min_s": min(per_call),
        "blocks_s": per_call,
        "calls_per_block": calls_per_block,
    }
    if cpu_per_call:
        result["cpu_s_per_call"] = statistics.median(cpu_per_call)
    return result


def calls_for(seconds_per_call: float, block_seconds: float = 1.0) -> int:
    """Calls per block so that one block lasts about ``block_seconds``."""
    return max(1, round(block_seconds / max(seconds_per_call, 1e-9)))


# ------------------------------------------------------------------------------------------ memory
def max_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0


class PeakMemory:
    """Peak memory of what runs inside the block, MiB.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset (bytes held by tensors). CPU: growth of the
    process's peak RSS (``getrusage`` ru_maxrss) across the block; run each configuration in a fresh process
    (``run_all.py`` does) so that an earlier, larger peak does not hide it. ``baseline_mib`` is the RSS peak
    before the block (interpreter, torch, the model, its optimiser state).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __enter__(self) -> PeakMemory:
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mib = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self.baseline_mib = max_rss_mib()
        return self

    def __exit__(self, *exc: Any) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.kind = "cuda max_memory_allocated"
        else:
            self.peak_mib = max_rss_mib()
            self.kind = "process max RSS (getrusage)"
        self.delta_mib = self.peak_mib - self.baseline_mib

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "baseline_mib": round(self.baseline_mib, 1), "peak_mib": round(self.peak_mib, 1),
                "delta_mib": round(self.delta_mib, 1)}


# ------------------------------------------------------------------------------------------ FLOPs
def count_flops(fn: Callable[[], Any]) -> tuple[float, dict[str, float]]:
    """FLOPs of one call of ``fn`` (matrix products, forward and backward) by torch's FlopCounterMode.

    Returns (total, per-operator totals). Elementwise work is not counted (as usual for FLOP rates).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    per_op = {str(op).split(".")[-1]: float(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return float(counter.get_total_flops()), per_op


def matmul_rate(device: torch.device, dtype: torch.dtype, shape: tuple[int, int, int], blocks: int = 5,
                block_seconds: float = 0.3, kernel: str = "torch.mm") -> dict[str, Any]:
    """Measured rate of one ``[M, K] @ [K, N]`` product in GFLOP/s (median block; also the best block).

    ``kernel``: "torch.mm" (into a preallocated output: what the update's products are) or, on CPU, "onednn"
    (oneDNN with the weight packed once, a fresh output per call: the fastest float32 kernel found here)."""
    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    flops = 2.0 * m * k * n
    if kernel == "onednn":
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), m)

        def product() -> None:
            torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
    else:
        def product() -> None:
            torch.mm(a, b, out=out)

    probe = time_blocks(product, device, blocks=1, calls_per_block=2, warmup=2)
    timing = time_blocks(product, device, blocks=blocks, calls_per_block=calls_for(probe["median_s"], block_seconds),
                         warmup=1)
    return {
        "shape": f"{m}x{k} @ {k}x{n}",
        "kernel": kernel,
        "dtype": str(dtype).replace("torch.", ""),
        "gflops": flops / timing["median_s"] / 1e9,
        "gflops_best": flops / timing["min_s"] / 1e9,
    }


def matmul_ceiling(device: torch.device, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The device's matrix-product rate, measured now: the update's shape (2560 x 512 @ 512 x 512) and a large one."""
    large = (4096, 4096, 4096) if device.type == "cuda" else (2048, 2048, 2048)
    ceiling = {
        "update_shape": matmul_rate(device, dtype, (2560, 512, 512)),
        "large": matmul_rate(device, dtype, large),
        "threads": torch.get_num_threads(),
    }
    if packed_linear_available(torch.empty(0, device=device, dtype=dtype)):
        ceiling["update_shape_onednn"] = matmul_rate(device, dtype, (2560, 512, 512), kernel="onednn")
    return ceiling


# ------------------------------------------------------------------------------------------ output
def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table (also readable in a terminal)."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells[1:]]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"
    return "-" if value is None else str(value)


def synthetic_batch(batch_size: int, device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch of random transitions (obs 17, action 6 in the box [-1, 1])."""
    g = torch.Generator().manual_seed(seed)
    batch = {
        "observations": torch.randn(batch_size, OBS_DIM, generator=g),
        "actions": torch.rand(batch_size, ACTION_DIM, generator=g) * 2 - 1,
        "rewards": torch.randn(batch_size, generator=g),
        "next_observations": torch.randn(batch_size, OBS_DIM, generator=g),
        "masks": (torch.rand(batch_size, generator=g) > 0.05).float(),
    }
    return {k: v.to(device=device, dtype=dtype) for k, v in batch.items()}


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)
