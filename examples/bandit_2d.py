"""The paper's toy: a 2-D continuous bandit where a learned value is only right near the data.

Offline actions sit in two clusters. The true reward has two peaks; the larger one sits just beside the
right cluster. A value model (an MLP) fit to the logged rewards is accurate near the clusters and wrong far
from them. We compare, by the TRUE reward of the action each method picks:

- the best logged action (highest logged reward),
- best-of-N from a behaviour reference fit to the data (VGF with budget L = 0),
- VGF (Stein field + Adam on particles) with a small and a large step budget,
- plain gradient ascent on the value with no budget,

print the true reward each reaches and how far its cloud moved (the displacement bound on W2 and a
Sinkhorn estimate of W2), and save a PNG of the reference cloud, the value landscape and the particle
paths. Run: ``python examples/bandit_2d.py [--out bandit_2d.png] [--seed 0] [--results-json results.json]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

import vgf_prob as vgf  # noqa: E402
from vgf_prob.distributions import MixtureReference  # noqa: E402

CLUSTER_CENTERS = torch.tensor([[-0.5, -0.2], [0.35, 0.1]])
CLUSTER_SCALE = 0.12
PEAKS = torch.tensor([[-0.5, -0.2], [0.6, 0.35]])  # small peak on the left cluster, large one beside the right
PEAK_HEIGHTS = torch.tensor([0.6, 1.0])
PEAK_WIDTH = 0.25


def true_reward(actions: Tensor) -> Tensor:
    """Bimodal ground truth: sum_k h_k exp(-||a - p_k||^2 / (2 w^2))."""
    sq = (actions.unsqueeze(-2) - PEAKS.to(actions)).square().sum(-1)
    return (PEAK_HEIGHTS.to(actions) * torch.exp(-sq / (2 * PEAK_WIDTH**2))).sum(-1)


def offline_data(num_actions: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    cluster = torch.randint(0, 2, (num_actions,), generator=generator)
    actions = CLUSTER_CENTERS[cluster] + CLUSTER_SCALE * torch.randn(num_actions, 2, generator=generator)
    rewards = true_reward(actions) + 0.05 * torch.randn(num_actions, generator=generator)
    return actions.clamp(-1, 1), rewards


class ValueModel(nn.Module):
    """Q(a): an MLP regressed on the logged rewards; it ignores the (empty) observation."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, obs: Tensor | None, actions: Tensor) -> Tensor:
        return self.net(actions).squeeze(-1)


def fit_value(actions: Tensor, rewards: Tensor, steps: int = 1500) -> ValueModel:
    model = ValueModel()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = (model(None, actions) - rewards).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.requires_grad_(False)


def fit_reference(actions: Tensor) -> MixtureReference:
    """Two-component Gaussian reference fit to the data by a few EM-free steps: split by the x coordinate."""
    left = actions[:, 0] < 0
    means = torch.stack([actions[left].mean(0), actions[~left].mean(0)])
    scales = torch.stack([actions[left].std(0), actions[~left].std(0)])
    logits = torch.stack([left.float().mean(), (~left).float().mean()]).log()
    return MixtureReference(means, scales, logits)


def recording_flow(flow: vgf.ValueGradientFlow, start: Tensor, value, steps: int) -> tuple[vgf.ParticlePolicy, Tensor]:
    """Run ``flow`` one step at a time from ``start`` (operators chain) and keep every intermediate cloud."""
    path = [start]
    policy = vgf.ParticlePolicy(start)
    one_step = flow.with_budget(1)
    for _ in range(steps):
        policy = one_step(policy, None, value)
        path.append(policy.particles)
    return policy, torch.stack(path)


def run(out: Path, seed: int = 0, num_particles: int = 64, small_budget: int = 5, large_budget: int = 25) -> dict[str, dict[str, float]]:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    actions, rewards = offline_data(400, generator)
    value = fit_value(actions, rewards)
    reference = fit_reference(actions)
    obs = torch.zeros(1, 1)
    start = reference(obs).sample_particles(num_particles, generator=generator).clamp(-1, 1)
    box = vgf.BoxProjection(-1.0, 1.0)
    vgf_flow = vgf.ValueGradientFlow(vgf.SteinField(alpha=0.05), vgf.ParticleAdam(lr=0.02), projection=box)
    ascent = vgf.ValueGradientFlow(vgf.ValueGradient(), vgf.ParticleAdam(lr=0.02), projection=box)
    sinkhorn = vgf.SinkhornBudget(1.0, blur=0.01)

    methods: dict[str, tuple[Tensor, Tensor]] = {}
    for name, flow, steps in (
        ("best-of-N (L=0)", vgf_flow, 0),
        (f"VGF L={small_budget}", vgf_flow, small_budget),
        (f"VGF L={large_budget}", vgf_flow, large_budget),
        ("gradient ascent, no budget", ascent, 300),
    ):
        policy, path = recording_flow(flow, start, value, steps)
        chosen = policy.select("argmax", value=value)
        methods[name] = (chosen, path)

    best_logged = actions[rewards.argmax()]
    results = {"best logged action": {"true reward": true_reward(best_logged).item(), "value model": value(None, best_logged).item(), "W2 bound": 0.0, "Sinkhorn W2": 0.0}}
    for name, (chosen, path) in methods.items():
        final = path[-1]
        results[name] = {
            "true reward": true_reward(chosen).item(),
            "value model": value(None, chosen).item(),
            "W2 bound": vgf.budget.displacement(start, final).item(),
            "Sinkhorn W2": sinkhorn.spent(start, final).item(),
            "distance to data": torch.cdist(chosen.reshape(1, 2), actions).min().item(),
        }
    results["best logged action"]["distance to data"] = 0.0
    _print_table(results)
    _plot(out, actions, value, start, methods)
    print(f"wrote {out}")
    return results


def _print_table(results: dict[str, dict[str, float]]) -> None:
    columns = ["true reward", "value model", "W2 bound", "Sinkhorn W2", "distance to data"]
    print(f"{'method':<28}" + "".join(f"{c:>18}" for c in columns))
    for name, row in results.items():
        print(f"{name:<28}" + "".join(f"{row[c]:>18.3f}" for c in columns))


def _plot(out: Path, actions: Tensor, value: ValueModel, start: Tensor, methods: dict[str, tuple[Tensor, Tensor]]) -> None:
    grid = torch.linspace(-1, 1, 121)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([xx, yy], -1)
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    for ax, landscape, title in (
        (axes[0], value(None, points), "learned value Q (what the flows climb)"),
        (axes[1], true_reward(points), "true reward"),
    ):
        contour = ax.contourf(xx, yy, landscape, levels=30, cmap="viridis")
        fig.colorbar(contour, ax=ax)
        ax.scatter(actions[:, 0], actions[:, 1], s=4, c="white", alpha=0.4, label="offline actions")
        ax.scatter(start[0, :, 0], start[0, :, 1], s=10, c="black", label="reference particles")
        ax.set_title(title)
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
    colors = ["tab:orange", "tab:red", "tab:pink"]
    for color, (name, (chosen, path)) in zip(colors, [(n, m) for n, m in methods.items() if n != "best-of-N (L=0)"]):
        for ax in axes:
            ax.plot(path[:, 0, :, 0], path[:, 0, :, 1], color=color, lw=0.6, alpha=0.6)
            ax.scatter(path[-1, 0, :, 0], path[-1, 0, :, 1], s=8, color=color, label=name)
            ax.scatter(chosen[0, 0], chosen[0, 1], marker="*", s=250, color=color, edgecolors="black")
    axes[1].legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bandit_2d.png"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-json", type=Path, default=None, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    results = run(args.out, seed=args.seed)
    if args.results_json is not None:
        args.results_json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
