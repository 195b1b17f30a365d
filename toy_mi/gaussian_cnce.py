"""Gaussian toy of the Ring paper: CNCE <= NCE <= I(X;Y) on a 2-D Gaussian with known mutual information.

Paper: Wu, Zhuang, Mosse, Yamins, Goodman, "Conditional Negative Sampling for Contrastive Learning of Visual
Representations" (ICLR 2021), Theorem 3.1 and Appendix B, Table 5.

Estimator (numbers are cited in the code as "line N"):
     1  z_i ~ N(0, Sz), eps_i ~ N(0, Seps), (x_i, y_i) = z_i + eps_i            i = 1..n, n = 2000, i.i.d. pairs
     2  I(X;Y) = -1/2 log(1 - S12 S21 / (S11 S22)),  S = Sz + Seps             closed form (App. B)
     3  for epoch = 1..100, for each batch b of 128 pairs:
     4      f_ij = g(x_i)^T h(y_j)                                              BxB separable critic
     5      loss = -mean_i log( e^{f_ii} / sum_j e^{f_ij} )                     NCE with in-batch negatives
     6      Adam(lr 0.03) step on g, h
     7  on n fresh pairs: bank M[j] = h(y_j)                                    memory bank (Eq. 3)
     8  sim_ij = g(x_i)^T M[j] = f(x_i, y_j), j != i                           the similarity that defines S_B (Thm 3.1)
     9  for w in {0 (NCE), 10, 25, 50, 75, 90, 95}:
    10      j_1..j_k ~ Uniform{ j : sim_ij above the w-th percentile of sim_i }   k = 100, with replacement
    11      Z_i = log( e^{f_ii} / (1/(k+1)) (e^{f_ii} + sum_l e^{f_{i j_l}}) )    Thm 3.1 (positive in the sum)
    12      estimate(w) = mean_i Z_i                                            averaged over 10 draws of the j's
  w = 0 keeps the whole bank, i.e. uniform negatives: that is NCE (Eq. 2/3). Each seed redraws data and weights.

Command (CPU only; a toy this small gains nothing from a GPU, so the script never looks for one):
    python toy_mi/gaussian_cnce.py [--seeds 5] [--json results.json] [--plot table5.png]
    python toy_mi/gaussian_cnce.py --help      # every flag, with its default, from the Config block below

Measured (5 seeds, all defaults, `--json /tmp/toy_gaussian.json`; 2-core CPU shared with other jobs, no GPU,
torch 2.14, 1 thread; wall time 18.9 s for the whole command when the cores were idle, 37.5 s at load 4; the
numbers are bit-identical between the two runs). Std is over seeds (n-1):

                    True       NCE      w=10      w=25      w=50      w=75      w=90      w=95
    ours   mean  0.02041   0.01618  -0.00882  -0.04030  -0.08874  -0.14744  -0.19214  -0.21871
    ours   std         -   0.00330   0.00951   0.02086   0.03971   0.06653   0.07385   0.07756
    paper  mean  0.02041   0.01345   0.01241   0.00220  7.29e-05  1.67e-05  5.87e-06  1.97e-06
    paper  std         -   0.00100  3.00e-04  1.00e-04  9.00e-06  2.00e-06  1.00e-06  4.00e-06

  With `--eval-split train` (bank = the training points, my reading of the paper) NCE is 0.02087 +- 0.00520, above
  the true MI in 2 of 5 seeds: on the points it was fitted to, f is not independent of the sample, so no bound.

Where we agree with the paper: the true MI (0.020411 nats); NCE sits below it with the same size (0.0162 +- 0.0033
vs 0.0135 +- 0.001; 5 seeds each); CNCE <= NCE at every w and falls as w rises, in every seed: Theorem 3.1's claim.
Where we differ: the size and sign of CNCE. The paper's stays positive and shrinks to 2e-6 at w = 95; ours turns
negative (-0.22 at w = 95). I believe ours is what Theorem 3.1's S_B gives and the paper's numbers are not: S_B is a
level set of the critic f, so at w = 95 every negative scores in the top 5% of f(x_i, .), above the positive for
~95% of anchors, and line 11 is then negative. The optimal critic f* = log p(x,y)/(p(x)p(y)) shows it without any
training: its NCE is the true MI up to sampling noise, and its CNCE(95) is -0.24 (tests/test_toy_gaussian.py builds
it). Values of +1e-6 need negatives scoring almost exactly like the positive, which a top-f ring cannot give while
the critic carries the 0.013 nats its NCE measures. In a side experiment (not in this script) I ranked the bank by
same-view similarity g(x_i)^T g(x_j) (raw and cosine) and by |x_i - x_j| instead: CNCE falls more slowly (about
-0.005 to -0.04 at w = 95) but turns negative too, so no reading of the text I tried recovers the paper's positive
values; there is no public code for this toy. The spread across seeds grows with w because at 0.02 nats the NCE
objective is nearly flat in the critic's scale (a sharper or flatter f changes NCE little), while how far the ring
sits above the positive, and so CNCE at high w, grows with that scale.

Choices the paper leaves open, and mine:
  * Pairs: i.i.d., each point has its own z_i and eps_i (2000 points, as the paper says), unlike the Tschannen et al.
    notebook that shares one z per batch. Sz = [[1,-.5],[-.5,1]] and Seps = [[1,.9],[.9,1]] are sampled separately
    and summed as App. B writes it; only S = Sz + Seps = [[2,.4],[.4,2]] matters for i.i.d. pairs. X = dim 1, Y = dim 2.
  * Critic: separable f(x, y) = g(x)^T h(y), two encoders (one per variable), 5 Linear layers each (1 -> 10 -> 10 ->
    10 -> 10 -> 10), ReLU between, unnormalised outputs and no temperature (a Gaussian's optimal critic is
    quadratic in (x, y), which needs an unbounded score).
  * Training negatives: the other pairs of the batch (InfoNCE, positive in the denominator); the memory bank is used
    only for the estimates, built once from the trained h, so no entry is stale.
  * Normalisation: log(k+1) with k = 100 negatives plus the positive, Theorem 3.1's 1/k over its k terms (Eq. 4).
    The same k = 100 for NCE and CNCE, so the two differ in where negatives come from and nothing else.
  * Similarity for the percentile: the critic f(x_i, y_j) = g(x_i)^T M[j] (anchor embedding . bank), which is both
    Theorem 3.1's S_B = {v : e^{f(u,v)} in B} and the Ring's g(t(x_i))^T g(t'(x)). "Above the w-th percentile" =
    the top (100-w)% of the bank, `sample_ring_indices(sim, lower=w, upper=100)`.
  * The bank holds the other n-1 points (the positive is never its own negative: V_2..V_k are independent of V_1).
  * Evaluation on n fresh pairs from the same distribution, so f is independent of the sample and the bound holds;
    `--eval-split train` evaluates on the training pairs instead.
"""
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

# `python toy_mi/gaussian_cnce.py` puts toy_mi/ on sys.path, not the repo root where moco_ring.py lives.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import option, parse_config  # noqa: E402
from moco_ring import sample_ring_indices  # noqa: E402  (the one ring sampler of the project)


# ---------------------------------------------------------------------------------------------------------------------
# Config: every field is a flag; its help text and default come from here and nowhere else.
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class Config:
    seeds: int = option(5, "number of runs (seeds 0..N-1); each redraws data and weights")
    num_points: int = option(2000, "pairs (x, y) to train on, and to evaluate on (App. B)")
    layers: int = option(5, "Linear layers per encoder (App. B: 5)")
    hidden: int = option(10, "hidden width of each encoder (App. B: 10)")
    embed_dim: int = option(10, "output width of g and h, the critic's inner product")
    lr: float = option(0.03, "Adam learning rate, no weight decay (App. B)")
    batch_size: int = option(128, "pairs per step; the batch's other pairs are negatives")
    epochs: int = option(100, "passes over the training pairs (App. B)")
    num_negatives: int = option(100, "k, negatives per anchor for NCE and CNCE")
    percentiles: tuple[float, ...] = option((10.0, 25.0, 50.0, 75.0, 90.0, 95.0),
                                            "w: CNCE draws from the bank above the w-th percentile")
    draws: int = option(10, "independent draws of the k negatives per anchor, averaged")
    eval_split: str = option("heldout", "pairs to estimate on: fresh, or the training ones",
                             choices=("heldout", "train"))
    threads: int = option(1, "torch CPU threads (the MLPs are tiny: more do not help)")
    json: str = option("", "write the table (ours and the paper's) as JSON to this path")
    plot: str = option("", "save a plot here (needs matplotlib; skipped without it)")


# ---------------------------------------------------------------------------------------------------------------------
# Data and the closed-form mutual information (App. B)
# ---------------------------------------------------------------------------------------------------------------------
SIGMA_Z = torch.tensor([[1.0, -0.5], [-0.5, 1.0]], dtype=torch.float64)
SIGMA_EPS = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=torch.float64)
SIGMA = SIGMA_Z + SIGMA_EPS  # [[2, .4], [.4, 2]]: the covariance of (X, Y)

# Table 5 of the paper: (mean, std) per column; w -> (mean, std) for CNCE.
PAPER = {"true": 0.02041, "nce": (0.01345, 0.001),
         "cnce": {10.0: (0.01241, 3e-4), 25.0: (0.00220, 1e-4), 50.0: (7.29e-5, 9e-6), 75.0: (1.67e-5, 2e-6),
                  90.0: (5.87e-6, 1e-6), 95.0: (1.97e-6, 4e-6)}}


def true_mi(sigma: torch.Tensor = SIGMA) -> float:
    """I(X;Y) of a bivariate Gaussian, -1/2 log(1 - S12 S21 / (S11 S22)) (App. B; line 2). In nats."""
    rho2 = sigma[0, 1] * sigma[1, 0] / (sigma[0, 0] * sigma[1, 1])  # squared correlation
    return -0.5 * math.log1p(-float(rho2))


def sample_pairs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n i.i.d. pairs (line 1): z ~ N(0, Sz), eps ~ N(0, Seps), (x, y) = z + eps. Returns x: Nx1, y: Nx1."""
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA_Z).T  # z: Nx2
    eps = torch.randn(n, 2, generator=generator, dtype=torch.float64) @ torch.linalg.cholesky(SIGMA_EPS).T  # eps: Nx2
    xy = (z + eps).float()  # xy: Nx2, covariance SIGMA
    return xy[:, :1], xy[:, 1:]


# ---------------------------------------------------------------------------------------------------------------------
# Critic f(x, y) = g(x)^T h(y) and its NCE training (lines 3-6)
# ---------------------------------------------------------------------------------------------------------------------
def make_encoder(cfg: Config) -> torch.nn.Sequential:
    """`layers` Linear layers, ReLU between them: 1 -> hidden -> ... -> hidden -> embed_dim."""
    dims = [1] + [cfg.hidden] * (cfg.layers - 1) + [cfg.embed_dim]
    modules: list[torch.nn.Module] = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        modules += [torch.nn.Linear(d_in, d_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*modules[:-1])  # no ReLU on the output: the critic's scores must be signed


def train_critic(x: torch.Tensor, y: torch.Tensor, cfg: Config,
                 generator: torch.Generator) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Maximise the in-batch NCE bound (lines 3-6). x: Nx1, y: Nx1. Returns the encoders g (for x) and h (for y)."""
    g, h = make_encoder(cfg), make_encoder(cfg)
    opt = torch.optim.Adam([*g.parameters(), *h.parameters()], lr=cfg.lr)
    for _ in range(cfg.epochs):
        for b in torch.randperm(x.shape[0], generator=generator).split(cfg.batch_size):
            f = g(x[b]) @ h(y[b]).T  # f: BxB, f[i, j] = f(x_i, y_j); positives on the diagonal (line 4)
            # line 5: cross-entropy with target i is -log(e^{f_ii} / sum_j e^{f_ij}), the positive in the sum.
            loss = F.cross_entropy(f, torch.arange(len(b)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return g, h


# ---------------------------------------------------------------------------------------------------------------------
# The NCE and CNCE estimates (lines 7-12)
# ---------------------------------------------------------------------------------------------------------------------
def bound_estimates(f: torch.Tensor, percentiles: tuple[float, ...], num_negatives: int, draws: int,
                    generator: torch.Generator) -> tuple[float, dict[float, float]]:
    """NCE and CNCE(w) estimates of I(X;Y) from a score matrix (Theorem 3.1; lines 8-12).

    f: NxN, f[i, j] = f(x_i, y_j) for N held-out pairs, positives on the diagonal. Negatives for anchor i come from
    the other N-1 columns: uniformly for NCE, from the ring above the w-th percentile of f(x_i, .) for CNCE(w).
    Returns (NCE, {w: CNCE(w)}), each the mean over anchors and draws, in nats.
    """
    n, k = f.shape[0], num_negatives
    pos = f.diagonal().unsqueeze(1)  # pos: Nx1, f(x_i, y_i)
    sim = f[~torch.eye(n, dtype=torch.bool)].view(n, n - 1)  # sim: Nx(N-1), f(x_i, y_j) for j != i (line 8)

    def estimate(lower: float) -> float:
        # line 10: one call draws all D*k negatives, so each ring is sorted once.
        idx = sample_ring_indices(sim, lower, 100.0, draws * k, generator)  # idx: Nx(D*k)
        neg = sim.gather(1, idx).view(n, draws, k)  # neg: NxDxk, f(x_i, y_j) of the negatives
        logits = torch.cat([pos.unsqueeze(2).expand(n, draws, 1), neg], dim=2)  # logits: NxDx(1+k)
        # line 11: Thm 3.1's (1/k) over its k terms is 1/(k+1) here (k negatives plus the positive), as in Eq. 4.
        z = pos - logits.logsumexp(dim=2) + math.log(k + 1)  # z: NxD
        return z.mean().item()

    # lower = 0 keeps the whole bank: uniform negatives, NCE (Eq. 2/3).
    return estimate(0.0), {w: estimate(w) for w in percentiles}


def run_seed(cfg: Config, seed: int) -> dict:
    """Lines 1-12 for one seed: fresh data, fresh weights. Returns {"nce": float, "cnce": {w: float}}."""
    torch.manual_seed(seed)  # weight init (nn.Linear draws from the global generator)
    gen = torch.Generator().manual_seed(seed)  # data, batch order, negatives
    x, y = sample_pairs(cfg.num_points, gen)  # x: Nx1, y: Nx1
    g, h = train_critic(x, y, cfg, gen)
    if cfg.eval_split == "heldout":
        x, y = sample_pairs(cfg.num_points, gen)  # independent of f, so the bound of Thm 3.1 applies
    with torch.no_grad():
        bank = h(y)  # M: NxC, line 7
        f = g(x) @ bank.T  # f: NxN
    nce, cnce = bound_estimates(f, cfg.percentiles, cfg.num_negatives, cfg.draws, gen)
    return {"nce": nce, "cnce": cnce}


# ---------------------------------------------------------------------------------------------------------------------
# Table 5: summary, printing, JSON, optional plot
# ---------------------------------------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def summarize(per_seed: list[dict], percentiles: tuple[float, ...]) -> dict:
    """Table 5's layout: true MI, then mean/std over seeds of NCE and of CNCE per w (keys are w as strings)."""
    return {"true": true_mi(),
            "nce": mean_std([r["nce"] for r in per_seed]),
            "cnce": {f"{w:g}": mean_std([r["cnce"][w] for r in per_seed]) for w in percentiles}}


def paper_table() -> dict:
    return {"true": PAPER["true"], "nce": dict(zip(("mean", "std"), PAPER["nce"])),
            "cnce": {f"{w:g}": dict(zip(("mean", "std"), ms)) for w, ms in PAPER["cnce"].items()}}


def _num(v: float) -> str:
    """Fixed point for the table's larger values, scientific for the paper's tiny CNCE ones."""
    return f"{v:>10.5f}" if v == 0 or abs(v) >= 1e-3 else f"{v:>10.2e}"


def format_table(ours: dict, paper: dict) -> str:
    """Table 5's layout, ours above the paper's: a mean row and a std row per source."""
    ws = list(ours["cnce"])
    lines = [" " * 14 + f"{'True':>10}{'NCE':>10}" + "".join(f"{'w=' + w:>10}" for w in ws)]
    for name, table in (("ours", ours), ("paper", paper)):
        cols = [table["nce"]] + [table["cnce"].get(w) for w in ws]
        for stat in ("mean", "std"):
            first = _num(table["true"]) if stat == "mean" else f"{'-':>10}"
            cells = "".join(_num(c[stat]) if c else f"{'n/a':>10}" for c in cols)
            lines.append(f"{name:<7}{stat:<7}{first}{cells}")
    return "\n".join(lines)


def save_plot(ours: dict, paper: dict, path: str) -> None:
    """CNCE against w with NCE and the true MI as lines. matplotlib is optional, so it is imported only here."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {path}")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, table, marker in (("ours", ours, "o"), ("paper", paper, "s")):
        ws = [float(w) for w in table["cnce"]]
        bars = ax.errorbar(ws, [c["mean"] for c in table["cnce"].values()], [c["std"] for c in table["cnce"].values()],
                           marker=marker, capsize=3, label=f"CNCE ({name})")
        ax.axhline(table["nce"]["mean"], ls="--", color=bars.lines[0].get_color(), label=f"NCE ({name})")
    ax.axhline(ours["true"], color="k", label="true I(X;Y)")
    ax.set_xlabel("w (percentile)")
    ax.set_ylabel("estimate (nats)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    print(f"plot written to {path}")


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(Config, argv, __doc__)
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    per_seed = []
    for seed in range(cfg.seeds):
        per_seed.append(run_seed(cfg, seed))
        print(f"seed {seed}: NCE {per_seed[-1]['nce']:.5f}  "
              + "  ".join(f"w={w:g} {v:.2e}" for w, v in per_seed[-1]["cnce"].items()), flush=True)
    wall_s = time.perf_counter() - start
    ours, paper = summarize(per_seed, cfg.percentiles), paper_table()
    print(format_table(ours, paper))
    print(f"{cfg.seeds} seed(s) in {wall_s:.1f} s")
    per_seed_json = [{"nce": r["nce"], "cnce": {f"{w:g}": v for w, v in r["cnce"].items()}} for r in per_seed]
    result = {**ours, "paper": paper, "per_seed": per_seed_json, "config": asdict(cfg), "wall_s": wall_s}
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2))
    if cfg.plot:
        save_plot(ours, paper, cfg.plot)
    return result


if __name__ == "__main__":
    main()
