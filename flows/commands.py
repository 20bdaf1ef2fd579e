"""What each ``augment`` sub-command does (``flows.cli`` parses the line and calls one).

Each ``cmd_*`` takes the parsed arguments and returns an exit code; the work is in
``pipeline`` and the flows, so a command is the few lines that bind them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _from_cwd(path: str | None) -> str | None:
    """A path typed on the command line, made absolute against the working directory.

    Paths inside preset files stay relative to the repository (pipeline.paths.resolve_path);
    one typed here means what the shell it was typed in means by it.
    """
    return os.path.abspath(os.path.expanduser(path)) if path else path


def _paths_from_cwd(overrides: list[str], keys: tuple[str, ...] = ("runs_dir",)) -> list[str]:
    """``--set runs_dir=rel`` as ``runs_dir=<cwd>/rel``; other overrides as given."""
    import yaml

    out = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        value = yaml.safe_load(raw) if sep and key.strip() in keys and raw.strip() else None
        # JSON is YAML: the absolute path goes back quoted, whatever characters it holds.
        out.append(f"{key.strip()}={json.dumps(_from_cwd(value))}" if isinstance(value, str)
                   else item)
    return out


def cmd_datasets(args: argparse.Namespace) -> int:
    from pipeline.data.datasets import DESCRIPTIONS, DatasetError, available_datasets, load_dataset

    for name in available_datasets():
        status = "needs root=DIR"
        if name != "image-folder":
            try:
                ds = load_dataset(name)
                status = (f"available: {len(ds.train_labels)} train / {len(ds.test_labels)} test, "
                          f"{ds.image_shape}")
            except DatasetError as e:
                status = f"not available: {str(e).splitlines()[0][:100]}"
        print(f"{name:14s} {DESCRIPTIONS.get(name, '')}\n{'':14s} {status}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from pipeline.config import available_presets, load_config
    from pipeline.runs import run_name

    for name in available_presets():
        cfg = load_config(name)
        print(f"{name:24s} -> runs/{run_name(cfg)}  ({cfg.dataset}, "
              f"{cfg.labels_per_class} labels/class, base {cfg.base_model})")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from pipeline.init_preset import write_preset

    out = _from_cwd(args.out or f"{Path(args.dir).resolve().name}.yaml")
    path, _ = write_preset(args.dir, out, gpu=args.gpu, force=args.force)
    print(f"wrote {path}\nnext: augment run {path} --dry-run   (counts and time per stage)")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.config import load_config
    from pipeline.preflight import preflight
    from pipeline.runs import run_dir_for

    overrides = _paths_from_cwd(list(args.set))
    if args.runs_dir:
        overrides.append(f"runs_dir={json.dumps(_from_cwd(args.runs_dir))}")
    if args.no_progress:
        overrides.append("progress=false")
    config = load_config(args.preset, overrides)
    run_dir = run_dir_for(config)
    print(f"preset {config.preset}: run directory {run_dir}", flush=True)
    info = preflight(config)  # fail in seconds, before Prefect starts
    print(f"pre-flight ok: {info['dataset']} {info['image_shape']}, device {info['device']}, "
          f"base {info['base_model'] or 'pretrained in this run'}, encoder {info['encoder']}",
          flush=True)
    if args.dry_run:
        from pipeline.estimate import dry_run_report

        if args.redo:
            _redo(run_dir, args.redo, dry_run=True)  # lists what would move; moves nothing
        print("\n".join(dry_run_report(config)))
        return 0
    from pipeline.run_lock import run_lock

    # Before Prefect starts (seconds, not the temporary server's minute): a second run of
    # this config exits 2 here naming the first, or queues behind it (--wait). --redo moves
    # files only under the lock, never from under a run that is writing them.
    with run_lock(run_dir, wait=args.wait):
        if args.redo:
            _redo(run_dir, args.redo, dry_run=False)
        _one_traceback()
        from flows.augment import augment

        t0 = time.perf_counter()
        report = augment(config=config)
    print(f"done in {time.perf_counter() - t0:.0f} s\nrun directory: {run_dir}\n"
          f"report: {report}")
    return 0


def _redo(run_dir: Path, stages: list[str], dry_run: bool) -> None:
    """Move the stages' outputs (and their downstream stages') aside, saying where."""
    from pipeline.stages.redo import redo

    trash, todo, moved = redo(run_dir, stages, dry_run=dry_run)
    verb = "would move" if dry_run else "moved"
    print(f"redo {', '.join(todo)}: {verb} {len(moved)} outputs"
          + (f" to {trash}" if moved else " (none were there)"), flush=True)
    for path in moved:
        print(f"  {path.relative_to(run_dir)}")


def _one_traceback() -> None:
    """Called just before a flow starts. Prefect's console lines without the run tracebacks:
    ``main`` prints the failure's one (or one line for an error it knows) when the flow call
    raises. And the temporary API server Prefect is about to start dies with this process,
    even by SIGKILL (flows.server_guard); here, not in ``main``: importing Prefect's server
    costs seconds that `augment runs` should not pay."""
    from flows.logs import quiet_run_tracebacks
    from flows.server_guard import install

    quiet_run_tracebacks()
    install()


def cmd_serve(args: argparse.Namespace) -> int:
    from flows.deploy import serve

    serve(args.names or None, limit=args.limit)
    return 0


def cmd_deployments(args: argparse.Namespace) -> int:
    from flows.deploy import DEPLOYMENTS, PREFECT_YAML, write_prefect_yaml

    if args.write:
        print(f"wrote {write_prefect_yaml()}")
        return 0
    for s in DEPLOYMENTS:
        sched = f"  cron '{s.cron}'" if s.cron else ""
        print(f"{s.full_name:32s} preset {s.preset}{sched}\n{'':32s} {s.description}")
    print(f"(prefect.yaml: {PREFECT_YAML})")
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from pipeline.paths import resolve_path
    from pipeline.runs import list_runs

    root = resolve_path(_from_cwd(args.runs_dir) or "runs")
    runs = list_runs(root)
    if not runs:
        print(f"no runs under {root}")
        return 0
    print(f"{'run':40s} {'status':11s} {'stages done':48s} {'compute':>8s}  modified")
    for r in runs:
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.modified))
        print(f"{r.path.name:40s} {r.status:11s} {','.join(r.stages_done):48s} "
              f"{r.wall_s:7.0f}s  {stamp}")
        if r.error:
            print(f"{'':40s} error: {r.error[:200]}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report.ablation import build_ablation_report
    from pipeline.report.build import build_run_report
    from pipeline.report.history import append_history, render_history

    dirs = [Path(d) for d in args.run_dirs]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:  # before any work: no half-appended history, no traceback for a typo
        print(f"augment: error: no run directory {', '.join(missing)}; pass directories "
              "under runs/ (see `augment runs`)", file=sys.stderr)
        return 2
    if args.history:
        from pipeline.paths import resolve_path

        table = resolve_path(_from_cwd(args.out) or "runs/benchmark-history.parquet")
        for d in dirs:
            row = append_history(table, d)
            print(f"history row {row['run_id']} -> {table}")
        print(f"history page: {render_history(table, table.parent)}")
        return 0
    if args.ablation:
        out = Path(args.out or "runs/ablation")
        print(f"ablation: {build_ablation_report(dirs, out)}")
        return 0
    from pipeline.run_lock import run_lock

    rc = 0
    for d in dirs:
        with run_lock(d):  # not while a run writes into it (or another report does)
            for p in build_run_report(d):
                print(p)
        corrupt = _corrupt_files(d)
        if corrupt:  # the report is written, and says so; the exit code says it too
            rc = 2
            print(f"augment: error: {d}: " + "; ".join(corrupt) + f"; redo with `augment run "
                  f"{d} --redo STAGE` (ssl for a metrics file, shards for a shard set)",
                  file=sys.stderr)
    return rc


def _corrupt_files(run_dir: Path) -> list[str]:
    from pipeline.report.data import load_run

    return list(dict.fromkeys(load_run(run_dir).corrupt.values()))


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.config import parse_overrides
    from pipeline.paths import resolve_path
    from pipeline.preflight import preflight
    from pipeline.sweep.run import sweep_dir
    from pipeline.sweep.spec import check_spec, load_spec

    spec = whole = load_spec(args.spec)
    if args.only:
        spec = spec.only(parse_overrides(args.only))
    runs_root = resolve_path(_from_cwd(args.runs_dir) or "runs")
    folder = sweep_dir(spec, runs_root)
    extra = {"runs_dir": str(folder / "runs"), "progress": False}
    if args.report_only:  # from the records alone: no pre-flight, no Prefect
        from pipeline.sweep.report import build_sweep_report

        print(f"report: {build_sweep_report(whole, folder)['html']}")
        return 0
    configs = check_spec(spec)  # every cell's config valid, before any work
    seen = set()
    for cell, config in zip(spec.cells(), configs, strict=True):
        key = (config.dataset, config.dataset_root, config.base_model, config.encoder,
               config.task_images, config.half_seed)
        if key not in seen:  # inputs, not sizes: once per distinct set of them
            seen.add(key)
            preflight(config)
        print(f"cell {cell.label}: arms {', '.join(config.ssl.arms)}")
    n = len(configs) * len(spec.repetitions)
    print(f"sweep {spec.name}: {len(configs)} cells x {len(spec.repetitions)} repetitions = "
          f"{n} runs in {folder}", flush=True)
    if args.dry_run:
        return 0
    _one_traceback()
    from flows.sweep import sweep, task_runner

    sweep.with_options(task_runner=task_runner(spec))(spec, str(folder), extra, whole)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline.config import CONFIG_FILE, load_config
    from pipeline.ssl.export import ExportError
    from pipeline.stages.classifier import export_run_classifier

    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ExportError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); pass one "
                          "under runs/ (see `augment runs`)")
    config = load_config(run_dir)
    out = Path(args.out) if args.out else None
    from pipeline.run_lock import run_lock

    with run_lock(run_dir):  # it writes RUN_DIR/classifier and reads the arms' checkpoints
        info = export_run_classifier(run_dir, config, arm=args.arm, seed=args.seed, out=out)
    where = out or run_dir / info["path"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    print(f"{'kept' if info['skipped'] else 'exported'} {info['arm']} seed {info['seed']} "
          f"({info['chosen_by']}; validation error {pct(info['val_error'])}, test error "
          f"{pct(info['top1_error'])}) -> {where}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.ssl.predictions import predict_files, write_predictions

    table = predict_files(args.model_dir, args.images, device=args.device)
    out = write_predictions(table, args.out)
    counts = table["predicted"].value_counts()
    print(f"{len(table)} images -> {out}  ("
          + ", ".join(f"{name}: {n}" for name, n in counts.items()) + ")")
    return 0



def _pretrain_from_args(args: argparse.Namespace, command: str) -> Path:
    from pydantic import ValidationError

    from pipeline.config import ConfigError, parse_overrides
    from pipeline.generate.pretrain import PretrainConfig, pretrain_on_dataset
    from pipeline.validation import explain

    # The same KEY=VALUE parser (values are YAML) and messages as the main command's --set.
    try:
        config = PretrainConfig(**parse_overrides(args.set))
    except ValidationError as e:
        raise ConfigError(explain(e, "pretrain configuration",
                                  PretrainConfig.model_fields)) from None
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pool = ({"half": args.half, "half_seed": args.half_seed} if args.half else
            {"labels_per_class": args.labels_per_class, "split_seed": args.split_seed})
    return pretrain_on_dataset(args.dataset, args.out, pool, config, root=args.root,
                               progress=not args.no_progress, command=command)


def cmd_pretrain(args: argparse.Namespace) -> int:
    import shlex

    # The words given to main() (not sys.argv: main may be called with its own list), quoted:
    # the model card re-parses this command to name the training data.
    words = getattr(args, "argv", sys.argv[1:])
    out = _pretrain_from_args(args, command="augment pretrain " + shlex.join(words[1:]))
    print(f"base model written to {out}")
    return 0


def cmd_transfer(args: argparse.Namespace) -> int:
    from pipeline.transfer import check_transfer, transfer_config

    def path_or_name(value: str | None) -> str | None:
        # A folder relative to the working directory is meant as one; anything else (a hub id,
        # a built-in target, a path relative to the repository) is passed on as given.
        return str(Path(value).resolve()) if value and Path(value).exists() else value

    flags = {"base_model": path_or_name(args.base_model), "target": path_or_name(args.target),
             "target_class": args.target_class, "shots": args.shots, "mode": args.mode,
             "steps": args.steps, "samples": args.samples, "runs_dir": _from_cwd(args.runs_dir),
             "progress": False if args.no_progress else None}
    config = transfer_config({k: v for k, v in flags.items() if v is not None},
                             _paths_from_cwd(args.set))
    info = check_transfer(config)  # fail in seconds, before Prefect starts
    print(f"transfer {config.mode}: {info['target']} ({info['shots']} shots, "
          f"{info['held_out']} held out) from {info['base_model']}, device {info['device']}\n"
          f"run directory {info['run_dir']}", flush=True)
    _one_traceback()
    from flows.transfer import transfer

    t0 = time.perf_counter()
    report = transfer(config=config)
    print(f"done in {time.perf_counter() - t0:.0f} s\nreport: {report}")
    return 0
