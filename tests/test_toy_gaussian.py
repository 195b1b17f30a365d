"""Tests for toy_mi/gaussian_cnce.py (Ring paper, App. B): the closed form, the estimator and its Jensen bound on the
exact optimal critic, the ring sampling of both protocols, the CLI and its checks.

Each check compares against something computed independently (torch.distributions densities, a naive loop over
anchors, the optimal critic's own Monte-Carlo MI) or against an inequality, with margins of several standard errors.
Sizes are small: the full protocol is a documented command (see the run card), not a test.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "toy_mi"))
import gaussian_cnce as toy  # noqa: E402

torch.set_num_threads(1)
K = 100  # negatives per anchor, as in the paper


def log_density_ratio(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """log p(x, y) / (p(x) p(y)) from torch.distributions, with Sigma = [[2, .4], [.4, 2]] written out here.

    x: N, y: M (broadcasting: x[:, None], y[None, :] gives the NxM optimal critic f*). Float64 throughout.
    """
    sigma = torch.tensor([[2.0, 0.4], [0.4, 2.0]], dtype=torch.float64)
    joint = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64), sigma)
    marginal = torch.distributions.Normal(0.0, math.sqrt(2.0))
    xy = torch.stack(torch.broadcast_tensors(x, y), dim=-1)
    return joint.log_prob(xy) - marginal.log_prob(x) - marginal.log_prob(y)


def optimal_critic(n: int, seed: int) -> torch.Tensor:
    """f: NxN, f[i, j] = f*(x_i, y_j) = log p(x_i, y_j) / (p(x_i) p(y_j)) on n pairs drawn by the script."""
    x, y = toy.sample_pairs(n, torch.Generator().manual_seed(seed))
    return log_density_ratio(x.double(), y.squeeze(1).double()[None, :])


def test_closed_form_mi_matches_paper_and_monte_carlo():
    mi = toy.true_mi()
    assert round(mi, 6) == 0.020411  # -1/2 ln(0.96), App. B
    # The script's sampler must produce the Gaussian whose MI the closed form gives: E[log p(x,y)/(p(x)p(y))].
    x, y = toy.sample_pairs(200_000, torch.Generator().manual_seed(0))
    ratio = log_density_ratio(x.squeeze(1).double(), y.squeeze(1).double())  # ratio: N
    standard_error = ratio.std().item() / math.sqrt(ratio.numel())  # about 4.5e-4
    assert abs(ratio.mean().item() - mi) < 4 * standard_error


def test_cnce_terms_against_naive_formula():
    """Line 3, Z = log(e^pos / ((e^pos + sum_l e^neg_l) / (k+1))), against plain floats, one row at a time."""
    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(5, 1, generator=gen, dtype=torch.float64), 3 * torch.randn(5, 7, generator=gen,
                                                                                          dtype=torch.float64)
    z = toy.cnce_terms(pos, neg)  # z: 5
    for i in range(5):
        p, ns = pos[i, 0].item(), neg[i].tolist()
        naive = math.log(math.exp(p) / ((math.exp(p) + sum(math.exp(v) for v in ns)) / (len(ns) + 1)))
        assert z[i].item() == pytest.approx(naive, abs=1e-12)


def test_ring_terms_against_naive_loop():
    """Line 4: the positive is the anchor's own column, the negatives come from the top (100-w)% of the OTHER
    columns (never the anchor's own), and the gradient reaches exactly the scores drawn."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(6, 40, generator=gen, dtype=torch.float64, requires_grad=True)  # distinct values
    anchor = torch.tensor([0, 7, 13, 21, 38, 39])
    for w in (0.0, 50.0, 90.0):
        pos, neg = toy.ring_terms(scores, anchor, w, 2000, gen)  # pos: 6x1, neg: 6x2000
        for r in range(6):
            row = scores[r].tolist()
            others = sorted(v for j, v in enumerate(row) if j != anchor[r])  # 39 values, ascending
            ring = set(others[int(w / 100 * len(others)):])  # the top (100-w)%: 39, 20 and 4 entries
            assert pos[r, 0].item() == row[anchor[r]]
            assert set(neg[r].tolist()) <= ring
            assert len(set(neg[r].tolist())) == len(ring)  # 2000 uniform draws miss an entry of a 39-ring w.p. 39 e^-51
        grad, = torch.autograd.grad(neg.sum(), scores)
        drawn = torch.zeros_like(scores)  # d(sum of draws)/d score = how often that score was drawn
        for r in range(6):
            for j, v in enumerate(scores[r].tolist()):
                drawn[r, j] = neg[r].tolist().count(v)
        assert torch.equal(grad, drawn)


def test_estimator_with_optimal_critic():
    """With f = f* NCE is the sample's own MC MI up to a Jensen gap of ~1e-4, and CNCE falls with w (Thm 3.1)."""
    f = optimal_critic(2000, seed=1).float()
    gen = torch.Generator().manual_seed(1)
    nce, cnce10, cnce50, cnce95 = (toy.estimate_per_draw(f, w, K, 10, gen).mean().item() for w in (0, 10, 50, 95))
    # Paired against mean_i f*(x_i, y_i) so sampling noise of the positives cancels; a log k instead of log(k+1)
    # normalisation would be off by log(101/100) = 0.00995.
    assert abs(nce - f.diagonal().mean().item()) < 3e-3
    assert cnce10 < nce and cnce50 < cnce10 and cnce95 < cnce50


def test_jensen_bound_holds_for_every_draw():
    """The step of the bound that is pure algebra: Z <= k/(k+1) (pos - mean_l neg_l) for ANY scores (log is
    concave), checked on scores spread over several nats so that the two sides differ visibly."""
    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(1000, 1, generator=gen, dtype=torch.float64), 2 * torch.randn(1000, K, generator=gen,
                                                                                             dtype=torch.float64)
    z = toy.cnce_terms(pos, neg)
    assert torch.all(z <= K / (K + 1) * (pos.squeeze(1) - neg.mean(dim=1)))


def test_jensen_bound_on_the_optimal_critic():
    """E[estimate(w)] <= B(w) = k/(k+1)(mean f_ii - mean ring score) on f*, and B(w) < 0 from w = 25 on.

    B(w) is checked against a ring mean computed here (diagonal masked out, rows sorted); the estimate's noise is
    the draw of negatives (standard error from 10 independent draws, 4e-5 to 2e-4), while the Jensen gap measured
    on three datasets is 0.0017 (w = 95) to 0.021 (w = 0), over 10 standard errors everywhere. B(w)'s own
    sampling error over datasets is 0.0045-0.006 (per-anchor terms / sqrt(N)); B(25) = -0.032, B(95) = -0.23.
    """
    n = 2000
    f = optimal_critic(n, seed=1)
    pos = f.diagonal()
    others = f[~torch.eye(n, dtype=torch.bool)].view(n, n - 1).sort(dim=1).values  # Nx(N-1), ascending
    gen = torch.Generator().manual_seed(2)
    for w in (0.0, 10.0, 25.0, 50.0, 75.0, 90.0, 95.0):
        ring_mean = others[:, int(w / 100 * (n - 1)):].mean(dim=1)  # r_i: the mean score of anchor i's ring
        terms = K / (K + 1) * (pos - ring_mean)  # per-anchor bound: N
        bound = toy.jensen_bound(f, w, K)
        assert bound == pytest.approx(terms.mean().item(), abs=1e-12)
        per_draw = toy.estimate_per_draw(f, w, K, 10, gen)  # D = 10 independent draws of the negatives
        standard_error = per_draw.std().item() / math.sqrt(per_draw.numel())
        assert per_draw.mean().item() + 5 * standard_error < bound, (w, per_draw.mean().item(), bound)
        if w >= 25:  # the ring's mean score is above the positive's: no positive CNCE from this critic
            assert bound + 5 * terms.std().item() / math.sqrt(n) < 0, (w, bound)


def test_protocols_share_data_and_draw_independent_streams():
    """--protocol per-w gives the numbers of --protocol both (each critic has its own generator), and every
    estimate lies where it must: finite, and CNCE(w) of the shared critic below its NCE."""
    cfg = toy.Config(num_points=200, epochs=1, percentiles=(50.0, 95.0), draws=2)
    both = toy.run_seed(cfg, seed=0)
    alone = toy.run_seed(cfg, seed=0, protocols=("per-w",))
    assert alone["per-w"] == both["per-w"]
    assert set(both) == {"shared", "per-w"}
    for table in both.values():
        assert list(table["bound"]) == [0.0, 50.0, 95.0] and list(table["cnce"]) == [50.0, 95.0]
        assert all(math.isfinite(v) for v in [table["nce"], *table["cnce"].values(), *table["bound"].values()])
    assert both["shared"]["cnce"][95.0] < both["shared"]["nce"]


def test_short_shared_run_respects_cnce_le_nce_le_true_mi():
    cfg = toy.Config(epochs=30)  # ~2 s on one core; the full run uses 100 epochs and 5 seeds
    result = toy.run_seed(cfg, seed=0, protocols=("shared",))["shared"]
    nce, cnce, mi = result["nce"], result["cnce"], toy.true_mi()
    # NCE <= I up to noise: held-out estimate over 2000 anchors varies by ~0.003 between seeds. It must also be
    # clearly positive, or the critic learned nothing and the orderings below would be vacuous.
    assert 0.005 < nce < mi + 0.01
    # CNCE(w) <= NCE and falling in w. The positives are shared, and each ring stochastically dominates the
    # previous one in f, so the only noise is the draw of negatives (~1e-4).
    ws = sorted(cnce)
    assert cnce[ws[0]] <= nce + 1e-3
    for lo, hi in zip(ws[:-1], ws[1:]):
        assert cnce[hi] <= cnce[lo] + 1e-3, (lo, hi, cnce)
    assert cnce[ws[-1]] < nce - 0.02


def test_cli_writes_both_tables_and_the_figure(tmp_path):
    out, png = tmp_path / "toy.json", tmp_path / "toy.png"
    # Run as a script from the repo root, as the run card says: this also checks the script finds moco_ring.py.
    cmd = [sys.executable, "toy_mi/gaussian_cnce.py", "--seeds", "2", "--epochs", "1", "--num-points", "300",
           "--draws", "1", "--json", str(out), "--plot", str(png)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "shared mean" in result.stdout and "per-w  mean" in result.stdout and "paper  mean" in result.stdout
    table = json.loads(out.read_text())
    assert round(table["true"], 6) == 0.020411 and set(table["protocols"]) == {"shared", "per-w"}
    for protocol in table["protocols"].values():
        assert list(protocol["cnce"]) == ["10", "25", "50", "75", "90", "95"]
        assert list(protocol["bound"]) == ["0", "10", "25", "50", "75", "90", "95"]
        assert len(protocol["per_seed"]) == 2
        for cell in [protocol["nce"], *protocol["cnce"].values(), *protocol["bound"].values()]:
            assert set(cell) == {"mean", "std"} and all(math.isfinite(v) for v in cell.values())
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size < 200_000


@pytest.mark.parametrize("bad", [["--seeds", "0"], ["--num-points", "0"], ["--num-points", "1"],
                                 ["--batch-size", "0"], ["--batch-size", "-8"], ["--percentiles", "150"],
                                 ["--percentiles", "100"], ["--percentiles", "-5"], ["--lr", "nan"],
                                 ["--lr", "-1"], ["--lr", "inf"], ["--num-negatives", "0"], ["--epochs", "0"],
                                 ["--draws", "0"], ["--layers", "0"], ["--threads", "0"], ["--no-such-flag", "1"],
                                 ["--epochs", "1.5"], ["--eval-split", "test"], ["--protocol", "each"]])
def test_bad_flags_are_refused_with_one_line(bad, capsys):
    with pytest.raises(SystemExit) as stop:
        toy.parse_config(toy.Config, bad)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and bad[0] in err[0], err


def test_config_defaults_and_flags():
    assert toy.parse_config(toy.Config, []) == toy.Config()
    assert toy.parse_config(toy.Config, ["--percentiles", "50", "90"]).percentiles == (50.0, 90.0)
    assert toy.parse_config(toy.Config, ["--protocol", "per-w"]).protocol == "per-w"


def _refuse_to_run(*args, **kwargs):
    raise AssertionError("the run started although an output could not be written")


def test_unwritable_outputs_are_refused_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "run_seed", _refuse_to_run)
    for flag in ("--json", "--plot"):
        for path, says in ((tmp_path / "missing" / "x.out", "does not exist"), (tmp_path, "is a folder")):
            with pytest.raises(SystemExit) as stop:
                toy.main([flag, str(path)])
            assert str(stop.value).startswith(f"error: {flag} ") and says in str(stop.value)
    assert list(tmp_path.iterdir()) == []


def test_plot_without_matplotlib_is_one_error_line_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(toy, "run_seed", _refuse_to_run)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(SystemExit) as stop:
        toy.main(["--plot", str(tmp_path / "x.png")])
    assert str(stop.value).startswith("error: --plot needs matplotlib")
