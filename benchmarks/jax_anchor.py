"""The authors' JAX agents (ryanxhr/vgf) timed on the same synthetic problem as benchmarks/update.py and
acting.py, for a side-by-side on one machine. Their code is not part of this repository: pass a checkout.

    python -m venv /tmp/jaxenv && /tmp/jaxenv/bin/pip install "jax[cpu]==0.7.1" flax optax ml_collections distrax
    /tmp/jaxenv/bin/python benchmarks/jax_anchor.py --vgf-repo /path/to/ryanxhr/vgf --json out.json

Runs with JAX only (no torch). The configurations repeat benchmarks/common.py's UPDATE_CONFIGS in the
authors' config names: critic and BC widths, vgf_particles N, bc_flow_steps K, train_vgf_steps L; batch
256, obs 17, action dim 6. Acting: ``sample_actions`` on one observation with eval_vgf_steps L_test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

CONFIGS = {  # name -> (agent, overrides of the authors' get_config())
    "paper": ("vgf", dict(vgf_particles=10, bc_flow_steps=10, train_vgf_steps=5)),
    "paper_L1": ("vgf", dict(vgf_particles=10, bc_flow_steps=10, train_vgf_steps=1)),
    "small": ("vgf", dict(value_hidden_dims=(256, 256), actor_hidden_dims=(256, 256), vgf_particles=8,
                          bc_flow_steps=5, train_vgf_steps=2)),
    "amortized": ("avgf", dict(vgf_particles=5, bc_flow_steps=10, train_vgf_steps=5)),
}
OBS_DIM, ACTION_DIM, BATCH = 17, 6, 256


CPU_SECONDS: list[float] = []  # process CPU seconds per wall second of each timed block (> 1: several threads)


def timed(fn, calls: int, blocks: int) -> float:
    """Median seconds per call over ``blocks`` blocks of ``calls`` calls (results waited for)."""
    per_call = []
    for _ in range(blocks):
        start, cpu = time.perf_counter(), time.process_time()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls)
        CPU_SECONDS.append((time.process_time() - cpu) / (per_call[-1] * calls))
    return statistics.median(per_call)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vgf-repo", type=Path, required=True)
    parser.add_argument("--rows", default=",".join(CONFIGS))
    parser.add_argument("--acting", default="0,1,3", help="L_test values for the paper config ('' for none)")
    parser.add_argument("--blocks", type=int, default=3)
    parser.add_argument("--block-seconds", type=float, default=1.0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(args.vgf_repo.resolve()))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from agents import agents

    rng = np.random.default_rng(0)
    batch = {
        "observations": rng.standard_normal((BATCH, OBS_DIM), dtype=np.float32),
        "actions": rng.uniform(-1, 1, (BATCH, ACTION_DIM)).astype(np.float32),
        "rewards": rng.standard_normal(BATCH, dtype=np.float32),
        "next_observations": rng.standard_normal((BATCH, OBS_DIM), dtype=np.float32),
        "masks": (rng.uniform(size=BATCH) > 0.05).astype(np.float32),
    }
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    result = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()], "cpus": os.cpu_count(),
              "update_ms": {}, "act_ms": {}}
    for name in [r for r in args.rows.split(",") if r]:
        agent_name, overrides = CONFIGS[name]
        module = sys.modules[agents[agent_name].__module__]
        config = module.get_config()
        config.update(overrides)
        agent = agents[agent_name].create(0, batch["observations"], batch["actions"], config)
        state = {"agent": agent}

        def update() -> None:
            state["agent"], info = state["agent"].update(batch)
            jax.block_until_ready(info)

        for _ in range(2):
            update()  # compilation
        probe = timed(update, 1, 1)
        calls = max(1, round(args.block_seconds / probe))
        result["update_ms"][name] = timed(update, calls, args.blocks) * 1e3
        print(f"  {name}: {result['update_ms'][name]:.1f} ms/update", flush=True)
        if name == "paper" and args.acting:
            obs = batch["observations"][0]
            for budget in (int(b) for b in args.acting.split(",")):
                key = jax.random.PRNGKey(1)

                def act(budget: int = budget) -> None:
                    jax.block_until_ready(state["agent"].sample_actions(obs, seed=key, eval_vgf_steps=budget))

                for _ in range(3):
                    act()
                result["act_ms"][f"act_L{budget}"] = timed(act, 20, args.blocks) * 1e3
                print(f"  act L{budget}: {result['act_ms'][f'act_L{budget}']:.2f} ms", flush=True)
    result["cpu_per_wall"] = statistics.median(CPU_SECONDS) if CPU_SECONDS else None
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
