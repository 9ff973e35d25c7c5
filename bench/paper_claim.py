#!/usr/bin/python3
"""The HyperMoE paper's claim at small scale (issue 12, point 7; docs/training.md).

Trains, with `hypermoe train`, a HyperMoE and the same model without its HyperExpert (plain MoE:
the same experts, router, k, initial weights, data and budget) on the synthetic multi-task
problem (include/hypermoe/train/multitask.hpp), for top-2 routing (the GPT-2 HyperMoE layout) and
top-1 Switch routing with capacity (the Switch HyperMoE layout), 5 seeds each. Writes every run's
JSON lines to bench/results/paper_claim.json, prints a Markdown table of the final held-out loss
and accuracy (mean and sample standard deviation over seeds), load CV and training time, and
draws docs/paper_claim.svg (held-out accuracy against steps, mean and spread).

Usage: /usr/bin/python3 bench/paper_claim.py [--cli build/examples/hypermoe] [--seeds 5] [--steps 400]
       /usr/bin/python3 bench/paper_claim.py --plot-only   (redraw from bench/results/paper_claim.json)
Needs python3-matplotlib for the plot only; the build and the tests never run this.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "paper_claim.json")
PLOT = os.path.join(ROOT, "docs", "paper_claim.svg")

ROUTINGS = {  # label: the family whose layout and router the runs use
    "top-2 (GPT-2 HyperMoE)": "hypermoe_gpt2",
    "top-1 Switch, capacity 1.25 (Switch HyperMoE)": "hypermoe_switch",
}


def run(cli, family, hyper, seed, steps, common):
    args = [cli, "train", "--family", family, "--seed", str(seed), "--data-seed", str(seed), "--steps", str(steps), "--json"] + common
    if not hyper:
        args.append("--no-hyper")
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def summarise(runs):
    rows = []
    for routing in ROUTINGS:
        for hyper in (False, True):
            sel = [r for r in runs if r["routing"] == routing and r["hyper"] == hyper]
            final = [next(l for l in reversed(r["lines"]) if "eval_loss" in l) for r in sel]
            train_cv = [statistics.mean(l["load_cv"] for l in r["lines"] if "loss" in l) for r in sel]
            secs = [next(l for l in r["lines"] if "train_seconds" in l)["train_seconds"] for r in sel]
            sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
            rows.append({
                "routing": routing, "model": "HyperMoE" if hyper else "MoE", "seeds": len(sel),
                "loss": statistics.mean(f["eval_loss"] for f in final), "loss_sd": sd([f["eval_loss"] for f in final]),
                "acc": statistics.mean(f["eval_accuracy"] for f in final), "acc_sd": sd([f["eval_accuracy"] for f in final]),
                "cv": statistics.mean(train_cv), "seconds": statistics.mean(secs),
                "wins": None,
            })
        # Paired by seed: in how many seeds HyperMoE's final held-out loss is lower.
        plain = {r["seed"]: r for r in runs if r["routing"] == routing and not r["hyper"]}
        wins = 0
        for r in runs:
            if r["routing"] == routing and r["hyper"]:
                h = next(l for l in reversed(r["lines"]) if "eval_loss" in l)["eval_loss"]
                p = next(l for l in reversed(plain[r["seed"]]["lines"]) if "eval_loss" in l)["eval_loss"]
                wins += h < p
        rows[-1]["wins"] = wins
    return rows


def table(rows):
    out = ["| routing | model | held-out loss | held-out accuracy | load CV (training) | training time | seeds where HyperMoE's loss is lower |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['routing']} | {r['model']} | {r['loss']:.4f} ± {r['loss_sd']:.4f} | {r['acc']:.4f} ± {r['acc_sd']:.4f} | "
                   f"{r['cv']:.3f} | {r['seconds']:.1f} s | {'' if r['wins'] is None else str(r['wins']) + ' of ' + str(r['seeds'])} |")
    return "\n".join(out)


def plot(runs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(ROUTINGS), figsize=(11, 4), sharey=True)
    for ax, routing in zip(axes, ROUTINGS):
        for hyper, colour in ((False, "tab:blue"), (True, "tab:red")):
            sel = [r for r in runs if r["routing"] == routing and r["hyper"] == hyper]
            steps = [l["step"] for l in sel[0]["lines"] if "eval_accuracy" in l]
            accs = [[l["eval_accuracy"] for l in r["lines"] if "eval_accuracy" in l] for r in sel]
            mean = [statistics.mean(a[i] for a in accs) for i in range(len(steps))]
            lo = [min(a[i] for a in accs) for i in range(len(steps))]
            hi = [max(a[i] for a in accs) for i in range(len(steps))]
            ax.plot(steps, mean, color=colour, label=("HyperMoE" if hyper else "MoE (no HyperExpert)") + f", mean of {len(sel)} seeds")
            ax.fill_between(steps, lo, hi, color=colour, alpha=0.2)
        ax.set_title(routing, fontsize=10)
        ax.set_xlabel("training step (batch 64)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("held-out accuracy (band: min to max over seeds)")
    axes[0].legend(loc="lower right", fontsize=9)
    fig.suptitle("Synthetic multi-task problem: HyperMoE vs the same MoE without its HyperExpert", fontsize=11)
    fig.tight_layout()
    fig.savefig(PLOT, format="svg", metadata={"Date": None})
    print(f"wrote {PLOT}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli", default=os.path.join(ROOT, "build", "examples", "hypermoe"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--plot-only", action="store_true")
    a = ap.parse_args()
    if a.plot_only:
        with open(RESULTS) as f:
            doc = json.load(f)
    else:
        common = ["--train-rows", "16384", "--eval-rows", "2048", "--tasks", "8", "--classes", "4", "--batch", "64", "--lr", "1e-3",
                  "--log-every", "50", "--eval-every", "50", "--threads", "2"]
        runs = []
        for routing, family in ROUTINGS.items():
            for seed in range(1, a.seeds + 1):
                for hyper in (False, True):
                    lines = run(a.cli, family, hyper, seed, a.steps, common)
                    runs.append({"routing": routing, "family": family, "hyper": hyper, "seed": seed, "lines": lines})
                    final = next(l for l in reversed(lines) if "eval_loss" in l)
                    print(f"{family} seed {seed} {'HyperMoE' if hyper else 'MoE     '}: held-out loss {final['eval_loss']:.4f}, "
                          f"accuracy {final['eval_accuracy']:.4f}", file=sys.stderr)
        doc = {"command": " ".join(["hypermoe train --family F --seed S --data-seed S --steps", str(a.steps), "--json"] + common +
                                   ["[--no-hyper]"]),
               "runs": runs}
        with open(RESULTS, "w") as f:
            json.dump(doc, f, indent=1)
    print(table(summarise(doc["runs"])))
    try:
        plot(doc["runs"])
    except ImportError:
        print("python3-matplotlib is not installed: no plot", file=sys.stderr)


if __name__ == "__main__":
    main()
