"""The arms' names and kinds, declared once and light (no torch), so the run config can
validate ``ssl.arms`` without importing the trainer. What each arm does: ``pipeline.ssl.arms``.
"""

from __future__ import annotations

# An arm at twice the budget -> the arm it doubles (the doubling rule's other half).
DOUBLED_ARMS = {"baseline-2x": "baseline", "augmented-2x": "augmented",
                "supervised-2x": "supervised", "supervised+synthetic-2x": "supervised+synthetic"}
ARMS = ("supervised", "supervised+synthetic", "baseline", "augmented", "replay", "control",
        "pool-oracle", "augmented-r2", "selftrain", *DOUBLED_ARMS)
# Arms that read extra labeled rows (augmented-r2: the round-2 shards; selftrain: the round's
# pseudo-labeled real images; replay: the labeled images again).
EXTRA_ROW_ARMS = ("supervised+synthetic", "augmented", "replay", "control", "augmented-r2",
                  "selftrain", "augmented-2x", "supervised+synthetic-2x")
SUPERVISED_ARMS = ("supervised", "supervised+synthetic")  # no unlabeled pool, no SSL loss
# Arms that read what a user's task does not have; the report marks them as instruments.
EVALUATION_ARMS = ("pool-oracle",)


def base_arm(arm: str) -> str:
    """The arm whose data and algorithm ``arm`` uses ("augmented-2x" -> "augmented")."""
    return DOUBLED_ARMS.get(arm, arm)
