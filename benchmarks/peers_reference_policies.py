"""Scripted Reacher policies scored by the project's evaluator: where a learned policy's score sits.

    python benchmarks/peers_reference_policies.py --episodes 50 --seed 0

Each policy plays the episodes seeded ``seed + k`` of `vgf_prob.rl.evaluate.evaluate` (the score 0 is uniform
random play, 100 the scripted expert). The rows: the arm held still (zero torque); the scripted expert and
half its action (the mean action of ``reacher-mixed-v0``, whose other half is uniform noise of mean 0); the
mean action of ``reacher-spin-v0`` (0.5 expert + 0.5 (1, 1)); ``reacher-biased-v0``'s mean action (expert +
(0.5, -0.5)) and that action with half the bias (a step back toward the expert, out of the data's support).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def policies() -> dict[str, object]:
    from vgf_prob.rl.gym_generate import reacher_expert

    bias = np.array([0.5, -0.5])
    return {
        "zero torque (arm held still)": lambda o: np.zeros(2),
        "scripted expert": reacher_expert,
        "0.5 x expert (mixed data's mean action)": lambda o: 0.5 * reacher_expert(o),
        "0.5 expert + 0.5 (1, 1) (spin data's mean action)": lambda o: 0.5 * reacher_expert(o) + 0.5,
        "expert + (0.5, -0.5) (biased data's mean action)": lambda o: np.clip(reacher_expert(o) + bias, -1, 1),
        "expert + (0.25, -0.25) (half the bias)": lambda o: np.clip(reacher_expert(o) + bias / 2, -1, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="episode k resets with seed + k")
    args = parser.parse_args(argv)
    from vgf_prob.rl.evaluate import evaluate

    for name, policy in policies().items():
        def act(obs: torch.Tensor, policy=policy) -> torch.Tensor:
            return torch.as_tensor(np.stack([policy(o) for o in obs.numpy().astype(np.float64)]), dtype=torch.float32)

        result = evaluate(act, "reacher-mixed-v0", args.episodes, args.seed)
        print(f"| {name} | {result.score:.1f} ± {result.score_std:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
