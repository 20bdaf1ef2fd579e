"""The run's Markdown summary (template run.md.j2) and the number formats it shares with the
model card: every section in its place, one paragraph per line, tables from md_table."""

from __future__ import annotations

import re

from report_fixtures import fabricated_run, stage_record

from pipeline.report.build import markdown_summary
from pipeline.report.render import duration, md_table


def test_summary_lays_out_every_section_in_order(tmp_path):
    run_dir = fabricated_run(tmp_path, {"baseline": [0.25, 0.2], "augmented-r2": [0.2, 0.19]},
                             val_error=0.2,
                             config_extra={"loop": {"rounds": 2, "per_class": 5,
                                                    "threshold": 0.9}})
    stage_record(run_dir, "loop", 3.0, {"grids": []},
                 {"pseudo": {"per_class": [3, 4], "precision_per_class": [0.5, None],
                             "pseudo_labeled": 7, "pool": 100, "precision": 0.71,
                             "classifier": "baseline"},
                  "class_names": ["a", "b"], "rows": 12})
    md = markdown_summary(run_dir)
    headings = re.findall(r"^#+ .*$", md, flags=re.MULTILINE)
    assert headings == ["# fab: run `fab-00000000`",
                        "## Semi-supervised results (top-1 test error)", "## Second round",
                        "## Synthetic data quality", "## Stages", "## Cost"]
    assert "\n\n| arm | error % | val error % | std % | seeds |\n|---|---|---|---|---|\n" in md
    assert "\nTest error of the EMA model (BN statistics recomputed for its weights;" in md
    assert "\nDifferences (paired by seed; negative = fewer errors; 95% CI and p only with at " \
        "least 3 paired runs):\n\n| comparison | n | mean | std | 95% CI | p | note |\n" in md
    assert "\nPer seed:\n\n| arm | seed | error | val error |\n" in md
    assert ("\nThe baseline classifier pseudo-labeled 7 of 100 unlabeled images (at most 5 per "
            "class, confidence >= 0.9); 71.00% of them are right (measured afterwards; nothing "
            "in the run reads it). Round 2 wrote 12 synthetic images.\n\n| class |") in md
    assert "| 1: b | 4 | — |" in md
    assert "## Synthetic data quality\n\nQuality: not run.\n\n## Stages\n\n| stage |" in md
    assert md.endswith("| largest peak memory | 103 MB |\n")


def test_summary_of_a_bare_directory_says_not_run(tmp_path):
    md = markdown_summary(tmp_path)
    assert md.startswith(f"# {tmp_path.name.rsplit('-', 1)[0]}: run `{tmp_path.name}`\n\n**")
    assert "Differences" not in md and "Per seed" not in md and "## Second round" not in md
    assert "| sampling throughput | not run |" in md


def test_md_table_takes_dicts_or_sequences_and_duration_reads_like_a_clock():
    assert md_table([{"a": 1, "b": None}, {"a": 0.123456, "b": "x|y"}]) == \
        "| a | b |\n|---|---|\n| 1 | — |\n| 0.1235 | x\\|y |\n"
    assert md_table([("command", "`run`"), ("empty", "")], ("", "")) == \
        "|  |  |\n|---|---|\n| command | `run` |\n| empty |  |\n"
    assert md_table([]) == "_none_\n"
    assert (duration(200), duration(3900), duration(59.6)) == ("3 min 20 s", "1 h 05 min",
                                                                "1 min 00 s")
    assert duration(None, "n/a") == "n/a" and duration(float("nan")) == "—"
