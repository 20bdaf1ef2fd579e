"""SSL gain: did the synthetic data help, over independent repetitions?

A thin caller of the sweep (``augment sweep``, ``flows/sweep.py``): it makes a one-cell sweep
spec from the preset and flags and runs it, so the repetitions, the paired statistics and the
doubling rule are the sweep's (``pipeline.sweep``), one implementation. Repetition r is a whole
pipeline run with its own labeled split, validation split, tuning, sampling, filter and
training seeds (all ``--rep-offset + r``); the arms of one repetition are paired.

It prints every arm's validation and test error per repetition, and for each pair the
per-repetition differences in accuracy points (positive: the first arm is better), their
mean, 95% CI, paired t-test, SD and the smallest gain detectable at 80% power, the doubling
check, and each arm's validation learning curve with its largest rise. Settings are to be
chosen on the validation figures; the test figures are for frozen settings. (Runs live in
``<runs-dir>/runs``; runs of the earlier bench, directly in ``<runs-dir>``, are not reused.)

    # the protocol of bench/RESULTS.md (five repetitions, K = 4096 and 2K)
    .venv/bin/python -m bench.ssl_gain --preset demo --steps 4096 --recipe cpu-short \\
        --set validation_per_class=200

With ``--set loop.rounds=2`` every repetition also runs the second round and its arms
(augmented-r2, selftrain). A rerun with the same flags reuses every finished repetition;
``--json PATH`` writes the summary.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import add_preset_args, csv_list, fmt, markdown_table, upward_moves

ARMS = ("supervised", "baseline", "augmented", "replay", "control", "baseline-2x",
        "augmented-2x")
# (arm, against): positive = arm has the lower error.
PAIRS = (("augmented", "baseline"), ("augmented", "replay"), ("augmented", "control"),
         ("replay", "baseline"), ("control", "baseline"), ("baseline", "supervised"),
         ("augmented-r2", "baseline"), ("augmented-r2", "selftrain"),
         ("augmented-r2", "augmented"), ("selftrain", "baseline"))
# >= 200 per class: on 2,000 images an error near 30% has a standard error of 1 point.
MIN_VALIDATION_PER_CLASS = 200


def spec_for(args: argparse.Namespace) -> dict:
    """The one-cell sweep spec these flags describe."""
    from pipeline.config import parse_overrides

    overrides = parse_overrides(args.overrides)
    if args.base_model:
        overrides["base_model"] = str(Path(args.base_model).resolve())
    if args.device:
        overrides["device"] = args.device
    if args.steps:
        every = max(1, args.steps // args.curve_points)
        overrides.update({"ssl.budget": None, "ssl.steps": args.steps,
                          "ssl.eval_every": every, "ssl.checkpoint_every": every})
    if args.recipe:
        overrides["ssl.recipe"] = args.recipe
    overrides["ssl.arms"] = list(args.arms)
    return {"name": args.name, "preset": args.preset, "set": overrides,
            "repetitions": list(args.reps), "rep_offset": args.rep_offset,
            "pairs": [list(p) for p in PAIRS], "parallel": args.parallel,
            "threads": args.threads, "runs_dir": str(args.runs_dir.resolve())}


def print_summary(records: dict[int, dict], summary: dict) -> None:
    reps, arms = summary["reps"], list(summary["arms"])
    for split in ("validation", "test"):
        rows = [{"rep": r, **{a: summary["arms"][a][split][i] for a in arms
                              if split in summary["arms"][a]}} for i, r in enumerate(reps)]
        print(f"\n{split} error % (each rep: its own split and seeds)")
        print(markdown_table(rows, [("rep", "rep", "")] + [(a, a, ".2f") for a in arms]))
    print("\npaired differences, accuracy points (positive: first arm better)")
    rows = []
    for name, by_split in summary["pairs"].items():
        for split, e in by_split.items():
            d = e["diff"]
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
    print("\nvalidation learning curves (error %; EMA model, BN recomputed at each point) and "
          "the largest rise between points:")
    for arm in arms:
        for r in reps:
            curve = records[r]["arms"][arm].get("curve") or {}
            errs = [100 * e for e in curve.get("test_error", [])]
            if errs:
                print(f"  {arm} rep {r}: steps {curve['step']} -> "
                      f"{[round(e, 2) for e in errs]}; largest rise "
                      f"{upward_moves(errs)[0]:.2f}")
    print("\nconvergence by doubling (reference arm's error %, K -> 2K; the gain at 2K inside "
          "the 95% CI of the gain at K):")
    for name, by_split in summary["pairs"].items():
        for split, e in by_split.items():
            d = e.get("doubling")
            if d:
                g2 = d["gain_2k"]
                print(f"  {name} ({split}): {d['baseline_k']:.2f} -> {d['baseline_2k']:.2f} "
                      f"(moved {d['baseline_moved']:+.2f}); gain at 2K "
                      f"{fmt(g2['mean'] if g2 else None, '+.2f')} -> "
                      f"{ {True: 'CONVERGED', False: 'NOT converged'}.get(d['converged'], 'reference converged, gain unchecked')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_preset_args(p, "demo")
    p.add_argument("--name", default="ssl-gain", help="sweep name (its folder)")
    p.add_argument("--reps", type=csv_list(int), default=[0, 1, 2, 3, 4],
                   help="repetitions to run (each: its own split and seeds); >= 5 for a claim")
    p.add_argument("--rep-offset", type=int, default=0,
                   help="seed of repetition r is offset + r (default 0)")
    p.add_argument("--arms", type=csv_list(str), default=list(ARMS))
    p.add_argument("--steps", type=int, default=None, help="FixMatch steps (default: preset's)")
    p.add_argument("--curve-points", type=int, default=8,
                   help="learning-curve points per run (validation split)")
    p.add_argument("--recipe", default=None,
                   help="SSL recipe (pipeline.ssl.config.RECIPES, e.g. cpu-short)")
    p.add_argument("--parallel", type=int, default=1,
                   help="repetitions at once (worker processes)")
    p.add_argument("--runs-dir", type=Path, default=Path("runs/_bench/ssl_gain"))
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    args = p.parse_args()

    from flows.sweep import sweep, task_runner
    from pipeline.sweep.run import load_records
    from pipeline.sweep.spec import SweepSpec, check_spec
    from pipeline.sweep.stats import cell_summary

    spec = SweepSpec.model_validate(spec_for(args))
    (config,) = check_spec(spec)
    if config.validation_per_class < MIN_VALIDATION_PER_CLASS:
        print(f"WARNING: {config.validation_per_class} validation images per class: a "
              f"0.5-point move (the doubling rule) is below the evaluation's own noise; pass "
              f"--set validation_per_class={MIN_VALIDATION_PER_CLASS} or more")
    folder = Path(spec.runs_dir)
    sweep.with_options(task_runner=task_runner(spec))(
        spec, str(folder), {"runs_dir": str(folder / "runs"), "progress": not args.quiet})
    (records,) = load_records(folder, spec).values()
    summary = cell_summary(records, [tuple(p) for p in spec.pairs])
    print_summary(records, summary)
    if args.json:
        from pipeline.atomic import atomic_write_json

        atomic_write_json(args.json, {"summary": summary, "spec": spec.model_dump(mode="json")})


if __name__ == "__main__":
    main()
