"""Tests for `python benchmark.py accuracy`: every method under one protocol, evaluated alike.

The statistics (difference to a baseline and its standard error) against a hand computation, the scaling of the
scripts' epoch-counted defaults against the rule written in the protocol, and the quick preset end to end: the JSON
has its documented schema and every method, a re-run reads finished runs back instead of training them again, and
--report-only tabulates the finished runs alone.
"""
import json
import math

import pytest

import benchmark
from conftest import run_script


def test_difference_and_standard_error_by_hand():
    # [1, 2, 3] vs [2, 4]: means 2 and 3; sample variances 1 and 2; SE = sqrt(1/3 + 2/2) = sqrt(4/3).
    d = benchmark.difference([1.0, 2.0, 3.0], [2.0, 4.0])
    assert d["diff"] == pytest.approx(-1.0)
    assert d["se"] == pytest.approx(math.sqrt(4 / 3))
    assert d["exceeds_2se"] is False  # |-1| < 2 * 1.155
    # [10, 10.5, 11] vs [5, 5.5, 6]: difference 5, variances 0.25 each, SE = sqrt(2 * 0.25 / 3) = 0.408.
    d = benchmark.difference([10.0, 10.5, 11.0], [5.0, 5.5, 6.0])
    assert d["diff"] == pytest.approx(5.0)
    assert d["se"] == pytest.approx(math.sqrt(0.5 / 3))
    assert d["exceeds_2se"] is True
    # One run on either side: no variance, so no SE and no verdict.
    assert benchmark.difference([1.0], [2.0, 3.0]) == {"diff": -1.5, "se": None, "exceeds_2se": None}
    s = benchmark.summary([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["runs"]) == (2.0, 1.0, [1.0, 2.0, 3.0])
    assert benchmark.summary([4.0])["std"] is None


def test_epoch_counted_defaults_scale_by_the_protocols_rule():
    """Same fraction of the run, nearest epoch, halves up: moco_ring anneals over 100 of its 200 epochs, mmcl
    sharpens sigma^2 at epochs 75 and 125 of its 400."""
    assert benchmark.scale_epochs(100, 200, 2) == 1
    assert benchmark.scale_epochs(75, 400, 200) == 38  # 37.5 -> 38
    assert benchmark.scale_epochs(125, 400, 2) == 1  # 0.625 -> 1
    assert benchmark.scaled_defaults("moco_ring", 2) == {"--anneal-epochs": {"default": 100, "of": 200, "value": 1}}
    assert benchmark.scaled_defaults("mmcl", 2)["--sigma-milestones"]["value"] == (0, 1)
    assert benchmark.scaled_defaults("mmcl", 200)["--sigma-milestones"]["value"] == (38, 63)
    assert benchmark.scaled_defaults("adco", 2) == {}


def test_quick_preset_end_to_end_and_rerun_skips_finished_runs(tmp_path):
    out, report = tmp_path / "runs", tmp_path / "quick.json"
    first = run_script("benchmark.py", "accuracy", "--preset", "quick", "--out-dir", str(out), "--json", str(report),
                       timeout=600)
    saved = json.loads(report.read_text())
    assert {"data", "arch", "batch_size", "steps", "images_seen", "scaled_defaults", "evaluation"} <= set(
        saved["protocol"])
    assert saved["protocol"]["images_seen"] == 2 * 32
    names = [m.name for m in benchmark.ACCURACY_METHODS]
    assert [r["method"] for r in saved["results"]] == names
    for row in saved["results"]:
        for metric in ("knn", "linear"):
            assert set(row[metric]) == {"mean", "std", "runs"} and len(row[metric]["runs"]) == 1
            assert 0.0 <= row[metric]["mean"] <= 100.0
        assert (row["images_per_s"] is None) == (row["method"] == "random init")
        assert row["images_per_s"] is None or row["images_per_s"] > 0
    assert saved["results"][names.index("MoCoRing")]["vs"]["MoCo v2"]["knn"]["se"] is None  # one seed: no SE
    assert "vs MoCo v2" in first.stdout and first.stdout.count("training (") == len(names) - 1
    results = {name: out / benchmark.slug(name) / "seed0.json" for name in names}
    stamps = {name: path.stat().st_mtime_ns for name, path in results.items()}

    # A re-run reads every finished run back; a run whose result was lost is evaluated again from its run directory
    # (the script finds its finished checkpoint there and trains nothing more), with the same numbers.
    lost = results["MoCo v2"]
    before = json.loads(lost.read_text())
    lost.unlink()
    steps_logged = len((out / "moco_v2" / "seed0" / "metrics.jsonl").read_text().splitlines())
    plot = tmp_path / "quick.png"
    second = run_script("benchmark.py", "accuracy", "--preset", "quick", "--out-dir", str(out), "--json",
                        str(report), "--plot", str(plot), timeout=600)
    assert second.stdout.count("done before") == len(names) - 1
    assert second.stdout.count("training (") == 1 and "MoCo v2, seed 0: training" in second.stdout
    assert all(results[n].stat().st_mtime_ns == stamps[n] for n in names if n != "MoCo v2")
    again = json.loads(lost.read_text())
    assert (again["knn"], again["linear"]) == (before["knn"], before["linear"])
    assert len((out / "moco_v2" / "seed0" / "metrics.jsonl").read_text().splitlines()) == steps_logged
    assert plot.is_file() and plot.stat().st_size < 200_000

    # --report-only tabulates what is finished and trains nothing: with --seeds 2, seed 1 is listed as missing.
    third = run_script("benchmark.py", "accuracy", "--preset", "quick", "--out-dir", str(out), "--json", str(report),
                       "--seeds", "2", "--report-only", timeout=600)
    assert "training (" not in third.stdout and "not finished yet: random init seed 1" in third.stdout
    partial = json.loads(report.read_text())
    assert len(partial["missing"]) == len(names) and all(len(r["knn"]["runs"]) == 1 for r in partial["results"])
    assert not (out / "moco_v2" / "seed1").exists()
