"""SSL gain (issues 16, 28): did the synthetic data help, over independent repetitions?

Each repetition r is a whole pipeline run of the preset with its own labeled split
(``split_seed``), validation split, adapter-tuning, sampling and filter seeds, and its own
training seed, all ``--rep-offset + r``; the arms of one repetition share them (paired).
Per repetition it runs the pipeline's own stages (split, encode, tune, sample, shards: the
flow's code, cached in ``--runs-dir``) and then the arms with ``pipeline.stages.run_ssl_arm``
(supervised, baseline, augmented, replay, control, and baseline-2x / augmented-2x at twice the
steps: the flow's code too). With ``--set
loop.rounds=2`` it also runs the second round (``pipeline.generate.loop``: pseudo-labels from the
baseline, round-2 adapters, samples and shards) and its arms augmented-r2 and selftrain.

It prints every arm's validation and test error per repetition, and for each pair (augmented -
baseline, augmented - replay, augmented - control, ...) the per-repetition paired differences
in accuracy points (positive: the first arm is better), their mean, 95% CI, paired t-test, the
SD of the differences and the smallest gain the repetitions could detect at 80% power
(``pipeline.evaluate.paired``). Settings are to be chosen on the validation figures; the test
figures are for frozen settings. Convergence is the doubling rule
(``pipeline.evaluate.paired.doubling_check``): the baseline at 2K steps within 0.5 points of
the baseline at K, and the gain at 2K inside the 95% CI of the gain at K.

    # the issue-28 protocol: one process per repetition (2 cores: two at once), then the
    # summary of all five
    .venv/bin/python -m bench.ssl_gain --preset demo --reps 0 --steps 2048 --recipe cpu-short \\
        --set validation_per_class=200
    .venv/bin/python -m bench.ssl_gain --preset demo --reps 0,1,2,3,4 ... (same flags)

A rerun with the same flags reuses every finished stage and arm; ``--json PATH`` writes the
summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd
import torch

from bench.common import (
    add_preset_args,
    csv_list,
    fmt,
    load_bench_config,
    markdown_table,
    upward_moves,
)

ROUND_ONE = ("supervised", "baseline", "augmented", "replay", "control", "baseline-2x",
             "augmented-2x")
ROUND_TWO = ("augmented-r2", "selftrain")  # need --set loop.rounds=2 (and the baseline)
ARMS = ROUND_ONE + ROUND_TWO
# (arm, against): positive = arm has the lower error.
PAIRS = (("augmented", "baseline"), ("augmented", "replay"), ("augmented", "control"),
         ("replay", "baseline"), ("control", "baseline"), ("baseline", "supervised"),
         ("augmented-2x", "baseline-2x"), ("baseline-2x", "baseline"), ("augmented-r2", "baseline"), ("augmented-r2", "selftrain"),
         ("augmented-r2", "augmented"), ("selftrain", "baseline"))
SYNTHESIS_STAGES = ("split", "encode", "tune", "sample", "shards")
# >= 200 per class: on 2,000 images an error near 30% has a standard error of 1 point.
MIN_VALIDATION_PER_CLASS = 200
DEFAULT_REPS = [0, 1, 2, 3, 4]  # >= 5 independent repetitions (DESIGN.md, "How we measure")


def rep_overrides(r: int, offset: int) -> dict:
    """Everything a repetition draws on its own: split, tuning, sampling, filter seeds."""
    s = offset + r
    return {"split_seed": s, "tuning.seed": s, "sampling.seed": s, "filter.seed": s,
            "neighbors.seed": s}


def ssl_overrides(args: argparse.Namespace) -> dict:
    out = {}
    if args.steps:
        every = max(1, args.steps // args.curve_points)
        out.update({"ssl.budget": None, "ssl.steps": args.steps, "ssl.eval_every": every,
                    "ssl.checkpoint_every": every})
    if getattr(args, "recipe", None):
        out["ssl.recipe"] = args.recipe
    for name in ("batch_size", "mu"):
        if getattr(args, name) is not None:
            out[f"ssl.{name}"] = getattr(args, name)
    return out


def run_repetition(config, r: int, arms: list[str], offset: int,
                   synthesis: bool | None = None) -> dict[str, dict]:
    """Stages up to the shards, then each arm with training seed offset + r."""
    from pipeline import stages
    from pipeline.runs import init_run_dir

    if config.pretrains_base:
        raise SystemExit("this bench tunes on a fixed base_model; the preset pretrains one")
    run_dir = init_run_dir(config)
    needs_shards = bool({"augmented", "control", "augmented-2x", *ROUND_TWO} & set(arms)) \
        if synthesis is None else synthesis
    for stage in SYNTHESIS_STAGES if needs_shards else ("split",):
        rec = stages.STAGE_FUNCTIONS[stage](run_dir, config)
        state = "skipped" if rec.get("skipped") else \
            f"adopted from {rec['adopted_from']}" if rec.get("adopted_from") else \
            f"{rec.get('wall_s', 0):.0f} s"
        print(f"  rep {r} stage {stage}: {state}", flush=True)
    round_two = [a for a in arms if a in ROUND_TWO]
    first = [a for a in arms if a not in ROUND_TWO]
    if round_two and "baseline" not in first:
        first.append("baseline")  # its classifier makes the pseudo-labels
    out = {}
    for arm in first + round_two:
        if round_two and arm == round_two[0]:  # the baseline is trained: round 2's stages
            for name, fn in (("pseudo", stages.run_pseudo), ("encode", stages.run_encode),
                             ("tune", stages.run_tune), ("sample", stages.run_sample),
                             ("shards", stages.run_shards)):
                rec = fn(run_dir, config) if name == "pseudo" else fn(run_dir, config, 2)
                state = "skipped" if rec.get("skipped") else f"{rec.get('wall_s', 0):.0f} s"
                extra = f" {json.dumps(rec['metrics'])}" if name == "pseudo" else ""
                print(f"  rep {r} round-2 {name}: {state}{extra}", flush=True)
        rec = stages.run_ssl_arm(run_dir, config, arm, offset + r)
        unit = Path(run_dir) / stages.ssl_rel(arm, offset + r)
        m = json.loads((unit / "metrics.json").read_text())
        curve = pd.read_parquet(unit / "learning_curve.parquet")
        m["_curve"] = curve[[c for c in ("step", "test_error", "eval_images")
                             if c in curve]].to_dict("list")
        m["_unit"] = {k: v for k, v in rec.get("metrics", {}).items()
                      if k.startswith("control_")}
        m["_run_dir"] = str(run_dir)
        out[arm] = m
        print(f"  rep {r} {arm}: val error {m['val_error']}, test error {m['top1_error']:.4f} "
              f"({m['train_time_s']:.0f} s, {m['steps_per_s']:.2f} steps/s)", flush=True)
    return out


def summarise(results: dict[int, dict[str, dict]], arms: list[str]) -> dict:
    from pipeline.evaluate.paired import doubling_check, paired_difference

    reps = sorted(results)
    summary: dict = {"reps": reps, "arms": {}, "pairs": {}, "curves": {}, "doubling": {}}
    for arm in arms:
        summary["arms"][arm] = {
            "val_error": [results[r][arm]["val_error"] for r in reps],
            "test_error": [results[r][arm]["top1_error"] for r in reps]}
        summary["curves"][arm] = []
        for r in reps:
            curve = [100 * e for e in results[r][arm]["_curve"]["test_error"]]
            n = results[r][arm]["_curve"].get("eval_images", [0])[-1] or 0
            p = curve[-1] / 100
            summary["curves"][arm].append({
                "rep": r, "steps": list(results[r][arm]["_curve"]["step"]),
                "curve": [round(e, 2) for e in curve],
                # the largest rise between consecutive points, against the evaluation's own
                # binomial standard error at the last point (issue 28's aim: none larger)
                "largest_rise": round(upward_moves(curve)[0], 2),
                "eval_se": round(100 * (p * (1 - p) / n) ** 0.5, 2) if n else None})
    for a, b in PAIRS:
        if a in arms and b in arms:
            summary["pairs"][f"{a} - {b}"] = {
                split: paired_difference(*_acc(results, reps, a, b, key)).to_dict()
                for split, key in (("validation", "val_error"), ("test", "top1_error"))
                if all(results[r][a][key] is not None for r in reps)}
    if {"baseline", "baseline-2x"} <= set(arms):
        for split in ("validation", "test"):
            key = "val_error" if split == "validation" else "top1_error"
            if not all(results[r][a][key] is not None for r in reps
                       for a in ("baseline", "baseline-2x")):
                continue
            summary["doubling"][split] = doubling_check(
                [100 * results[r]["baseline"][key] for r in reps],
                [100 * results[r]["baseline-2x"][key] for r in reps],
                (summary["pairs"].get("augmented - baseline") or {}).get(split) and
                paired_difference(*_acc(results, reps, "augmented", "baseline", key)),
                (summary["pairs"].get("augmented-2x - baseline-2x") or {}).get(split) and
                paired_difference(*_acc(results, reps, "augmented-2x", "baseline-2x", key)),
            ).to_dict()
    return summary


def _acc(results: dict, reps: list[int], a: str, b: str, key: str) -> tuple[list, list]:
    """Accuracy % of arms a and b per repetition (the paired statistics' inputs)."""
    return ([100 * (1 - results[r][a][key]) for r in reps],
            [100 * (1 - results[r][b][key]) for r in reps])


def print_summary(summary: dict, results: dict, config) -> None:
    reps, arms = summary["reps"], list(summary["arms"])
    any_m = results[reps[0]][arms[0]]
    c = any_m["config"]
    print(f"\npreset {config.preset}; {any_m['dataset']}, {any_m['num_labeled']} labels, "
          f"{any_m['num_validation']} validation images; net {any_m['net']}, {any_m['steps']} "
          f"steps, batch {c['batch_size']} (+{c['mu']}x unlabeled); extra rows per batch: "
          f"{c['synthetic_batch_share']} x batch on top of the real rows; device "
          f"{any_m['device']}")
    for split, key in (("validation", "val_error"), ("test", "top1_error")):
        rows = [{"rep": r, **{a: 100 * results[r][a][key] for a in arms
                              if results[r][a][key] is not None}} for r in reps]
        print(f"\n{split} error % (each rep: its own split and seeds)")
        print(markdown_table(rows, [("rep", "rep", "")] + [(a, a, ".2f") for a in arms]))
    print("\npaired differences, accuracy points (positive: first arm better)")
    rows = []
    for name, by_split in summary["pairs"].items():
        for split, d in by_split.items():
            rows.append({"pair": name, "split": split,
                         "diffs": " / ".join(f"{x:+.2f}" for x in d["diffs"]),
                         "mean": d["mean"], "lo": d["ci_low"], "hi": d["ci_high"],
                         "p": d["p_value"], "sd": d["std"], "mde": d["detectable"],
                         "dir": d["direction"]})
    print(markdown_table(rows, [("pair", "pair", ""), ("split", "split", ""),
                                ("diffs", "per rep", ""), ("mean", "mean", "+.2f"),
                                ("lo", "95% CI low", "+.2f"), ("hi", "95% CI high", "+.2f"),
                                ("p", "p (paired t)", ".3f"), ("sd", "SD of diffs", ".2f"),
                                ("mde", "detectable at 80% power", ".2f"),
                                ("dir", "direction", "")]))
    print("\nvalidation learning curves (error %; EMA model, BN recomputed at each point), "
          "the largest rise between points and the evaluation's standard error:")
    for arm, curves in summary["curves"].items():
        for cv in curves:
            print(f"  {arm} rep {cv['rep']}: steps {cv['steps']} -> {cv['curve']}; largest "
                  f"rise {cv['largest_rise']:.2f} (SE {fmt(cv['eval_se'], '.2f')})")
    if "control" in arms:
        for r in reps:
            u = results[r]["control"]["_unit"]
            if u:
                print(f"  control rep {r}: {u}")
    print("\nconvergence by doubling (baseline error %, K -> 2K; the gain at 2K inside the "
          "95% CI of the gain at K):")
    if not summary["doubling"]:
        print("  not checked: run the arms baseline-2x and augmented-2x too")
    for split, d in summary["doubling"].items():
        g2 = d["gain_2k"]
        print(f"  {split}: baseline {d['baseline_k']:.2f} -> {d['baseline_2k']:.2f} (moved "
              f"{d['baseline_moved']:+.2f}, {'<' if d['baseline_converged'] else 'not <'} "
              f"{d['tolerance']}); gain at 2K "
              f"{fmt(g2['mean'] if g2 else None, '+.2f')} "
              f"{'inside' if d['gain_stable'] else 'outside' if d['gain_stable'] is False else 'vs'}"
              f" the CI at K -> "
              f"{ {True: 'CONVERGED', False: 'NOT converged'}.get(d['converged'], 'baseline converged, gain unchecked')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_preset_args(p, "demo")
    p.add_argument("--reps", type=csv_list(int), default=DEFAULT_REPS,
                   help="repetitions to run (each: its own split and seeds)")
    p.add_argument("--rep-offset", type=int, default=0,
                   help="seed of repetition r is offset + r (default 0)")
    p.add_argument("--arms", type=csv_list(str), default=list(ARMS))
    p.add_argument("--steps", type=int, default=None, help="FixMatch steps (default: preset's)")
    p.add_argument("--curve-points", type=int, default=8,
                   help="learning-curve points per run (validation split)")
    p.add_argument("--recipe", default=None,
                   help="SSL recipe (pipeline.ssl.config.RECIPES, e.g. cpu-short); default: the "
                        "preset's")
    p.add_argument("--batch-size", type=int, default=None, help="default: the preset's")
    p.add_argument("--mu", type=int, default=None, help="default: the preset's")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/_bench/ssl_gain/runs"))
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    p.add_argument("--generate-only", action="store_true",
                   help="run the stages up to the shards for each repetition, train nothing")
    args = p.parse_args()
    bad = set(args.arms) - set(ARMS)
    if bad:
        p.error(f"--arms {sorted(bad)}: choose from {', '.join(ARMS)}")
    torch.set_num_threads(args.threads)
    first = [a for a in args.arms if a not in ROUND_TWO]
    two_rounds = any(o.replace(" ", "") == "loop.rounds=2" for o in args.overrides)
    if (two_rounds or set(ROUND_TWO) & set(args.arms)) and "baseline" not in first:
        first.append("baseline")  # round 2 reads its classifier (the config insists)
    base = load_bench_config(args, {"runs_dir": str(args.runs_dir.resolve()),
                                    **ssl_overrides(args), "ssl.arms": first})
    if set(ROUND_TWO) & set(args.arms) and base.loop.rounds != 2:
        p.error(f"--arms {', '.join(ROUND_TWO)} are the second round's: add --set loop.rounds=2")
    if not base.validation_per_class:
        print("WARNING: no validation split (validation_per_class=0): curves and selection "
              "fall back to test images; pass --set validation_per_class=N")
    elif base.validation_per_class < MIN_VALIDATION_PER_CLASS:
        print(f"WARNING: {base.validation_per_class} validation images per class: a 0.5-point "
              f"move (the doubling rule) is below the evaluation's own noise; pass --set "
              f"validation_per_class={MIN_VALIDATION_PER_CLASS} or more")
    from pipeline.config import with_overrides

    results = {}
    for r in args.reps:
        cfg = with_overrides(base, {**rep_overrides(r, args.rep_offset),
                                    "ssl.seeds": [args.rep_offset + r]})
        results[r] = run_repetition(cfg, r, [] if args.generate_only else list(args.arms),
                                    args.rep_offset, synthesis=True if args.generate_only
                                    else None)
    if args.generate_only:
        return
    summary = summarise(results, list(args.arms))
    print_summary(summary, results, base)
    if args.json:
        from pipeline.atomic import atomic_write

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(args.json, lambda tmp: Path(tmp).write_text(json.dumps(
            {"summary": summary, "args": {k: str(v) for k, v in vars(args).items()}},
            indent=1, default=str)))


if __name__ == "__main__":
    main()
