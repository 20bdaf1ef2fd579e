"""The ``augment`` command.

    augment datasets                       datasets and whether they are available here
    augment presets                        preset files and their run-directory names
    augment init DIR [--out F] [--gpu]     write a preset for a folder of one's own images
    augment run PRESET [--set k=v ...]     run the flow in-process (ephemeral Prefect API)
    augment run RUN_DIR --redo STAGE       make a stage (and what depends on it) again
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
import os
import signal
import sys

from flows import commands
from pipeline.stage_graph import STAGE_ORDER


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="augment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("datasets", help="list datasets").set_defaults(fn=commands.cmd_datasets)
    sub.add_parser("presets", help="list presets").set_defaults(fn=commands.cmd_presets)

    i = sub.add_parser("init", help="write a preset for a folder of your own images, sized "
                       "to finish in 15 min on this CPU (or for a GPU)")
    i.add_argument("dir", metavar="DIR", help="one sub-folder per class (and unlabeled/)")
    i.add_argument("--out", default=None, help="preset file (default ./<DIR name>.yaml)")
    i.add_argument("--gpu", action="store_true", help="GPU-sized defaults instead")
    i.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    i.set_defaults(fn=commands.cmd_init)

    r = sub.add_parser("run", help="run the augment flow in-process")
    r.add_argument("preset", help="preset name (data/presets/NAME.yaml), a YAML file, or a run's "
                   "config.json (or its run directory): reruns that run")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a parameter, e.g. --set sampling.mask_ratios=[0.2,0.5]")
    r.add_argument("--runs-dir", default=None,
                   help="where run directories go, relative to the working directory (default: "
                        "the preset's runs_dir, runs/ in the repository)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument("--wait", action="store_true", help="when another process is running this "
                   "config (its run directory is locked), wait for it instead of exiting 2")
    r.add_argument("--dry-run", action="store_true", help="validate, pre-flight, and print the "
                   "data's counts and each stage's time estimated from rates timed here")
    r.add_argument("--redo", action="append", default=[], metavar="STAGE", choices=STAGE_ORDER,
                   help="make this stage's outputs again, and those of every stage that "
                        "depends on it: the old ones are moved to RUN_DIR/.trash/, not "
                        f"deleted (repeatable; one of {', '.join(STAGE_ORDER)})")
    r.set_defaults(fn=commands.cmd_run)

    s = sub.add_parser("serve", help="serve the deployments until interrupted")
    s.add_argument("names", nargs="*", help="deployments to serve (default: all)")
    s.add_argument("--limit", type=int, default=None, help="max concurrent flow runs")
    s.set_defaults(fn=commands.cmd_serve)

    d = sub.add_parser("deployments", help="list deployments or regenerate prefect.yaml")
    d.add_argument("--write", action="store_true", help="rewrite prefect.yaml from the presets")
    d.set_defaults(fn=commands.cmd_deployments)

    ru = sub.add_parser("runs", help="list run directories with their status")
    ru.add_argument("--runs-dir", default=None,
                    help="relative to the working directory (default runs/ in the repository)")
    ru.set_defaults(fn=commands.cmd_runs)

    rep = sub.add_parser("report", help="write run reports, or a history table over runs")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--history", action="store_true",
                     help="append the runs to the benchmark history table and render it")
    rep.add_argument("--ablation", action="store_true",
                     help="one comparison page over the runs (what varied between them)")
    rep.add_argument("--out", default=None,
                     help="history table (default runs/benchmark-history.parquet in the "
                          "repository) or ablation directory (default ./runs/ablation)")
    rep.set_defaults(fn=commands.cmd_report)

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
    sw.set_defaults(fn=commands.cmd_sweep)

    pre = sub.add_parser("pretrain", help="pretrain a base U-Net on the unlabeled pool (or on "
                         "the base half of the training set: --half base)")
    _pretrain_arguments(pre)
    pre.set_defaults(fn=commands.cmd_pretrain)

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
    tr.set_defaults(fn=commands.cmd_transfer)

    ex = sub.add_parser("export", help="write a finished run's classifier (EMA weights with "
                        "their BN statistics) as model.safetensors + classifier_config.json")
    ex.add_argument("run_dir", metavar="RUN_DIR", help="a run directory whose ssl stage ran")
    ex.add_argument("--arm", default=None,
                    help="arm to export, or 'best' = lowest validation error (default: the "
                         "run's export.arm, best)")
    ex.add_argument("--seed", type=int, default=None,
                    help="which seed's classifier (default: the run's first seed)")
    ex.add_argument("--out", default=None, help="output folder (default RUN_DIR/classifier)")
    ex.set_defaults(fn=commands.cmd_export)

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
    pr.set_defaults(fn=commands.cmd_predict)
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
    from pipeline.data.shard_format import ShardError
    from pipeline.generate.pretrain import PretrainError
    from pipeline.preflight import PreflightError
    from pipeline.run_lock import RunLockedError
    from pipeline.runs import StageError
    from pipeline.ssl.export import ExportError
    from pipeline.sweep.spec import SweepError
    from pipeline.transfer import TransferError

    try:
        return args.fn(args) or 0
    except (ConfigError, PreflightError, PretrainError, SweepError, TransferError,
            ExportError, ImageFileError, StageError, ShardError, RunLockedError) as e:
        print(f"augment: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - any other failure: its one traceback, exit 1
        from flows.logs import print_failure

        print_failure(e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
