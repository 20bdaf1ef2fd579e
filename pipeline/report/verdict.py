"""The report's verdict: what a reader can act on, in sentences that say how sure they are.

Did the synthetic data help (augmented vs baseline, paired over repetitions, with its 95%
interval, the SD of the differences and the smallest difference the repetitions could
detect), did the generated images add anything beyond extra rows (replay) and beyond the
encoder's pseudo-labels (control), had the budget let SSL beat supervised training, and did
doubling the budget change the answer (``pipeline.evaluate.paired.doubling_check``). A
direction is stated only when the interval excludes 0; below ``MIN_REPETITIONS`` pairs, none
is.
"""

from __future__ import annotations

from pipeline.data.pool_labels import NOT_COMPUTED
from pipeline.evaluate.paired import MIN_REPETITIONS, POWER
from pipeline.report.data import NOT_RUN, RunData, budget_short
from pipeline.report.gain_map import map_doubling, map_note
from pipeline.report.render import NEEDS_LABELS, ci_pp, pct, pp, pval

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
    ("supervised+synthetic", "supervised"): (
        "the synthetic rows helped the labeled images alone",
        "the synthetic rows lowered the test error of training on the labeled images alone",
        "the synthetic rows raised the test error of training on the labeled images alone"),
    ("augmented", "replay"): (
        "the generated images add anything beyond as many extra rows of the labeled images",
        ("the generated images lowered the error beyond what the same extra rows drawn again "
         "from the labeled images give"),
        ("the generated images raised the error compared with the same extra rows drawn again "
         "from the labeled images")),
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
    power = (f"; SD of the differences {pp(d.std)[1:]}, so {_runs(d.n)} detect a true "
             f"difference of {pp(d.detectable)[1:]} or more with {POWER:.0%} power"
             if d.detectable is not None and d.std else "")
    stats = (f"{pp(d.mean)} (95% CI {ci_pp(d.ci_low, d.ci_high)}, paired t-test "
             f"p {p if p.startswith('<') else '= ' + p}{power})")
    if d.direction == "negative":
        clause, cls = lower, "good"
    elif d.direction == "positive":
        clause, cls = higher, "bad"
    else:
        clause, cls = "no clear difference (the interval includes 0)", "neutral"
    return (f"{comp.arm.capitalize()} minus {comp.against} error{short} over {_runs(d.n)}: "
            f"{stats}: {clause}."), cls


def convergence_sentence(run: RunData) -> str | None:
    """Did doubling the budget change the headline answer? None when its reference arm (the
    baseline, or supervised in a run without a pool) did not run."""
    arm, against = run.headline_pair()
    if against not in run.arms:
        return None
    d = run.doubling(arm, against)
    if d is None:
        return map_doubling(run, arm, against) or (
            f"Convergence was not checked: add {against}-2x (and {arm}-2x) to ssl.arms "
            "to train the same arms at twice the steps. Gains before convergence are not "
            "gains at convergence.")
    moved = (f"Doubling the budget moved the {against}'s test error from {d.baseline_k:.2f}% "
             f"to {d.baseline_2k:.2f}% ({d.baseline_moved:+.2f} points, "
             f"{'under' if d.baseline_converged else 'not under'} {d.tolerance})")
    if d.gain_2k is None:
        gain = f"; the gain at twice the steps was not measured (add {arm}-2x to ssl.arms)"
    elif d.gain_stable is None:
        gain = (f"; {arm} minus {against} at twice the steps was {d.gain_2k.mean:+.2f} "
                f"points, but with {_runs(d.gain_k.n)} the gain has no 95% interval to hold it "
                "against")
    else:
        gain = (f"; {arm} minus {against} at twice the steps, {d.gain_2k.mean:+.2f} points, "
                f"is {'inside' if d.gain_stable else 'outside'} the 95% interval of the "
                f"difference ({d.gain_k.ci_low:+.2f} to {d.gain_k.ci_high:+.2f})")
    tail = ("The comparison is converged." if d.converged else
            f"The {against} is converged; the gain's convergence is unchecked."
            if d.converged is None else
            "The comparison is not converged: gains before convergence are not gains at "
            "convergence.")
    return f"{moved}{gain}. {tail}"


def _control_precision(run: RunData) -> str:
    """' (the judge's labels were right for 71% of them)' from the control units' metrics."""
    arm = run.arms.get("control")
    seeds = arm.seeds if arm else []
    vals = [s.metrics.get("control_precision") for s in seeds]
    vals = [v for v in vals if v is not None]
    # The judged rows come from the unlabeled pool; where it has no labels, say so.
    reason = next((s.metrics.get("control_precision" + NOT_COMPUTED) for s in seeds
                   if s.metrics.get("control_precision" + NOT_COMPUTED)), None)
    if not vals:
        return f" (how often the judge's labels were right: {NEEDS_LABELS}, as {reason})" \
            if reason else ""
    scored = [s.metrics.get("control_precision_scored") for s in seeds]
    of = "them" if scored[0] is None else f"the {scored[0]} of them with a known label"
    return f" (the judge's labels were right for {100 * sum(vals) / len(vals):.0f}% of {of})"


def fit_sentence(run: RunData) -> tuple[str, bool] | None:
    """(what the fit stage measured, whether the base fits); None when it did not run."""
    m = (run.stages.get("fit") or {}).get("metrics") or {}
    if "fits" not in m:
        return None
    if not m["fits"]:
        from pipeline.evaluate.domain_fit import misfit_message

        text = misfit_message(m)
        return text[0].upper() + text[1:], False
    text = (f"The base model fits this data: {m['coverage']:.0%} of its samples lie among the "
            f"pool's images (the pool's own: {m['pool_coverage']:.0%}; KID x 100 "
            f"{100 * m['kid_base_pool']:.1f}, floor {100 * m['kid_pool_pool']:.1f}).")
    return text, True


def verdict(run: RunData) -> dict:
    """What a reader can act on: did the synthetic data help, by how much, how sure.

    ``text`` is the headline (augmented vs baseline); ``notes`` (id, text) say whether the
    budget allows an SSL comparison, what the repetitions are, what the control arm shows
    what replay and the control arm show and whether doubling the budget changed the answer.
    """
    budget = ssl_budget(run)
    short = bool(budget and budget["short"])
    notes: list[dict] = []
    if (fit := fit_sentence(run)) is not None and not fit[1]:
        notes.append({"id": "fit-note", "text": fit[0]})  # first: it explains what follows
    if budget and short:
        notes.append({"id": "budget-note", "text": budget["text"]})
    arm, against = run.headline_pair()
    comp = run.comparison(arm, against)
    if comp is None:
        have = ", ".join(run.arms) or "no arm"
        text = f"{arm.capitalize()} vs {against}: {NOT_RUN} (finished SSL arms: {have})."
        cls = "missing"
    else:
        text, cls = paired_sentence(comp, short)
    replay = run.comparison("augmented", "replay")
    if replay is not None:
        notes.append({"id": "replay-note", "text": paired_sentence(replay, short)[0] +
                      " The replay arm adds as many extra rows per batch, drawn again from the "
                      "real labeled images with the synthetic rows' weight."})
    control = run.comparison("augmented", "control")
    if control is not None:
        notes.append({"id": "control-note", "text": paired_sentence(control, short)[0] +
                      " The control arm adds as many real unlabeled images as synthetic rows, "
                      "labeled by the encoder/prototype judge the synthetic filter uses, and "
                      "takes them out of the unlabeled pool" + _control_precision(run) + "."})
    if comp is not None or control is not None:
        notes.append({"id": "seed-note", "text": SEED_CAVEAT})
    converged = convergence_sentence(run)
    if converged:
        notes.append({"id": "curve-note", "text": converged})
    regime = map_note(run)
    if regime:
        notes.append({"id": "map-note", "text": regime})
    return {"cls": cls, "text": text, "notes": notes, "budget": budget}
