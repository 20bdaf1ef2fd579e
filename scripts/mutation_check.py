"""Plant one-line bugs in a copy of the code and check that the test suite catches each.

    .venv/bin/python scripts/mutation_check.py            # every mutant below
    .venv/bin/python scripts/mutation_check.py kid-swap   # the ones whose name contains this

Each mutant is a plausible slip in the method's maths or bookkeeping (the kind that leaves a
pipeline running and its numbers wrong). The checkout is copied to a temporary folder, one
line is changed there, and the named test files run against the copy (``PYTHONPATH`` puts it
ahead of the editable install), so the working tree is never touched. A mutant the tests do
not catch is a missing test: the script exits 1 and names it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str      # file, relative to the repository root
    old: str       # text that must occur exactly once
    new: str
    tests: tuple[str, ...]  # test files (or node ids) expected to catch it


MUTANTS = (
    Mutant("guidance-mixes-from-cond", "anl_core/sampling.py",
           "eps = eps_null + guidance * (eps_cond - eps_null)",
           "eps = eps_cond + guidance * (eps_cond - eps_null)",
           ("tests/test_method_maths.py", "tests/test_sampling.py")),
    Mutant("scale-model-input-dropped", "anl_core/sampling.py",
           "inp = sched.scale_model_input(x, t)", "inp = x",
           ("tests/test_method_maths.py", "tests/test_sampling.py")),
    Mutant("fixmatch-unsup-ignored", "pipeline/ssl/algorithms/fixmatch.py",
           "loss = sup + self.config.lambda_u * unsup", "loss = sup + 0 * unsup",
           ("tests/test_method_maths.py", "tests/test_ssl_usb.py", "tests/test_ssl.py")),
    Mutant("kid-against-itself", "pipeline/evaluate/quality.py",
           "kid(feats, real_feats, config.kid_subsets,", "kid(feats, feats, config.kid_subsets,",
           ("tests/test_method_maths.py", "tests/test_quality.py")),
    Mutant("kid-swap-subsets-and-size", "pipeline/evaluate/quality.py",
           "kid(feats, real_feats, config.kid_subsets, config.kid_subset_size,",
           "kid(feats, real_feats, config.kid_subset_size, config.kid_subsets,",
           ("tests/test_method_maths.py", "tests/test_quality.py")),
    Mutant("condition-id-tile", "pipeline/stages/sample.py",
           "condition_id=np.repeat(cond_ids[a:b], k)",
           "condition_id=np.tile(cond_ids[a:b], k)",
           ("tests/test_stages.py",)),
    Mutant("chunk-written-in-place", "pipeline/atomic.py",
           "    return atomic_write(path, write)\n", "    write(str(path))\n",
           ("tests/test_stages.py",)),
    Mutant("validation-left-in-pool", "pipeline/data/splits.py",
           "    mask[val] = False\n", "",
           ("tests/test_splits.py", "tests/test_ssl.py")),
    Mutant("extra-rows-no-rescale", "pipeline/ssl/trainer.py",
           "scale = (b + len(extra)) / b", "scale = 1.0",
           ("tests/test_ssl.py", "tests/test_method_maths.py")),
    Mutant("pseudo-threshold-ignored", "pipeline/generate/pseudo_labels.py",
           "rows = np.flatnonzero((pred == c) & (conf >= threshold))",
           "rows = np.flatnonzero(pred == c)", ("tests/test_loop.py",)),
    Mutant("pseudo-key-ignores-k", "pipeline/stages/keys.py",
           'k["pseudo"] = digest({"stage": "pseudo", "per_class": lp.per_class,',
           'k["pseudo"] = digest({"stage": "pseudo", "per_class": None,',
           ("tests/test_loop.py",)),
    Mutant("round-two-cold-start", "pipeline/stages/tune.py",
           "warm = loop_round == 2 and config.loop.warm_start", "warm = False",
           ("tests/test_loop.py",)),
    Mutant("round-two-samples-pseudo-when-labeled-asked", "pipeline/stages/sample.py",
           '        take &= tok["pseudo"] == 0\n', '        pass\n', ("tests/test_loop.py",)),
    # A cycle that once crept in: the base model's module importing the pre-flight check that
    # imports it (PreflightError used to live in preflight.py).
    Mutant("models-imports-preflight", "pipeline/models.py",
           "from pipeline.paths import resolve_path\n",
           "from pipeline.paths import resolve_path\n"
           "from pipeline.preflight import preflight  # noqa: F401\n",
           ("tests/test_layers.py",)),
    Mutant("paired-ci-normal-not-t", "pipeline/evaluate/paired.py",
           "stats.t.interval(confidence, n - 1, loc=mean, scale=sem)",
           "stats.norm.interval(confidence, loc=mean, scale=sem)",
           ("tests/test_paired.py",)),
    Mutant("transfer-evaluated-against-shots", "pipeline/transfer/run.py",
           'transfer_metrics(samples, target["shots"], target["held_out"], features, config)',
           'transfer_metrics(samples, target["shots"], target["shots"], features, config)',
           ("tests/test_transfer.py",)),
    Mutant("transfer-held-out-includes-shots", "pipeline/transfer/target.py",
           "np.sort(perm[max(shots, n - max_held_out):])", "np.sort(perm[max(0, n - max_held_out):])",
           ("tests/test_transfer.py",)),
    Mutant("transfer-near-copy-median", "pipeline/transfer/config.py",
           "NEAR_COPY_PERCENTILE = 5.0", "NEAR_COPY_PERCENTILE = 50.0", ("tests/test_transfer.py",)),
    Mutant("transfer-sample-key-ignores-guidance", "pipeline/transfer/steps.py",
           '"sample": ("guidance",)}', '"sample": ()}', ("tests/test_transfer.py",)),
    Mutant("transfer-scratch-is-the-base", "pipeline/transfer/model.py",
           "unet = UNet2DModel.from_config(unet.config).to(unet.device)", "unet = unet",
           ("tests/test_transfer.py",)),
    Mutant("transfer-no-reuse-across-runs", "pipeline/transfer/run.py",
           "run_stage(Path(run_dir), config, step, step_keys(config)[step], recorded)",
           "run_stage(Path(run_dir), config, step, step_keys(config)[step], recorded, False)",
           ("tests/test_transfer.py",)),
    Mutant("transfer-cut-drops-whole-shots", "pipeline/transfer/model.py",
           "order = np.arange(len(x)).reshape(n, per).T.reshape(-1)[:config.samples]",
           "order = np.arange(len(x))[:config.samples]", ("tests/test_transfer.py",)),
    Mutant("transfer-null-token-ignored", "pipeline/transfer/model.py",
           "return 1.0 if config.unconditional else config.mask_ratio",
           "return config.mask_ratio", ("tests/test_transfer.py",)),
    Mutant("transfer-anl-counts-the-base", "pipeline/transfer/model.py",
           "return sum(p.numel() for p in model.adapter_parameters())",
           "return sum(p.numel() for p in model.parameters())", ("tests/test_transfer.py",)),
)


def _copy_checkout(dst: Path) -> None:
    """Tracked and untracked-but-not-ignored files, as they are in the working tree."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, check=True).stdout.split(b"\0")
    for rel in filter(None, (p.decode() for p in listed)):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


def run(mutant: Mutant, workdir: Path) -> tuple[bool, float, str]:
    """(caught, seconds, last line of pytest's output) with the mutant planted in workdir."""
    target = workdir / mutant.path
    original = target.read_text()
    if original.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: {mutant.old!r} occurs {original.count(mutant.old)} "
                         f"times in {mutant.path}; update the mutant to match the code")
    target.write_text(original.replace(mutant.old, mutant.new))
    env = {**os.environ, "PYTHONPATH": str(workdir), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow",
                              "-p", "no:cacheprovider", *mutant.tests],
                             cwd=workdir, env=env, capture_output=True, text=True, timeout=1800,
                             check=False)
    finally:
        target.write_text(original)
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    failed = [ln.split(" - ")[0].removeprefix("FAILED ") for ln in lines if ln.startswith("FAILED")]
    return out.returncode != 0, time.perf_counter() - t0, (failed or lines[-1:] or [""])[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="run the mutants whose name contains one of these")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTANTS if not args.names or any(n in m.name for n in args.names)]
    if not chosen:
        raise SystemExit(f"no mutant matches {args.names}; known: {[m.name for m in MUTANTS]}")
    survived = []
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        work = Path(tmp)
        _copy_checkout(work)
        print("| mutant | where | caught | by | s |\n| --- | --- | --- | --- | --- |", flush=True)
        for m in chosen:
            caught, seconds, by = run(m, work)
            print(f"| {m.name} | {m.path} | {'yes' if caught else '**no**'} | {by} "
                  f"| {seconds:.0f} |", flush=True)
            if not caught:
                survived.append(m.name)
    if survived:
        print(f"survived (add a test that fails on each): {', '.join(survived)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
