"""experiments.reproduce --preset smoke end to end, and the report's verdicts against the records.

Marked slow (several minutes: five experiments, each paying JAX start-up and
compilation); `make test-all` and .ci/run run it.
"""

import json
import re

import pytest

from conftest import run_module
from experiments import report
from lossland import records, verdicts


pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    result = run_module("experiments.reproduce", "--preset=smoke", f"--workdir={root}",
                        timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return root, (root / "REPORT.md").read_text(), result


def test_every_section_figure_and_record_is_present(smoke_report):
    root, text, _ = smoke_report
    for heading in ("## Environment", "## Wall time", "## C1 Formation", "C2 Attraction",
                    "## C3 Explanation", "## C4 The top subspace is idle"):
        assert heading in text, heading
    assert "*(not run)*" not in text and "figure missing" not in text
    for name in ("eos", "gn", "sweep_n", "sweep_ce", "subspace"):
        assert (root / name / "COMPLETE.json").exists(), name
    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (root / link).stat().st_size > 1000, link
    assert (root / "eos" / "summary.json").exists() and (root / "sweep_n" / "sweep.jsonl").exists()
    # The report states the study's wall time: the sum of each experiment's own.
    minutes = [json.loads((root / name / "COMPLETE.json").read_text())["wall_time_s"] / 60
               for name in ("eos", "gn", "sweep_n", "sweep_ce", "subspace")]
    assert f"The 5 experiments run took {sum(minutes):.1f} minutes in all" in text


def test_verdict_lines_agree_with_the_records(smoke_report):
    root, text, _ = smoke_report
    eos = json.loads((root / "eos" / "summary.json").read_text())
    gn = report.gn_summary(records.read_metrics(root / "gn"))
    for run in eos["runs"].values():
        ratio = run["median_stability_ratio_last_half"]
        line = next(l for l in text.splitlines() if l.startswith(f"- C3 η={run['lr']:g}:"))
        assert f"= {ratio:.3f}" in line
        inside = 0.9 <= ratio <= 1.1
        assert ("inside" in line) == inside and ("not at the edge" in line) == (not inside)
    gn_line = next(l for l in text.splitlines() if l.startswith("- C3 Gauss–Newton split"))
    assert f"λ1(G)/λ1(H) = {gn['median_gn_share']:.3f}" in gn_line
    assert ("does not carry" in gn_line) == (gn["median_gn_share"] < report.GN_CARRIES)
    # The C1/C2 and C4 verdicts are the experiments' own generated files, copied verbatim.
    for name in ("sweep_n", "subspace"):
        verdict = report._demote((root / name / "verdict.md").read_text())
        assert verdict in text, name


def test_rerun_skips_complete_experiments(smoke_report):
    root, _, _ = smoke_report
    result = run_module("experiments.reproduce", "--preset=smoke", f"--workdir={root}",
                        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.count("complete, skipped") == 5


def test_report_opens_with_the_verdicts_at_a_glance(smoke_report):
    """The table comes first and is generated from the summaries: each sweep group's C1 and
    C2 verdict and its runs at the edge of stability, each C3 η, and C4."""
    root, text, _ = smoke_report
    glance = text.index("## Verdicts at a glance")
    assert glance < text.index("## Environment") < text.index("## C1 Formation")
    table = text[glance:text.index("## Environment")]
    rows = [[c.strip() for c in line.strip("|").split(" | ")]
            for line in table.splitlines() if line.startswith("| C")]
    summary = json.loads((root / "sweep_n" / "summary.json").read_text())
    for group in summary["groups"]:
        title = verdicts._group_title(group)
        count = f"{group['runs_at_eos']} / {group['runs_total']}"
        assert ["C1", title, group["verdict"]] == next(r[:3] for r in rows
                                                       if r[:2] == ["C1", title])
        assert ["C2", title, group["c2_verdict"]] == next(r[:3] for r in rows
                                                          if r[:2] == ["C2", title])
        assert all(r[4] == count for r in rows if r[1] == title)
    eos = json.loads((root / "eos" / "summary.json").read_text())
    assert sum(r[0] == "C3" for r in rows) == len(eos["runs"])
    experiment = json.loads((root / "subspace" / "experiment.json").read_text())
    verdict = experiment["criteria"][0]["verdict"]
    assert any(r[0] == "C4" and r[2] == verdict for r in rows)
