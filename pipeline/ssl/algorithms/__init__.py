"""SSL algorithms by name; add one by subclassing SSLAlgorithm and registering it here."""

from .base import Batch, SSLAlgorithm, StepOutput, Supervised
from .fixmatch import FixMatch

ALGORITHMS: dict[str, type[SSLAlgorithm]] = {
    Supervised.name: Supervised,
    FixMatch.name: FixMatch,
}


def get_algorithm(name: str) -> type[SSLAlgorithm]:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown SSL algorithm {name!r}; choose one of {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


__all__ = ["ALGORITHMS", "Batch", "FixMatch", "SSLAlgorithm", "StepOutput", "Supervised",
           "get_algorithm"]
