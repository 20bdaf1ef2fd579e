"""The transfer run's self-contained HTML and Markdown report.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.transfer.config import NEAR_COPY_PERCENTILE


def metric_rows(m: dict[str, Any]) -> list[dict[str, str]]:
    """The report's metrics table: what, value, how to read it."""

    def f(x, spec=".3f", scale=1.0):
        return "—" if x is None else format(scale * x, spec)

    return [
        {"metric": "KID × 100 to held-out target", "value":
            f"{f(m['kid'], '.2f', 100)} ± {f(m['kid_std'], '.2f', 100)}",
         "note": f"{m['n_samples']} samples vs {m['n_held_out']} held-out images, "
                 f"{m['feature_space']} features; ± std over subsets; lower is closer"},
        {"metric": "diversity over real", "value": f(m["diversity_over_real"]),
         "note": f"mean pairwise feature distance, samples {f(m['diversity_samples'])} / "
                 f"held-out real {f(m['diversity_real'])}; 1 = as varied as real images"},
        {"metric": "near-copy share", "value": f(m["near_copy_share"], ".1%"),
         "note": f"samples nearer a shot (pixel RMSE) than {f(m['near_copy_threshold'])}, the "
                 f"{NEAR_COPY_PERCENTILE:g}th percentile of held-out real images' distance"},
        {"metric": "trained parameters", "value": f"{m['trained_params']:,}",
         "note": "updated by the optimiser (anl: the adapter; full: every U-Net weight)"},
        {"metric": "training steps/s", "value": f(m["steps_per_s"], ".2f"),
         "note": f"{m['steps']} steps"},
        {"metric": "sampling images/s", "value": f(m["images_per_s"], ".2f"), "note": ""},
        {"metric": "wall time", "value": f"{sum(m['wall_s'].values()):.1f} s",
         "note": ", ".join(f"{k} {v:.1f} s" for k, v in m["wall_s"].items())},
    ]


def transfer_grid(shots: np.ndarray, samples: np.ndarray, title: str, cols: int = 10) -> bytes:
    """PNG: the shots in the first row, samples below (one per shot first, for anl)."""
    from pipeline.data.grids import class_grid_png

    rows = {i: samples[i * cols:(i + 1) * cols] for i in range(3) if len(samples) > i * cols}
    return class_grid_png(shots, rows, title, cols=cols, real_label="shots",
                          row_label="samples")


def report_markdown(ctx: dict[str, Any]) -> str:
    from pipeline.report.render import md_table

    return (f"# {ctx['title']}\n\nRun `{ctx['run']}`, mode **{ctx['mode']}**, "
            f"{ctx['shots']} shots.\n\n![shots and samples](grid.png)\n\n## Metrics\n\n"
            + md_table(ctx["metrics"], ["metric", "value", "note"])
            + "\n## Steps\n\n" + md_table(ctx["steps"], ["step", "key", "wall_s", "status"])
            + "\n## Configuration\n\n" + md_table(ctx["config"], ["parameter", "value"]))

