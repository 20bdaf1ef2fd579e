"""How close the samples come to the held-out target images: KID, diversity, near-copies.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.transfer.config import NEAR_COPY_PERCENTILE, TransferConfig


def near_copy_share(samples: np.ndarray, shots: np.ndarray, held_out: np.ndarray,
                    percentile: float = NEAR_COPY_PERCENTILE) -> tuple[float, float]:
    """(share of samples nearer a shot than the threshold, the threshold).

    The threshold is the ``percentile``-th percentile of the held-out real images' pixel RMSE
    to their nearest shot: only that share of real images of the domain lie so close to a
    shot, so a sample that close is more likely a copy of it than a new image.
    """
    from pipeline.data.images import nearest_rmse

    threshold = float(np.percentile(nearest_rmse(held_out, shots), percentile))
    return float((nearest_rmse(samples, shots) < threshold).mean()), threshold


def transfer_metrics(samples: np.ndarray, shots: np.ndarray, held_out: np.ndarray,
                     features: Callable[[np.ndarray], np.ndarray],
                     config: TransferConfig) -> dict[str, float]:
    """Fidelity, diversity and copying of the samples, all against held-out target images."""
    from pipeline.data.images import nearest_rmse
    from pipeline.evaluate.quality import kid, mean_pairwise_distance

    f_samples, f_real = features(samples), features(held_out)
    k, k_std = kid(f_samples, f_real, config.kid_subsets, config.kid_subset_size, config.seed)
    div_s = mean_pairwise_distance(f_samples, seed=config.seed)
    div_r = mean_pairwise_distance(f_real, seed=config.seed)
    share, threshold = near_copy_share(samples, shots, held_out)
    return {"n_samples": len(samples), "n_held_out": len(held_out), "n_shots": len(shots),
            "kid": k, "kid_std": k_std, "diversity_samples": div_s, "diversity_real": div_r,
            "diversity_over_real": div_s / div_r if div_r else float("nan"),
            "near_copy_share": share, "near_copy_threshold": threshold,
            "nn_shot_rmse_samples": float(nearest_rmse(samples, shots).mean()),
            "nn_shot_rmse_real": float(nearest_rmse(held_out, shots).mean())}
