"""The ``augment`` command.

    augment datasets                       datasets and whether they are available here
    augment presets                        preset files and their run-directory names
    augment init DIR [--out F] [--gpu]     write a preset for a folder of one's own images
    augment run PRESET [--set k=v ...]     run the flow in-process (ephemeral Prefect API)
    augment serve [NAME ...]               serve the deployments (prefect deployment run ...)
    augment deployments [--write]          list deployments / regenerate prefect.yaml
    augment runs [--runs-dir DIR]          run directories and their status
    augment report RUN_DIR... [--history]  (re)write reports, or a history table over runs
    augment pretrain --out DIR ...         pretrain a base model on the unlabeled pool
    augment transfer --target T [...]      few-shot generative transfer to a new image domain
    augment sweep SPEC.yaml [--dry-run]    a grid of configs x repetitions, one gain map
    augment export RUN_DIR [--arm A]       a run's trained classifier as two files
    augment predict MODEL_DIR IMAGES...    an exported classifier on image files -> CSV
"""

from __future__ import annotations

import argparse
import json
import os
import signal
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


def _cmd_datasets(args: argparse.Namespace) -> int:
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


def _cmd_presets(args: argparse.Namespace) -> int:
    from pipeline.config import available_presets, load_config
    from pipeline.runs import run_name

    for name in available_presets():
        cfg = load_config(name)
        print(f"{name:24s} -> runs/{run_name(cfg)}  ({cfg.dataset}, "
              f"{cfg.labels_per_class} labels/class, base {cfg.base_model})")
    return 0


def _cmd_init(args: argparse.Namespace) -> int:
    from pipeline.init_preset import write_preset

    out = _from_cwd(args.out or f"{Path(args.dir).resolve().name}.yaml")
    path, _ = write_preset(args.dir, out, gpu=args.gpu, force=args.force)
    print(f"wrote {path}\nnext: augment run {path} --dry-run   (counts and time per stage)")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
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

        print("\n".join(dry_run_report(config)))
        return 0
    _one_traceback()
    from flows.augment import augment

    t0 = time.perf_counter()
    report = augment(config=config)
    print(f"done in {time.perf_counter() - t0:.0f} s\nrun directory: {run_dir}\n"
          f"report: {report}")
    return 0


def _one_traceback() -> None:
    """Prefect's console lines without the run tracebacks: ``main`` prints the failure's one
    (or one line for an error it knows) when the flow call raises."""
    from flows.logs import quiet_run_tracebacks

    quiet_run_tracebacks()


def _cmd_serve(args: argparse.Namespace) -> int:
    from flows.deploy import serve

    serve(args.names or None, limit=args.limit)
    return 0


def _cmd_deployments(args: argparse.Namespace) -> int:
    from flows.deploy import DEPLOYMENTS, PREFECT_YAML, write_prefect_yaml

    if args.write:
        print(f"wrote {write_prefect_yaml()}")
        return 0
    for s in DEPLOYMENTS:
        sched = f"  cron '{s.cron}'" if s.cron else ""
        print(f"{s.full_name:32s} preset {s.preset}{sched}\n{'':32s} {s.description}")
    print(f"(prefect.yaml: {PREFECT_YAML})")
    return 0


def _cmd_runs(args: argparse.Namespace) -> int:
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


def _cmd_report(args: argparse.Namespace) -> int:
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
    for d in dirs:
        for p in build_run_report(d):
            print(p)
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
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


def _cmd_export(args: argparse.Namespace) -> int:
    from pipeline.config import CONFIG_FILE, load_config
    from pipeline.ssl.export import ExportError
    from pipeline.stages.classifier import export_run_classifier

    run_dir = Path(args.run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ExportError(f"{run_dir} is not a run directory (no {CONFIG_FILE}); pass one "
                          "under runs/ (see `augment runs`)")
    config = load_config(run_dir)
    out = Path(args.out) if args.out else None
    info = export_run_classifier(run_dir, config, arm=args.arm, seed=args.seed, out=out)
    where = out or run_dir / info["path"]

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f}%"

    print(f"{'kept' if info['skipped'] else 'exported'} {info['arm']} seed {info['seed']} "
          f"({info['chosen_by']}; validation error {pct(info['val_error'])}, test error "
          f"{pct(info['top1_error'])}) -> {where}")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.ssl.predictions import predict_files, write_predictions

    table = predict_files(args.model_dir, args.images, device=args.device)
    out = write_predictions(table, args.out)
    counts = table["predicted"].value_counts()
    print(f"{len(table)} images -> {out}  ("
          + ", ".join(f"{name}: {n}" for name, n in counts.items()) + ")")
    return 0


def _pretrain_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="fashion-mnist", help="registered dataset name")
    p.add_argument("--root", default=None, help="dataset root (when not the default location)")
    p.add_argument("--labels-per-class", type=int, default=4,
                   help="split whose labeled images are held out of the pool")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--half", choices=["base"], default=None,
                   help="train on the base half of the training set instead (cut once by "
                        "--half-seed, class-stratified); presets with `task_images: task-half` "
                        "and the same half_seed then never show it a task image")
    p.add_argument("--half-seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output directory (diffusers DDPMPipeline layout)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="PretrainConfig field, e.g. --set steps=4000 --set block_out_channels=[32,64,64]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")


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


def _cmd_pretrain(args: argparse.Namespace) -> int:
    import shlex

    # The words given to main() (not sys.argv: main may be called with its own list), quoted:
    # the model card re-parses this command to name the training data.
    words = getattr(args, "argv", sys.argv[1:])
    out = _pretrain_from_args(args, command="augment pretrain " + shlex.join(words[1:]))
    print(f"base model written to {out}")
    return 0


def _cmd_transfer(args: argparse.Namespace) -> int:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="augment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("datasets", help="list datasets").set_defaults(fn=_cmd_datasets)
    sub.add_parser("presets", help="list presets").set_defaults(fn=_cmd_presets)

    i = sub.add_parser("init", help="write a preset for a folder of your own images, sized "
                       "to finish in 15 min on this CPU (or for a GPU)")
    i.add_argument("dir", metavar="DIR", help="one sub-folder per class (and unlabeled/)")
    i.add_argument("--out", default=None, help="preset file (default ./<DIR name>.yaml)")
    i.add_argument("--gpu", action="store_true", help="GPU-sized defaults instead")
    i.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    i.set_defaults(fn=_cmd_init)

    r = sub.add_parser("run", help="run the augment flow in-process")
    r.add_argument("preset", help="preset name (data/presets/NAME.yaml), a YAML file, or a run's "
                   "config.json (or its run directory): reruns that run")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter, e.g. --set sampling.mask_ratios=[0.2,0.5]")
    r.add_argument("--runs-dir", default=None,
                   help="where run directories go, relative to the working directory (default: "
                        "the preset's runs_dir, runs/ in the repository)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--dry-run", action="store_true", help="validate, pre-flight, and print the "
                   "data's counts and each stage's time estimated from rates timed here")
    r.set_defaults(fn=_cmd_run)

    s = sub.add_parser("serve", help="serve the deployments until interrupted")
    s.add_argument("names", nargs="*", help="deployments to serve (default: all)")
    s.add_argument("--limit", type=int, default=None, help="max concurrent flow runs")
    s.set_defaults(fn=_cmd_serve)

    d = sub.add_parser("deployments", help="list deployments or regenerate prefect.yaml")
    d.add_argument("--write", action="store_true", help="rewrite prefect.yaml from the presets")
    d.set_defaults(fn=_cmd_deployments)

    ru = sub.add_parser("runs", help="list run directories with their status")
    ru.add_argument("--runs-dir", default=None,
                    help="relative to the working directory (default runs/ in the repository)")
    ru.set_defaults(fn=_cmd_runs)

    rep = sub.add_parser("report", help="write run reports, or a history table over runs")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--history", action="store_true",
                     help="append the runs to the benchmark history table and render it")
    rep.add_argument("--ablation", action="store_true",
                     help="one comparison page over the runs (what varied between them)")
    rep.add_argument("--out", default=None,
                     help="history table (default runs/benchmark-history.parquet in the "
                          "repository) or ablation directory (default ./runs/ablation)")
    rep.set_defaults(fn=_cmd_report)

    sw = sub.add_parser("sweep", help="run a grid of configs over independent repetitions and "
                        "write one report with a gain heatmap")
    sw.add_argument("spec", help="sweep spec (YAML: name, preset, set, grid, rules, "
                    "repetitions, pairs; see pipeline/sweep/spec.py)")
    sw.add_argument("--runs-dir", default=None,
                    help="relative to the working directory (default runs/ in the "
                         "repository); the sweep lives in RUNS_DIR/sweeps/<name>")
    sw.add_argument("--dry-run", action="store_true",
                    help="validate every cell and run the pre-flight checks only")
    sw.add_argument("--only", action="append", default=[], metavar="KEY=VALUE",
                    help="run only the cells with this grid value (repeatable), e.g. --only "
                         "ssl.unlabeled_pool=0; the report still covers the whole grid")
    sw.add_argument("--report-only", action="store_true",
                    help="rewrite the report from the finished repetitions, run nothing")
    sw.set_defaults(fn=_cmd_sweep)

    pre = sub.add_parser("pretrain", help="pretrain a base U-Net on the unlabeled pool (or on "
                         "the base half of the training set: --half base)")
    _pretrain_arguments(pre)
    pre.set_defaults(fn=_cmd_pretrain)

    tr = sub.add_parser("transfer", help="adapt the base model to a new image domain from a "
                        "few images (ANL only, or full fine-tuning, or from scratch)")
    tr.add_argument("--base-model", default=None,
                    help="diffusers UNet2DModel folder (default data/models/fashion-mnist-ddpm-32)")
    tr.add_argument("--target", default=None,
                    help="a folder of PNGs, mnist-foolbox (default), sklearn-digits, or a "
                         "registered dataset name (with --class)")
    tr.add_argument("--class", dest="target_class", default=None,
                    help="the target's class (name or index); default: all its images")
    tr.add_argument("--shots", type=int, default=None, help="training images (default 10)")
    tr.add_argument("--mode", default=None, help="anl (default), full or scratch")
    tr.add_argument("--steps", type=int, default=None, help="training steps (default 300)")
    tr.add_argument("--samples", type=int, default=None, help="images to draw (default 100)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any pipeline.transfer.TransferConfig field, e.g. --set guidance=3 "
                         "(applied after the flags)")
    tr.add_argument("--runs-dir", default=None,
                    help="relative to the working directory (default runs/transfer in the "
                         "repository)")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.set_defaults(fn=_cmd_transfer)

    ex = sub.add_parser("export", help="write a finished run's classifier (EMA weights with "
                        "their BN statistics) as model.safetensors + classifier_config.json")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a run directory whose ssl stage ran")
    ex.add_argument("--arm", default=None,
                    help="arm to export, or 'best' = lowest validation error (default: the "
                         "run's export.arm, best)")
    ex.add_argument("--seed", type=int, default=None,
                    help="which seed's classifier (default: the run's first seed)")
    ex.add_argument("--out", default=None, help="output folder (default RUN_DIR/classifier)")
    ex.set_defaults(fn=_cmd_export)

    pr = sub.add_parser("predict", help="classify image files with an exported classifier")
    pr.add_argument("model_dir", metavar="MODEL_DIR",
                    help="an exported classifier (RUN_DIR/classifier or `augment export --out`)")
    pr.add_argument("images", nargs="+", metavar="IMAGES",
                    help="image files or folders of them (searched recursively); converted "
                         "to the model's channels and resized to its size")
    pr.add_argument("--out", default="predictions.csv",
                    help="predictions.csv (default) or a .parquet file: one row per image "
                         "with path, predicted, confidence and p_<class> columns")
    pr.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    pr.set_defaults(fn=_cmd_predict)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The in-process API server starts in a subprocess; on a busy 2-core machine it can need
    # more than Prefect's default 20 s.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # SIGTERM -> SystemExit, so Prefect's context managers run and stop the temporary API
    # server they started (a plain SIGTERM would leave it running).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    from pipeline.config import ConfigError
    from pipeline.data.image_files import ImageFileError
    from pipeline.generate.pretrain import PretrainError
    from pipeline.preflight import PreflightError
    from pipeline.runs import StageError
    from pipeline.ssl.export import ExportError
    from pipeline.sweep.spec import SweepError
    from pipeline.transfer import TransferError

    try:
        return args.fn(args) or 0
    except (ConfigError, PreflightError, PretrainError, SweepError, TransferError,
            ExportError, ImageFileError, StageError) as e:
        print(f"augment: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - any other failure: its one traceback, exit 1
        from flows.logs import print_failure

        print_failure(e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
