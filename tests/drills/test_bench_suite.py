"""benchmarks/suite.py --quick end to end: one real run of every section
(about 2 minutes on 2 busy cores), then the JSON and markdown it wrote.

torchft is optional (benchmarks/install_peers.sh): without it the suite
reports its rows as not run, and this test accepts that."""

from __future__ import annotations

import json
import math
import sys

from jobs import REPO, run_tagged, show

SUITE = REPO / "benchmarks" / "suite.py"
# The quick suite takes 1.5-2 min at a load average of 6 on 2 cores.
SUITE_TIMEOUT_S = 300


def test_quick_suite_writes_sane_json_and_markdown(tmp_path):
    launch = run_tagged(
        [sys.executable, str(SUITE), "--quick", "--ranks", "2", "--out", str(tmp_path)],
        timeout=SUITE_TIMEOUT_S,
    )
    assert launch.returncode == 0, show(launch)
    assert launch.leftovers == [], f"processes left behind: {launch.leftovers}"
    report = json.loads((tmp_path / "suite.json").read_text())
    assert report["quick"] is True
    assert report["machine"]["cpus"] >= 1 and report["machine"]["torch"]

    steady = report["summary"]["steady"]
    assert set(steady) == {"bare", "jitckpt", "torch_save", "dcp_async", "jitckpt_periodic"}
    for mode, row in steady.items():
        assert 0 < row["median_step_s"] < 10, (mode, row)
        assert 0.2 < row["ratio_median_of_rounds"] < 5, (mode, row)
    for mode in ("torch_save", "dcp_async", "jitckpt_periodic"):
        assert 0 <= steady[mode]["blocked_median_s"] < 10, (mode, steady[mode])
    assert steady["torch_save"]["blocked_vs_torch_save"] == 1.0

    recovery = report["summary"]["recovery"]
    for name in ("jitckpt-kill", "jitckpt-hang", "torchrun-dcp-kill"):
        entry = recovery[name]
        assert entry["error"] is None, (name, entry["error"])
        assert entry["drills"] == 1 and entry["survived"] == 1, (name, entry)
        assert 0 < entry["recovery_s"]["median"] < 120, (name, entry)
    for name in ("jitckpt-kill", "jitckpt-hang"):
        parts = recovery[name]["parts"]
        total = sum(parts[p]["median"] for p in parts)
        # One failure: the medians are the values, and the parts add up.
        assert math.isclose(total, recovery[name]["recovery_s"]["median"], rel_tol=1e-6)
        assert recovery[name]["iterations_lost"]["median"] == 1
    # The baseline lost the steps since its last checkpoint plus the partial one.
    assert recovery["torchrun-dcp-kill"]["iterations_lost"]["median"] >= 1
    assert recovery["torchrun-dcp-kill"]["recovery_vs_baseline"] == 1.0
    torchft = recovery["torchft-ddp-kill"]
    assert torchft["skipped"] or (torchft["drills"] == 1 and torchft["error"] is None), torchft

    table = (tmp_path / "suite.md").read_text()
    for heading in ("| mode |", "| failure |", "| system |", "torch.save", "DCP async_save"):
        assert heading in table, table
    assert "torchrun + periodic DCP" in table
