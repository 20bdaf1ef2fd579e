"""Does the base model know the user's images? Measured before any tuning, in seconds.

The adapters only steer a frozen base: when its unconditional samples do not look like the
pool, no adapter makes them, and the synthetic rows hurt (an out-of-domain base was measured
raising the error by 7 points). Two figures in the condition encoder's feature space:

- **KID** (base samples vs pool) beside the pool's own floor (one half of the pool vs the
  other, same sizes): how far the base's distribution is from the pool, in the units of the
  noise a fitting model could not beat;
- **coverage** (Kynkäänniemi et al. 2019, "precision"): the fraction of base samples inside
  the pool's k-nearest-neighbour manifold. It lies in [0, 1] whatever the feature space, so
  one threshold serves every encoder: a base of another domain puts almost no sample there.

The verdict reads coverage as a share of the pool's own (scale-free); KID is carried for
the report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.evaluate.quality import kid


@dataclass(frozen=True)
class DomainFit:
    kid_base_pool: float
    kid_pool_pool: float      # the floor: pool half vs pool half
    kid_pool_pool_std: float
    coverage: float           # share of base samples inside the pool's k-NN manifold
    pool_coverage: float      # share of pool images (other half) inside it: the same-domain value
    samples: int
    pool: int
    k: int

    @property
    def relative_coverage(self) -> float:
        """Coverage as a share of the same-domain value: about 0.7-0.85 for a fitting base."""
        return self.coverage / self.pool_coverage if self.pool_coverage > 0 else 0.0

    def fits(self, min_relative_coverage: float) -> bool:
        return self.relative_coverage >= min_relative_coverage

    def as_record(self, min_relative_coverage: float) -> dict:
        return {"kid_base_pool": self.kid_base_pool, "kid_pool_pool": self.kid_pool_pool,
                "kid_pool_pool_std": self.kid_pool_pool_std, "coverage": self.coverage,
                "pool_coverage": self.pool_coverage,
                "relative_coverage": self.relative_coverage, "samples": self.samples,
                "pool": self.pool, "k": self.k,
                "min_relative_coverage": min_relative_coverage,
                "fits": self.fits(min_relative_coverage)}


def manifold_coverage(reference: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Share of ``queries`` within the k-NN radius of some ``reference`` row (the k-NN
    manifold of Kynkäänniemi et al.), by scikit-learn's exact neighbour search."""
    from sklearn.neighbors import NearestNeighbors

    if len(reference) <= k or not len(queries):
        return float("nan")
    nn = NearestNeighbors(n_neighbors=k + 1).fit(reference)
    radius = nn.kneighbors(reference)[0][:, -1]  # column 0 is the row itself
    dist, idx = nn.kneighbors(queries, n_neighbors=min(len(reference), 4 * k))
    return float(np.mean((dist <= radius[idx]).any(axis=1)))


def domain_fit(sample_feats: np.ndarray, pool_feats: np.ndarray, k: int = 3,
               seed: int = 0) -> DomainFit:
    """Base samples vs pool, both (N, D) features. The pool is cut in two seeded halves: one
    is the reference manifold and KID's target, the other gives the same-domain floor."""
    sample_feats = np.asarray(sample_feats, np.float64)
    pool_feats = np.asarray(pool_feats, np.float64)
    if len(pool_feats) < 2 * (k + 2) or len(sample_feats) < 2:
        raise ValueError(f"domain_fit needs >= {2 * (k + 2)} pool images and 2 samples, got "
                         f"{len(pool_feats)} and {len(sample_feats)}")
    order = np.random.default_rng(seed).permutation(len(pool_feats))
    half = len(order) // 2
    ref, other = pool_feats[order[:half]], pool_feats[order[half:2 * half]]
    n = min(len(sample_feats), len(other))
    k_base, _ = kid(sample_feats[:n], ref, n_subsets=10, subset_size=n, seed=seed)
    k_pool, k_pool_std = kid(other[:n], ref, n_subsets=10, subset_size=n, seed=seed)
    return DomainFit(k_base, k_pool, k_pool_std,
                     manifold_coverage(ref, sample_feats, k),
                     manifold_coverage(ref, other[:n], k), len(sample_feats), len(pool_feats), k)


def misfit_message(metrics: dict) -> str:
    """One line (a log line, a report sentence): what was measured and the fix."""
    return (f"the base model does not fit this data: {metrics['coverage']:.0%} of its samples "
            f"lie among the pool's images (pool's own: {metrics['pool_coverage']:.0%}; KID x 100 "
            f"{100 * metrics['kid_base_pool']:.1f}, floor {100 * metrics['kid_pool_pool']:.1f})."
            " Fix: add `pretrain:` (a base trained on your pool) or set base_model to one "
            "trained on images like yours.")
