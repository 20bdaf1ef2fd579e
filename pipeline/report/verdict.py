"""The report's verdict: what a reader can act on, in sentences that say how sure they are.

Did the synthetic data help (augmented vs baseline, paired over repetitions, with its 95%
interval), did the generated images add anything beyond the control, had the budget let SSL
beat supervised training, and had the baseline's learning curve settled. A direction is
stated only when the interval excludes 0; below ``MIN_REPETITIONS`` pairs, none is.
"""

from __future__ import annotations

import math

from pipeline.evaluate.paired import MIN_REPETITIONS
from pipeline.report.data import NOT_RUN, SETTLED_TOLERANCE_PP, RunData, budget_short
from pipeline.report.render import ci_pp, pct, pp, pval

ALGORITHM_NAMES = {"fixmatch": "FixMatch", "flexmatch": "FlexMatch", "mixmatch": "MixMatch"}
# What each comparison answers, for "n paired runs are too few to say whether ...", and the
# clause for a difference whose 95% interval excludes 0 (negative = fewer errors, positive).
QUESTIONS = {
    ("augmented", "baseline"): (
        "the synthetic data helped", "the synthetic data lowered the test error",
        "the synthetic data raised the test error"),
    ("augmented", "control"): (
        "the generated images add anything beyond the encoder's pseudo-labels",
        ("the generated images lowered the error beyond what as many real images with the "
        "encoder's pseudo-labels give"),
        ("the generated images raised the error compared with as many real images with the "
        "encoder's pseudo-labels")),
}
SEED_CAVEAT = ("The repetitions are training seeds on one labeled split and one set of synthetic "
               "images (not independent splits), so an interval over them covers seed noise "
               "only, not the variation between labeled splits or synthetic draws.")


def _algorithm(run: RunData) -> str:
    base = run.arms.get("baseline")
    name = (base.seeds[0].metrics.get("algorithm") if base else None) or \
        ((run.config or {}).get("ssl") or {}).get("algorithm") or "fixmatch"
    return ALGORITHM_NAMES.get(str(name).lower(), str(name))


def ssl_budget(run: RunData) -> dict | None:
    """Has the SSL baseline beaten supervised training (mean error over seeds)? None when
    either arm has not run. ``short``: it has not, so the budget is too short to compare SSL
    arms."""
    short = budget_short(run)
    if short is None:
        return None
    s, b = run.arms["supervised"].summary[0], run.arms["baseline"].summary[0]
    algo = _algorithm(run)
    text = (f"The budget is too short for an SSL comparison: {algo} has not beaten supervised "
            f"training (baseline {pct(b)} vs supervised {pct(s)} error), so any difference "
            "between the SSL arms is measured before semi-supervised training helped at all."
            if short else
            f"{algo} beat supervised training (baseline {pct(b)} vs supervised {pct(s)} "
            "error).")
    return {"short": short, "baseline": b, "supervised": s, "algorithm": algo, "text": text}


def _runs(n: int) -> str:
    return f"{n} paired run{'s' if n != 1 else ''}"


def paired_sentence(comp, short_budget: bool = False) -> tuple[str, str]:
    """(sentence, css class) for ``comp.arm`` vs ``comp.against``.

    Below ``MIN_REPETITIONS`` pairs: the per-seed figures and that they are too few, no
    direction. Otherwise the mean difference, its 95% CI and p, and a direction only when the
    interval excludes 0.
    """
    d = comp.paired
    question, lower, higher = QUESTIONS.get(
        (comp.arm, comp.against),
        (f"{comp.arm} differs from {comp.against}", f"{comp.arm} had fewer errors",
         f"{comp.arm} had more errors"))
    short = " (at a budget too short for an SSL comparison)" if short_budget else ""
    label = f"{comp.arm.capitalize()} vs {comp.against}{short}"
    if not d.enough:
        seeds = "; ".join(f"seed {s}: {comp.arm} {pct(a)} vs {comp.against} {pct(b)} error "
                          f"({pp(a - b)})" for s, a, b in
                          zip(comp.seeds, comp.arm_errors, comp.against_errors, strict=True))
        verb = "are" if d.n != 1 else "is"
        return ((f"{label}, {_runs(d.n)}: {seeds}. {_runs(d.n).capitalize()} {verb} too few "
                f"to say whether {question} (a 95% interval needs at least "
                f"{MIN_REPETITIONS})."), "neutral")
    p = pval(d.p_value)
    stats = (f"{pp(d.mean)} (95% CI {ci_pp(d.ci_low, d.ci_high)}, paired t-test "
             f"p {p if p.startswith('<') else '= ' + p})")
    if d.direction == "negative":
        clause, cls = lower, "good"
    elif d.direction == "positive":
        clause, cls = higher, "bad"
    else:
        clause, cls = "no clear difference (the interval includes 0)", "neutral"
    return (f"{comp.arm.capitalize()} minus {comp.against} error{short} over {_runs(d.n)}: "
            f"{stats}: {clause}."), cls


def curve_sentence(run: RunData, arm: str = "baseline") -> str | None:
    """Had the arm's learning curve settled (``learning_curve_settled``)? None without one."""
    c = run.curve_check(arm)
    if c is None:
        return None
    if math.isnan(c.movement_pp):
        return (f"The {arm}'s learning curve has one point in its last quarter (step "
                f"{c.last_step}), too few to tell whether it settled: set ssl.eval_every to a "
                "quarter of ssl.steps or less. Gains before convergence are not gains at "
                "convergence.")
    steps = (f"steps {c.first_step}-{c.last_step}" if c.first_step < c.last_step
             else f"step {c.last_step}")
    where = (f"over its last quarter ({steps}; {c.split} error, mean "
             f"over {c.n_seeds} seed{'s' if c.n_seeds != 1 else ''}) it moved "
             f"{c.movement_pp:.2f} points")
    if c.settled:
        return (f"The {arm}'s learning curve had settled: {where}, under "
                f"{SETTLED_TOLERANCE_PP}.")
    return (f"The {arm}'s learning curve had not settled: {where}, not under "
            f"{SETTLED_TOLERANCE_PP}. This run is not converged: gains before convergence are "
            "not gains at convergence.")


def verdict(run: RunData) -> dict:
    """What a reader can act on: did the synthetic data help, by how much, how sure.

    ``text`` is the headline (augmented vs baseline); ``notes`` (id, text) say whether the
    budget allows an SSL comparison, what the repetitions are, what the control arm shows
    and whether the baseline's learning curve settled.
    """
    budget = ssl_budget(run)
    short = bool(budget and budget["short"])
    notes: list[dict] = []
    if budget and short:
        notes.append({"id": "budget-note", "text": budget["text"]})
    comp = run.comparison("augmented", "baseline")
    if comp is None:
        have = ", ".join(run.arms) or "no arm"
        text, cls = (f"Augmented vs baseline: {NOT_RUN} (finished SSL arms: {have}).",
                     "missing")
    else:
        text, cls = paired_sentence(comp, short)
    control = run.comparison("augmented", "control")
    if control is not None:
        notes.append({"id": "control-note", "text": paired_sentence(control, short)[0] +
                      " The control arm adds as many real unlabeled images as synthetic rows, "
                      "labeled by the encoder/prototype judge the synthetic filter uses."})
    if comp is not None or control is not None:
        notes.append({"id": "seed-note", "text": SEED_CAVEAT})
    curve = curve_sentence(run)
    if curve:
        notes.append({"id": "curve-note", "text": curve})
    return {"cls": cls, "text": text, "notes": notes, "budget": budget}
