"""`python engine.py plot`: curves of real run directories written by two short runs of different scripts."""
import json
import sys

import pytest

import adco
import engine
import moco_ring
from conftest import run_script

TINY = ["--dataset", "synthetic", "--arch", "small", "--workers", "0", "--batch-size", "16", "--max-steps", "4",
        "--epochs", "1", "--knn-every", "1", "--knn-bank-size", "64", "--knn-test-size", "32"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    moco_ring.main([*TINY, "--moco-k", "48", "--out-dir", str(root / "moco_ring")])
    adco.main([*TINY, "--num-adversaries", "48", "--out-dir", str(root / "adco")])
    return root / "moco_ring", root / "adco"


def test_read_curves_keeps_each_step_once_and_skips_bookkeeping(tmp_path):
    records = [{"step": 1, "loss": 3.0, "lr": 0.1}, {"step": 2, "loss": 2.5, "lr": 0.1},
               {"step": 2, "loss": 2.0, "knn_top1": 40.0}]  # step 2 replayed, as an old resume did
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert engine.read_curves(str(tmp_path)) == {"loss": ([1, 2], [3.0, 2.0]), "knn_top1": ([2], [40.0])}


def test_plot_draws_every_logged_quantity_of_two_scripts(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = tmp_path / "curves.png"
    result = run_script("engine.py", "plot", *map(str, two_runs), "--out", str(out))
    curves = [engine.read_curves(str(run)) for run in two_runs]
    expected = engine.plot_quantities(dict(zip(map(str, two_runs), curves)))
    assert expected[:2] == ["loss", "knn_top1"] and len(expected) > 2  # each method logs its own quantities too
    assert result.stdout.strip() == f"wrote {out}: {', '.join(expected)} for 2 run(s)"
    assert Image.open(out).format == "PNG" and out.stat().st_size < 200_000


@pytest.mark.parametrize("make_bad, message", [
    (lambda d: None, "is not a run directory"),
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\nnot json\n'), "metrics.jsonl:2 is not a"),
])
def test_plot_refuses_bad_run_directories_with_one_line(tmp_path, make_bad, message):
    make_bad(tmp_path)
    result = run_script("engine.py", "plot", str(tmp_path), "--out", str(tmp_path / "c.png"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and message in result.stderr
    assert not (tmp_path / "c.png").exists()


def test_plot_without_matplotlib_says_so(two_runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit, match="^error: python engine.py plot needs matplotlib"):
        engine.plot_main([str(two_runs[0])])


def test_plot_only_draws_the_quantities_asked_for(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "some.png"
    result = run_script("engine.py", "plot", *map(str, two_runs), "--only", "knn_top1", "loss", "--out", str(out))
    assert result.stdout.strip() == f"wrote {out}: knn_top1, loss for 2 run(s)"
    result = run_script("engine.py", "plot", str(two_runs[0]), "--only", "no_such_thing", "--out", str(out),
                        check=False)
    assert result.returncode == 1 and result.stderr.startswith("error: no run logged no_such_thing")


def test_legend_labels_name_the_script_and_the_settings_that_differ(tmp_path):
    for name, config in (("a", {"ring_lower": 0.0, "moco_t": 0.1, "out_dir": "a"}),
                         ("b", {"ring_lower": 90.0, "moco_t": 0.1, "out_dir": "b"}),
                         ("c", {"adv_t": 0.02, "out_dir": "c"})):
        (tmp_path / name).mkdir()
        script = "adco" if name == "c" else "moco_ring"
        (tmp_path / name / "config.json").write_text(json.dumps({"script": script, "config": config}))
    labels = engine.run_labels([str(tmp_path / n) for n in "abc"])
    assert labels == ["moco_ring ring_lower=0.0", "moco_ring ring_lower=90.0", "adco"]


def test_plot_takes_labels_and_counts_them(two_runs, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "labelled.png"
    run_script("engine.py", "plot", *map(str, two_runs), "--labels", "MoCoRing", "AdCo", "--out", str(out))
    assert out.exists()
    result = run_script("engine.py", "plot", *map(str, two_runs), "--labels", "one", "--out", str(out), check=False)
    assert result.returncode == 2 and "1 labels for 2 runs" in result.stderr
