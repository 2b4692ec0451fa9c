"""The GPU check: the update at the paper configuration in float32, TF32 and bfloat16, eager / CUDA graph /
torch.compile, acting latency, peak memory; one JSON and one markdown table per device, and the table in
RESULTS.md under the device's name. Run through ``benchmarks/gpu_check.sh`` (which runs the CUDA tests first
and keeps the whole check under 5 minutes).

    python benchmarks/gpu_check.py                 # on a CUDA machine
    python benchmarks/gpu_check.py --dry-run       # CPU, a tiny configuration: checks the script itself

Rows that do not fit the time budget (``--budget-s``), or need CUDA in a dry run, are listed as skipped with
the reason. Each torch.compile row runs in its own process with its own timeout (compilation can take a minute).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import (  # noqa: E402
    ACTION_DIM,
    BATCH_SIZE,
    OBS_DIM,
    UPDATE_CONFIGS,
    PeakMemory,
    calls_for,
    environment,
    matmul_rate,
    synthetic_batch,
    table,
    time_blocks,
    write_json,
)

from vgf_prob import fast  # noqa: E402
from vgf_prob.rl.agent import VGFAgent  # noqa: E402
from vgf_prob.rl.config import VGFConfig  # noqa: E402
from vgf_prob.validation import host_reads  # noqa: E402

HERE = Path(__file__).resolve().parent
PRECISIONS = ("fp32", "tf32", "bf16")
MODES = ("eager", "graph", "compile")
DRY_CONFIG = dict(critic_hidden_dims=(64, 64), bc_hidden_dims=(64, 64), num_particles=4, flow_steps=2, train_budget=1)


def set_precision(precision: str) -> None:
    """TF32 products on or off (float32 storage either way); bf16 is the agent's flow_autocast_bf16 option."""
    tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


def make_agent(precision: str, mode: str, device: torch.device, dry: bool) -> VGFAgent:
    overrides = DRY_CONFIG if dry else UPDATE_CONFIGS["paper"]
    config = VGFConfig(batch_size=32 if dry else BATCH_SIZE, flow_autocast_bf16=precision == "bf16",
                       compile=mode == "compile", **overrides)
    torch.manual_seed(0)
    return VGFAgent(OBS_DIM, ACTION_DIM, config, device=device)


def update_row(precision: str, mode: str, device: torch.device, dry: bool, blocks: int) -> dict[str, Any]:
    """ms per update (median block), peak memory, and the first call's seconds (capture or compilation)."""
    set_precision(precision)
    agent = make_agent(precision, mode, device, dry)
    batch = synthetic_batch(32 if dry else BATCH_SIZE, device, torch.float32)
    start = time.perf_counter()

    def unchecked(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with host_reads(False):  # no host read: what a CUDA graph needs
            return agent.update(b)

    if mode == "graph":
        fast.make_capturable(agent._optimizers().values())
        step = fast.CapturedStep(unchecked, batch)

        def update() -> None:
            step(batch)
    else:
        def update() -> None:
            unchecked(batch)
        update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    first_s = time.perf_counter() - start
    with PeakMemory(device) as memory:
        probe = time_blocks(update, device, blocks=1, calls_per_block=1, warmup=2)
        timing = time_blocks(update, device, blocks=blocks, calls_per_block=calls_for(probe["median_s"], 0.5), warmup=0)
    info = step(batch) if mode == "graph" else unchecked(batch)
    finite = all(bool(torch.isfinite(v).all()) for v in info.values())
    return {"kind": "update", "precision": precision, "mode": mode, "ms": timing["median_s"] * 1e3,
            "ms_best_block": timing["min_s"] * 1e3, "first_call_s": first_s, "peak_mib": memory.peak_mib,
            "finite_losses": finite}


def acting_rows(precision: str, device: torch.device, dry: bool, blocks: int) -> list[dict[str, Any]]:
    """ms per act() on one observation (it reads the action back: one synchronisation per call)."""
    set_precision(precision)
    agent = make_agent(precision, "eager", device, dry)
    obs = torch.randn(OBS_DIM, device=device)
    rows = []
    for budget in (0, 1, 3):
        def act(budget: int = budget) -> None:
            agent.act(obs, budget=budget)

        timing = time_blocks(act, device, blocks=blocks, calls_per_block=10, warmup=5)
        rows.append({"kind": "act", "precision": precision, "mode": "eager", "L_test": budget,
                     "ms": timing["median_s"] * 1e3, "ms_best_block": timing["min_s"] * 1e3})
    return rows


def compile_row(precision: str, device: str, dry: bool, blocks: int, timeout_s: float) -> dict[str, Any]:
    """An update row with config.compile=True in a fresh process (so a slow compilation cannot overrun)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, str(Path(__file__)), "--one-row", f"{precision}:compile", "--device", device,
                   "--blocks", str(blocks), "--row-json", str(out)] + (["--dry-run"] if dry else [])
        try:
            subprocess.run(command, check=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return skipped(precision, "compile", f"compilation and timing took over {timeout_s:.0f} s")
        except subprocess.CalledProcessError as err:
            return skipped(precision, "compile", f"failed (exit {err.returncode}; see the log above)")
        return json.loads(out.read_text())


def skipped(precision: str, mode: str, why: str) -> dict[str, Any]:
    return {"kind": "update", "precision": precision, "mode": mode, "skipped": why}


def product_rates(device: torch.device, dry: bool) -> dict[str, float]:
    shape = (256, 256, 256) if dry else (4096, 4096, 4096)
    rates = {}
    for precision in PRECISIONS:
        set_precision(precision)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        rates[precision] = matmul_rate(device, dtype, shape, blocks=3, block_seconds=0.2)["gflops"]
    set_precision("fp32")
    return rates


def markdown(env: dict[str, Any], rates: dict[str, float], rows: list[dict[str, Any]], tests: str, dry: bool) -> str:
    title = f"GPU check: {env['device_name']}" + (" (DRY RUN on CPU, tiny configuration: not a measurement)" if dry else "")
    lines = [f"### {title}", "",
             f"torch {env['torch']}, CUDA {env.get('cuda', '-')}, measured {env['time']}; CUDA tests: {tests}. "
             f"Product rate {'256' if dry else '4096'}^3: " + ", ".join(f"{p} {r:.0f} GFLOP/s" for p, r in rates.items())
             + ". Paper configuration (4x512, N10, K10, L5, batch 256) unless dry.", ""]
    update = [r for r in rows if r["kind"] == "update"]
    lines.append(table(["precision", "mode", "ms/update", "best block", "first call s", "peak MiB", "note"],
                       [[r["precision"], r["mode"], r.get("ms"), r.get("ms_best_block"), r.get("first_call_s"),
                         r.get("peak_mib"), r.get("skipped", "" if r.get("finite_losses", True) else "NON-FINITE")]
                        for r in update]))
    acting = [r for r in rows if r["kind"] == "act"]
    if acting:
        lines += ["", table(["precision", "L_test", "ms/act (one observation)", "best block"],
                            [[r["precision"], r["L_test"], r["ms"], r["ms_best_block"]] for r in acting])]
    return "\n".join(lines) + "\n"


def write_results_md(section: str, slug: str) -> None:
    """Put ``section`` into RESULTS.md between this device's markers (replacing an earlier run's)."""
    path = HERE / "RESULTS.md"
    text = path.read_text()
    begin, end = f"<!-- gpu-check {slug} begin -->", f"<!-- gpu-check {slug} end -->"
    block = f"{begin}\n{section}{end}\n"
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end) + "\n", lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny configuration, no results written here")
    parser.add_argument("--dry-compile", action="store_true", help="with --dry-run: also the torch.compile rows")
    parser.add_argument("--device", default=None, help="default: cuda (cpu with --dry-run)")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop starting rows after this many seconds")
    parser.add_argument("--tests", default="not run", help="the CUDA tests' outcome, for the record")
    parser.add_argument("--out-dir", type=Path, default=None, help="default: benchmarks/results (dry: a temp dir)")
    parser.add_argument("--one-row", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--row-json", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.dry_run else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here (use --dry-run to check the script on CPU)")
    blocks = 1 if args.dry_run else args.blocks
    if args.one_row:
        precision, mode = args.one_row.split(":")
        write_json(args.row_json, update_row(precision, mode, device, args.dry_run, blocks))
        return {}
    started = time.perf_counter()
    env = environment(device, torch.float32)
    print(f"# gpu check on {env['device_name']} ({device}), torch {env['torch']}", flush=True)
    rates = product_rates(device, args.dry_run)
    rows: list[dict[str, Any]] = []

    def left() -> float:
        return args.budget_s - (time.perf_counter() - started)

    plan = [(p, m) for m in MODES for p in PRECISIONS]  # eager and graph rows first, compilation last
    for precision, mode in plan:
        if left() < 10:
            rows.append(skipped(precision, mode, "time budget spent"))
        elif mode == "graph" and device.type != "cuda":
            rows.append(skipped(precision, mode, "CUDA graphs need a CUDA device"))
        elif mode == "compile" and args.dry_run and not args.dry_compile:
            rows.append(skipped(precision, mode, "dry run: compilation not tried (--dry-compile tries it)"))
        elif mode == "compile":
            rows.append(compile_row(precision, str(device), args.dry_run, blocks, min(left(), 120.0)))
        else:
            rows.append(update_row(precision, mode, device, args.dry_run, blocks))
        if mode == "graph" and precision == PRECISIONS[-1] and left() > 10:
            for act_precision in ("fp32", "bf16"):
                rows += acting_rows(act_precision, device, args.dry_run, blocks)
        print("  ", json.dumps(rows[-1], default=str), flush=True)
    set_precision("fp32")
    section = markdown(env, rates, rows, args.tests, args.dry_run)
    print(section)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")
    out_dir = args.out_dir or (Path(tempfile.mkdtemp()) if args.dry_run else HERE / "results")
    payload = {"benchmark": "gpu_check", "dry_run": args.dry_run, "env": env, "product_gflops": rates,
               "tests": args.tests, "rows": rows, "seconds": time.perf_counter() - started}
    write_json(out_dir / f"gpu-{slug}.json", payload)
    (out_dir / f"gpu-{slug}.md").write_text(section)
    if not args.dry_run:
        write_results_md(section, slug)
    print(f"# wrote {out_dir}/gpu-{slug}.json and .md in {payload['seconds']:.0f} s", flush=True)
    return payload


if __name__ == "__main__":
    main()
