"""What the compute-matched best-of-M rows add to one evaluation of the quick start's setting.

    python benchmarks/matched_eval_cost.py            # 2 repeats, 50 episodes, as the quick start evaluates

`compare_policies` scores the BC reference, best-of-N and VGF at the quick start's budgets (0 1 2 3 5 8),
then with ``matched=True`` the best-of-M matched to each VGF budget's critic-pass cost (5 more policies), on
the quick start's 50 seeded Reacher episodes. The agent is freshly initialised with the quick start's config
(N 10, K 10, 2 x 128 networks): the cost of acting does not depend on the weights. Reports process CPU
seconds on one torch thread, the machine's CPU and its load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each variant (default 2)")
    parser.add_argument("--episodes", type=int, default=50, help="episodes per policy (default 50)")
    args = parser.parse_args()

    import torch

    from vgf_prob.rl.agent import VGFAgent
    from vgf_prob.rl.envs import make_env
    from vgf_prob.rl.evaluate import compare_policies
    from vgf_prob.rl.run.experiment import QUICKSTART, resolved_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    env = make_env(QUICKSTART.dataset)
    agent = VGFAgent(env.observation_space.shape[0], env.action_space.shape[0], resolved_config(QUICKSTART))
    env.close()
    print(f"CPU {_cpu_name()}, load average {os.getloadavg()[0]:.2f}, 1 thread")
    for _ in range(args.repeats):
        for matched in (False, True):
            start = time.process_time()
            rows = compare_policies(agent, QUICKSTART.dataset, QUICKSTART.budgets, args.episodes, 0, matched=matched)
            print(f"matched={matched!s:5}  {len(rows):2d} policies  {time.process_time() - start:6.2f} CPU s")


def _cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the platform's machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


if __name__ == "__main__":
    main()
