"""Presets frozen for the tests (tests/pinned/): key pins and whole-set configs that must not
move when a shipped preset does."""

from pathlib import Path

# The demo preset up to b0fb373: 4 labels per class, the whole-set base, FixMatch arms.
FROZEN_DEMO = str(Path(__file__).parent / "pinned" / "demo.yaml")
