"""mmcl.py: the kernels, Delta of Proposition 1, both SVM solvers against an exact QP solver, the loss of Eq. (9)
and SimCLR's NT-Xent against naive per-anchor loops, the distributed maths, and the script end to end (world sizes 1
and 2, resume, real learning on the CIFAR-10 JPEGs for MMCL and SimCLR, bad input)."""
import functools
import itertools
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import common
import engine
import mmcl
import conftest
from conftest import CIFAR_JPG, ROOT, error_line, needs_cifar, read_metrics, run_script

INF = float("inf")
SMALL_RUN = ["--dataset", "folder", "--data-root", str(CIFAR_JPG), "--arch", "small", "--workers", "0",
             "--batch-size", "32", "--knn-bank-size", "200", "--knn-test-size", "100",
             "--log-every", "1"]  # every step's loss in metrics.jsonl: the tests compare them


def unit(*shape, seed=0, dtype=torch.float64):  # float64 by default: the solver tests compare to exact optima
    return conftest.unit(*shape, seed=seed, dtype=dtype)


def scalar_kernel(a, b, kind, sigma2=0.5, gamma=1.0, eta=0.0):
    """Table 6, one pair at a time, written from the formulas (not from x.y tricks)."""
    if kind == "rbf":
        return math.exp(-((a - b) ** 2).sum().item() / (2 * sigma2))
    if kind == "tanh":
        return math.tanh(gamma * (a @ b).item() + eta)
    return (a @ b).item()


def g(A, a):
    """The dual objective of Proposition 1 (i) with A = Delta + beta I."""
    return 0.5 * a @ A @ a - 2 * a.sum()


def exact_box_qp(A, C):
    """argmin 1/2 a^T A a - 2 a^T 1 over 0 <= a <= C (A positive definite), by brute force: the minimizer is a
    stationary point of g on some face of the box, so try every split of the coordinates into 'at 0', 'free',
    'at C', solve the free ones exactly, keep the feasible point with the smallest g. Float64, tiny n only."""
    n, best = A.shape[0], None
    for assign in itertools.product((0, 1, 2) if C < INF else (0, 1), repeat=n):
        free = [i for i in range(n) if assign[i] == 1]
        upper = [i for i in range(n) if assign[i] == 2]
        a = torch.zeros(n, dtype=torch.float64)
        a[upper] = C
        if free:
            rhs = 2.0 - A[free][:, upper] @ a[upper]
            a[free] = torch.linalg.solve(A[free][:, free], rhs)
        if (a >= -1e-12).all() and (a <= C + 1e-12).all() and (best is None or g(A, a) < g(A, best)):
            best = a.clamp(0, C)
    return best


def assert_kkt(A, a, C, tol):
    """KKT of the box QP: gradient >= 0 where a = 0, <= 0 where a = C, = 0 strictly inside."""
    grad = A @ a - 2.0
    at_zero, at_c = a <= tol, a >= C - tol
    inside = ~at_zero & ~at_c
    assert (grad[at_zero] >= -tol).all() and (grad[at_c] <= tol).all() and (grad[inside].abs() <= tol).all()


def random_deltas(B, n, seed):
    """Deltas as MMCL builds them (RBF kernel of random unit vectors), plus Gram matrices of random vectors in 3-d
    (rank 3, so strongly coupled: some coordinates of the optimum sit at 0): Bxnxn float64."""
    z = unit(n + 1, 8, seed=seed)
    K = mmcl.kernel_matrix(z, z, "rbf", sigma2=0.3)
    anchors = torch.zeros(1, dtype=torch.long)
    real = mmcl.svm_delta(K, anchors, torch.arange(1, n + 1).unsqueeze(0))
    X = torch.randn(B - 1, n, 3, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return torch.cat([real, X @ X.transpose(1, 2)])


# ---------------------------------------------------------------------------------------------------------------------
# Kernels, negatives, Delta
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", mmcl.KERNELS)
def test_kernels_follow_table_6(kind):
    x, y = unit(5, 8, seed=1), unit(7, 8, seed=2)
    K = mmcl.kernel_matrix(x, y, kind, sigma2=0.5, gamma=2.0, eta=0.3)
    naive = torch.tensor([[scalar_kernel(a, b, kind, 0.5, 2.0, 0.3) for b in y] for a in x], dtype=torch.float64)
    torch.testing.assert_close(K, naive)


def test_negatives_are_the_other_images_views():
    N, anchors = 5, torch.tensor([1, 3])
    both = mmcl.negative_indices(N, anchors, "both")
    assert both.tolist() == [[0, 2, 3, 4, 5, 7, 8, 9], [0, 1, 2, 4, 5, 6, 7, 9]]  # 2N-2, Algorithm 1
    first = mmcl.negative_indices(N, anchors, "first")
    assert first.tolist() == [[0, 2, 3, 4], [0, 1, 2, 4]]  # N-1, the public code


@pytest.mark.parametrize("kind", mmcl.KERNELS)
def test_delta_is_the_dual_of_proposition_1(kind):
    """Delta from the batched gather equals the per-anchor formula, and g(a) on it equals the two-class SVM dual
    of the proof (positive z+ with alpha_x = 1^T a, negatives Y), so the substitution is right for every kernel."""
    N = 4
    z1, z2 = unit(N, 6, seed=1), unit(N, 6, seed=2)
    Z = torch.cat([z1, z2])
    anchors = torch.arange(N)
    idx = mmcl.negative_indices(N, anchors, "both")
    Delta = mmcl.svm_delta(mmcl.kernel_matrix(Z, Z, kind, 0.5), anchors, idx)
    for k in range(N):
        Y = Z[idx[k]]
        kern = functools.partial(scalar_kernel, kind=kind)
        naive = torch.tensor([[kern(z1[k], z1[k]) + kern(y_i, y_j) - kern(z1[k], y_i) - kern(z1[k], y_j)
                               for y_j in Y] for y_i in Y], dtype=torch.float64)
        torch.testing.assert_close(Delta[k], naive)
        a = torch.rand(len(Y), generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        full = torch.cat([a.sum().view(1), a])  # [alpha_x, alpha_Y]
        labels = torch.cat([torch.ones(1), -torch.ones(len(Y))]).double()
        X = torch.cat([z1[k:k + 1], Y])
        K = torch.tensor([[kern(p, q) for q in X] for p in X], dtype=torch.float64)
        K_signed = labels[:, None] * labels[None, :] * K  # y_i y_j K(x_i, x_j) of Eq. (3)
        svm_dual = 0.5 * full @ K_signed @ full - full.sum()
        assert g(Delta[k], a).item() == pytest.approx(svm_dual.item(), rel=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stop", mmcl.PGD_STOP_RULES)
@pytest.mark.parametrize("C", [0.3, 2.0, INF])
def test_pgd_reaches_the_exact_box_qp_optimum_and_satisfies_kkt(C, stop):
    beta, Delta = 0.1, random_deltas(4, 6, seed=0)
    A = Delta + beta * torch.eye(6, dtype=torch.float64)
    for step in (0.0, 0.02):  # 1/||Delta|| and a fixed step
        alpha, iters = mmcl.svm_dual_pgd(Delta, C, 20000, beta, step_size=step, tol=1e-13, stop=stop)
        assert iters.max() < 20000  # converged, not cut off
        for k in range(4):
            exact = exact_box_qp(A[k], C)
            assert g(A[k], alpha[k]).item() == pytest.approx(g(A[k], exact).item(), rel=1e-9, abs=1e-9)
            torch.testing.assert_close(alpha[k], exact, atol=1e-6, rtol=0)
            assert_kkt(A[k], alpha[k], C, tol=1e-6)
    if C == 2.0:  # coordinates at 0, inside and at C: every case of the KKT conditions is exercised
        assert (alpha == C).any() and (alpha == 0).any() and ((alpha > 0) & (alpha < C)).any()


@pytest.mark.parametrize("C", [0.5, INF])
def test_inv_is_the_truncated_least_squares_solution(C):
    beta, Delta = 0.1, random_deltas(4, 6, seed=1)
    alpha = mmcl.svm_dual_inv(Delta, C, beta)
    for k in range(4):
        A = Delta[k] + beta * torch.eye(6, dtype=torch.float64)
        lstsq = torch.linalg.lstsq(A, torch.full((6, 1), 2.0, dtype=torch.float64)).solution.squeeze(1)
        torch.testing.assert_close(alpha[k], lstsq.clamp(0, C))
    if C == INF:
        assert not torch.isinf(alpha).any()


def test_inv_equals_the_exact_optimum_when_the_unconstrained_one_is_inside_the_box():
    Delta = torch.eye(5, dtype=torch.float64).expand(3, 5, 5) * torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1).double()
    inv = mmcl.svm_dual_inv(Delta, INF, 0.0)
    pgd, _ = mmcl.svm_dual_pgd(Delta, INF, 5000, 0.0, tol=1e-14, stop="anchor")
    torch.testing.assert_close(inv, 2.0 / torch.tensor([1.0, 2.0, 4.0]).double().view(3, 1).expand(3, 5))
    torch.testing.assert_close(pgd, inv)


@pytest.mark.parametrize("solver", ["inv", "pgd"])
def test_batched_solver_equals_a_loop_over_anchors(solver):
    Delta, C, beta = random_deltas(5, 7, seed=2), 1.0, 0.1
    start = torch.rand(5, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    if solver == "inv":
        batched = mmcl.svm_dual_inv(Delta, C, beta)
        looped = torch.cat([mmcl.svm_dual_inv(D[None], C, beta) for D in Delta])
    else:  # early stopping on: each anchor stops on its own, exactly as when it is solved alone
        batched, iters = mmcl.svm_dual_pgd(Delta, C, 300, beta, tol=1e-3, alpha0=start, stop="anchor")
        alone = [mmcl.svm_dual_pgd(D[None], C, 300, beta, tol=1e-3, alpha0=a[None], stop="anchor")
                 for D, a in zip(Delta, start)]
        looped = torch.cat([a for a, _ in alone])
        assert iters.tolist() == [i.item() for _, i in alone] and len(set(iters.tolist())) > 1
    torch.testing.assert_close(batched, looped, rtol=0, atol=1e-12)


def test_exact_solver_equals_the_enumeration():
    # svm_dual_exact, the reference of benchmark.py's stopping-rule lines, against brute force on tiny problems.
    beta, Delta = 0.1, random_deltas(4, 6, seed=4)
    A = Delta + beta * torch.eye(6, dtype=torch.float64)
    for C in (0.3, 2.0, INF):
        exact = mmcl.svm_dual_exact(Delta, C, beta)
        for k in range(4):
            torch.testing.assert_close(exact[k], exact_box_qp(A[k], C), atol=1e-9, rtol=0)


def test_batch_stop_rule_is_the_public_codes():
    # The rule of the public code, checked from outside: run the same PGD for exactly j iterations (tol 0) for
    # j = 1, 2, ...; the batch rule must stop at the first j where the mean over all entries of
    # |a_j - a_j-1| / (a_j-1 + 1e-7) drops below tol, every anchor at that j, with a_j.
    Delta, beta, C, tol = random_deltas(3, 8, seed=5), 0.1, 2.0, 1e-2
    start = torch.randn(3, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64).relu()
    alpha, iters = mmcl.svm_dual_pgd(Delta, C, 1000, beta, tol=tol, alpha0=start, stop="batch")
    previous, expected = start, None
    for j in range(1, 1000):
        a_j, _ = mmcl.svm_dual_pgd(Delta, C, j, beta, tol=0.0, alpha0=start, stop="batch")
        if ((a_j - previous) / (previous + 1e-7)).abs().mean() < tol:
            expected = j
            break
        previous = a_j
    assert expected is not None and expected > 2 and iters.tolist() == [expected] * 3
    torch.testing.assert_close(alpha, a_j, rtol=0, atol=0)


def clustered_deltas(N, anchors, sigma2, seed, spread=0.3):
    """Delta for the first `anchors` images of a batch of N whose features crowd around one direction (mean cosine
    about 0.85, as an encoder early in training gives), RBF kernel, negatives 'both': anchors x (2N-2)^2, float64."""
    g = torch.Generator().manual_seed(seed)
    centre = F.normalize(torch.randn(1, 128, generator=g, dtype=torch.float64), dim=1)
    Z = F.normalize(11.3 * (1 - spread) * centre + spread * torch.randn(2 * N, 128, generator=g,
                                                                         dtype=torch.float64), dim=1)
    K = mmcl.kernel_matrix(Z, Z, "rbf", sigma2=sigma2)
    rows = torch.arange(anchors)
    return mmcl.svm_delta(K, rows, mmcl.negative_indices(N, rows))


def test_with_the_fixed_step_the_anchor_rule_stops_at_once_and_the_batch_rule_goes_on():
    # At the paper's step 1e-3 and the default sigma^2 25 (N 64 here, for speed): the per-anchor rule sees a tiny
    # relative change and stops after one iteration far above the optimum; the public code's rule counts alphas
    # leaving 0 as large changes and runs on. Measured on this problem (float64, fixed seeds): anchor 1 iteration,
    # 65-78% above the optimum; batch 102 iterations, 5.4-11.5% above. With the default step 1/(||Delta||_F + beta)
    # both end within 0.02% (benchmark.py mmcl prints the same lines for a real batch).
    beta, C = 0.1, 100.0
    Delta = clustered_deltas(64, 8, sigma2=25.0, seed=0)
    A = Delta + beta * torch.eye(Delta.shape[1], dtype=torch.float64)
    best = g_batch(A, mmcl.svm_dual_exact(Delta, C, beta))
    start = torch.randn(Delta.shape[:2], generator=torch.Generator().manual_seed(0), dtype=torch.float64).relu()
    gap, iters = {}, {}
    for stop in mmcl.PGD_STOP_RULES:
        alpha, iters[stop] = mmcl.svm_dual_pgd(Delta, C, 1000, beta, step_size=1e-3, tol=1e-2, alpha0=start, stop=stop)
        gap[stop] = (g_batch(A, alpha) - best) / best.abs()
    assert iters["anchor"].max() == 1 and gap["anchor"].min() > 0.3
    assert iters["batch"].min() > 50 and gap["batch"].max() < 0.25 and gap["batch"].max() < gap["anchor"].min()


def g_batch(A, a):
    """g for a batch of problems: Bxnxn, Bxn -> B."""
    return 0.5 * torch.einsum("bi,bij,bj->b", a, A, a) - 2 * a.sum(1)


def test_batched_inv_is_right_with_several_cpu_threads():
    # torch 2.14's batched LU is wrong on a CPU with 2 threads from about 150x150 (pytorch/pytorch#142815);
    # solve_batched goes one matrix at a time there. Reference: one thread, one matrix at a time.
    X = torch.randn(4, 200, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Delta = X @ X.transpose(1, 2)  # float64: the two thread counts round differently, by far less than 1e-7
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        reference = torch.stack([mmcl.svm_dual_inv(D[None], INF, 0.1)[0] for D in Delta])
        torch.set_num_threads(2)
        torch.testing.assert_close(mmcl.svm_dual_inv(Delta, INF, 0.1), reference)
    finally:
        torch.set_num_threads(threads)


def test_tanh_kernel_is_not_positive_semi_definite():
    # Why tanh is refused with PGD and C = inf: on the same points, Delta + beta I is positive definite with the RBF
    # kernel and has negative eigenvalues with tanh (gamma 2), so g is not convex there.
    z = unit(33, 128, seed=6)
    rows = torch.zeros(1, dtype=torch.long)
    for kind, positive in (("rbf", True), ("tanh", False)):
        K = mmcl.kernel_matrix(z, z, kind, sigma2=1.0, gamma=2.0)
        Delta = mmcl.svm_delta(K, rows, torch.arange(1, 33).unsqueeze(0))[0]
        smallest = torch.linalg.eigvalsh(Delta + 0.1 * torch.eye(32, dtype=torch.float64))[0].item()
        assert (smallest > 0) == positive, (kind, smallest)


def test_pgd_iteration_cap_and_early_stop():
    Delta = random_deltas(3, 6, seed=3)
    _, iters = mmcl.svm_dual_pgd(Delta, 1.0, 7, 0.1, tol=0.0)
    assert iters.tolist() == [7, 7, 7]
    _, iters = mmcl.svm_dual_pgd(Delta, 1.0, 1000, 0.1, tol=1e-2)
    assert (iters < 1000).all()


# ---------------------------------------------------------------------------------------------------------------------
# Loss of Eq. (9), its gradient, and the SimCLR baseline
# ---------------------------------------------------------------------------------------------------------------------
def naive_mmcl_loss(z1, z2, kind, C, beta, negatives, fn_correction, sigma2=0.5):
    """Algorithm 1, one anchor at a time in float64, from the definitions: Delta by its formula, INV by an explicit
    inverse, loss = alpha^T (K(Y, z) - K(z+, z) 1). Returns the loss and the list of alphas."""
    kern = functools.partial(scalar_kernel, kind=kind, sigma2=sigma2)
    losses, alphas = [], []
    for k in range(len(z1)):
        others = [j for j in range(len(z1)) if j != k]
        Y = [z1[j] for j in others] + ([z2[j] for j in others] if negatives == "both" else [])
        Delta = torch.tensor([[kern(z1[k], z1[k]) + kern(a, b) - kern(z1[k], a) - kern(z1[k], b) for b in Y]
                              for a in Y], dtype=torch.float64)
        alpha = (2 * torch.linalg.inv(Delta + beta * torch.eye(len(Y), dtype=torch.float64)).sum(1)).clamp(0, C)
        if fn_correction:
            alpha[alpha == C] = 0
        margin = torch.tensor([kern(y, z2[k]) - kern(z1[k], z2[k]) for y in Y], dtype=torch.float64)
        losses.append(alpha @ margin)
        alphas.append(alpha)
    return sum(losses) / len(losses), alphas


@pytest.mark.parametrize("kind,C,negatives,fn", [("rbf", 100.0, "both", False), ("rbf", 0.5, "both", True),
                                                 ("tanh", INF, "both", False), ("linear", 2.0, "first", False),
                                                 ("rbf", 0.5, "first", True)])
def test_mmcl_loss_equals_a_naive_per_anchor_loop(kind, C, negatives, fn):
    z1, z2 = unit(6, 8, seed=1), unit(6, 8, seed=2)
    kernel = functools.partial(mmcl.kernel_matrix, kind=kind, sigma2=0.5)
    loss, info = mmcl.mmcl_loss(z1, z2, kernel, C, "inv", 0.1, negatives, fn)
    naive, alphas = naive_mmcl_loss(z1, z2, kind, C, 0.1, negatives, fn)
    assert loss.item() == pytest.approx(naive.item(), rel=1e-10)
    torch.testing.assert_close(info["alpha"], torch.stack(alphas))
    if fn:
        assert info["bound_frac"] > 0 and not (info["alpha"] == C).any()  # misclassified points were dropped


def test_no_gradient_flows_through_alpha():
    z1, z2 = unit(6, 8, seed=3).requires_grad_(), unit(6, 8, seed=4).requires_grad_()
    kernel = functools.partial(mmcl.kernel_matrix, kind="rbf", sigma2=0.5)
    loss, info = mmcl.mmcl_loss(z1, z2, kernel, 100.0, "inv")
    assert info["alpha"].grad_fn is None and not info["alpha"].requires_grad
    ours = torch.autograd.grad(loss, (z1, z2))
    # The same loss with alpha as a fixed constant: its gradient is ours.
    alpha = info["alpha"].clone()
    Z = torch.cat([z1, z2])
    idx = mmcl.negative_indices(6, torch.arange(6))
    k_z = kernel(z2, Z)
    fixed = (alpha * (k_z.gather(1, idx) - k_z.diagonal().unsqueeze(1))).sum(1).mean()
    for a, b in zip(ours, torch.autograd.grad(fixed, (z1, z2), retain_graph=True)):
        torch.testing.assert_close(a, b)
    # With alpha differentiated through Delta^-1 the gradient is different, so the check above has teeth.
    Delta = mmcl.svm_delta(kernel(Z, Z), torch.arange(6), idx) + 0.1 * torch.eye(10, dtype=torch.float64)
    alpha_grad = torch.linalg.solve(Delta, torch.full((6, 10, 1), 2.0, dtype=torch.float64)).squeeze(2)
    through = (alpha_grad * (k_z.gather(1, idx) - k_z.diagonal().unsqueeze(1))).sum(1).mean()
    assert not torch.allclose(ours[0], torch.autograd.grad(through, z1)[0])


def test_pgd_loss_matches_inv_when_solved_to_the_same_optimum():
    # With C = inf and a well-conditioned problem whose least-squares solution is positive, both solve the same QP.
    z1, z2 = unit(5, 8, seed=5), unit(5, 8, seed=6)
    kernel = functools.partial(mmcl.kernel_matrix, kind="rbf", sigma2=0.05)
    inv, info_inv = mmcl.mmcl_loss(z1, z2, kernel, INF, "inv")
    assert (info_inv["alpha"] > 0).all()
    pgd, info_pgd = mmcl.mmcl_loss(z1, z2, kernel, INF, "pgd", pgd_steps=5000, pgd_tol=1e-12)
    assert pgd.item() == pytest.approx(inv.item(), rel=1e-8)
    assert 0 < info_pgd["pgd_iters"] < 5000 and info_pgd["bound_frac"] == 0


def naive_nt_xent(z1, z2, t):
    Z, N, losses = torch.cat([z1, z2]), len(z1), []
    for i in range(2 * N):
        pos = (i + N) % (2 * N)
        logits = [(Z[i] @ Z[j]).item() / t for j in range(2 * N) if j != i]
        losses.append(math.log(sum(math.exp(x) for x in logits)) - (Z[i] @ Z[pos]).item() / t)
    return sum(losses) / len(losses)


def test_simclr_loss_is_nt_xent():
    z1, z2 = unit(5, 8, seed=7), unit(5, 8, seed=8)
    assert mmcl.simclr_loss(z1, z2, 0.5).item() == pytest.approx(naive_nt_xent(z1, z2, 0.5), rel=1e-10)


def test_sigma_schedule_and_milestones():
    assert engine.parse_config(mmcl.Config, []).sigma_milestones == (75, 125)
    assert engine.parse_config(mmcl.Config, ["--sigma-milestones", "50", "100"]).sigma_milestones == (50, 100)
    assert engine.parse_config(mmcl.Config, ["--sigma-milestones"]).sigma_milestones == ()  # constant bandwidth
    sig = [mmcl.sigma2_at(s, 10, 25.0, (75, 125), 10.0) for s in (0, 749, 750, 1249, 1250, 4000)]
    assert sig == pytest.approx([25.0, 25.0, 2.5, 2.5, 0.25, 0.25])


# ---------------------------------------------------------------------------------------------------------------------
# Distributed maths: two gloo processes, each with half the batch, against one process with all of it
# ---------------------------------------------------------------------------------------------------------------------
def _rank_losses(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    z1, z2 = unit(8, 6, seed=1), unit(8, 6, seed=2)
    mine = slice(rank * 4, rank * 4 + 4)
    results = {}
    for name in ("mmcl", "simclr"):
        a, b = z1[mine].clone().requires_grad_(), z2[mine].clone().requires_grad_()
        if name == "mmcl":
            torch.manual_seed(0)  # the PGD start, the same on every rank
            kernel = functools.partial(mmcl.kernel_matrix, kind="rbf", sigma2=0.5)
            loss, _ = mmcl.mmcl_loss(a, b, kernel, 1.0, "pgd", pgd_steps=200, pgd_tol=1e-3)
        else:
            loss = mmcl.simclr_loss(a, b, 0.5)
        loss.backward()
        results[name] = (common.all_reduce_mean(loss.detach()), a.grad, b.grad)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_give_the_one_process_loss_and_gradient(tmp_path):
    mp.spawn(_rank_losses, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    z1, z2 = unit(8, 6, seed=1).requires_grad_(), unit(8, 6, seed=2).requires_grad_()
    torch.manual_seed(0)
    kernel = functools.partial(mmcl.kernel_matrix, kind="rbf", sigma2=0.5)
    single = {"mmcl": mmcl.mmcl_loss(z1, z2, kernel, 1.0, "pgd", pgd_steps=200, pgd_tol=1e-3)[0],
              "simclr": mmcl.simclr_loss(z1, z2, 0.5)}
    for name, loss in single.items():
        g1, g2 = torch.autograd.grad(loss, (z1, z2))
        assert ranks[0][name][0].item() == pytest.approx(loss.item(), rel=1e-12)
        # Each rank's gradient is d(sum of the ranks' losses)/d(its rows); DDP's averaging divides by 2.
        torch.testing.assert_close(torch.cat([r[name][1] for r in ranks]) / 2, g1)
        torch.testing.assert_close(torch.cat([r[name][2] for r in ranks]) / 2, g2)


# ---------------------------------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------------------------------
@needs_cifar
def test_one_and_two_processes_agree_on_the_first_steps(tmp_path):
    # Same global batch of 32: one process with BN in 2 contiguous groups computes what 2 gloo ranks compute.
    args = [*SMALL_RUN, "--max-steps", "2", "--solver", "pgd", "--C", "1", "--sigma2", "0.5"]
    run_script("mmcl.py", *args, "--bn-splits", "2", "--out-dir", str(tmp_path / "one"))
    run_script("mmcl.py", *args, "--out-dir", str(tmp_path / "two"), nproc=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in ("loss", "sv_frac", "bound_frac", "pgd_iters"):
        assert one[0][key] == pytest.approx(two[0][key], rel=1e-5), key
        assert one[1][key] == pytest.approx(two[1][key], rel=1e-4), key
    assert 0 < one[0]["sv_frac"] <= 1 and 0 < one[0]["bound_frac"] and one[0]["pgd_iters"] >= 1
    assert "knn_top1" in one[-1] and "knn_top1" in two[-1]


@needs_cifar
def test_resume_continues_exactly(tmp_path, one_thread):
    # PGD draws its random start from the RNG every step, so this also checks that the RNG state is restored.
    args = [*SMALL_RUN, "--batch-size", "16", "--epochs", "1", "--knn-every", "0", "--solver", "pgd",
            "--pgd-steps", "50"]
    mmcl.main([*args, "--max-steps", "3", "--out-dir", str(tmp_path / "a")])
    mmcl.main([*args, "--max-steps", "6", "--out-dir", str(tmp_path / "a"),
               "--resume", str(tmp_path / "a" / "checkpoint.pt")])
    mmcl.main([*args, "--max-steps", "6", "--out-dir", str(tmp_path / "b")])
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["loss"] for r in read_metrics(tmp_path / "a") if "loss" in r] == \
           [r["loss"] for r in read_metrics(tmp_path / "b") if "loss" in r]


@pytest.mark.parametrize("flags", [["--augment", "cpu"], ["--precision", "bf16", "--channels-last", "on"]])
def test_data_paths_and_gpu_settings_run_on_the_cpu(tmp_path, flags):  # every path runs without a GPU
    mmcl.main(["--dataset", "synthetic", "--arch", "small", "--workers", "0", "--batch-size", "16", "--max-steps", "2",
               "--epochs", "1", "--knn-bank-size", "64", "--knn-test-size", "32", "--log-every", "1",
               "--out-dir", str(tmp_path), *flags])
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)


@needs_cifar
def test_short_cpu_runs_of_mmcl_and_simclr_learn_on_real_images(tmp_path):
    """kNN top-1 on CIFAR-10 JPEGs (16 px, for speed) after 80 steps of MMCL and of SimCLR, trained side by side on
    the two cores, is clearly above the same encoder at random init."""
    args = ["--dataset", "folder", "--data-root", str(CIFAR_JPG), "--arch", "small", "--workers", "0",
            "--image-size", "16", "--batch-size", "64", "--epochs", "1", "--max-steps", "80", "--sigma2", "1",
            "--knn-bank-size", "2000", "--knn-test-size", "1000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    runs = {loss: subprocess.Popen([sys.executable, str(ROOT / "mmcl.py"), *args, "--loss", loss, "--out-dir",
                                    str(tmp_path / loss)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True) for loss in ("mmcl", "simclr")}
    cfg = engine.parse_config(mmcl.Config, args)
    data = common.load_image_data(cfg.dataset, cfg.data_root, cfg.image_size)
    common.seed_everything(cfg.seed)
    untrained = mmcl.MMCL(cfg, bn_splits=1)  # what both runs start from
    before = common.KnnMonitor(data, cfg.knn_bank_size, cfg.knn_test_size, 200, 0.1, 0, torch.device("cpu"))(
        untrained.encoder.backbone)
    for loss, proc in runs.items():
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    after = {loss: read_metrics(tmp_path / loss)[-1]["knn_top1"] for loss in runs}
    print(f"kNN top-1: random init {before:.1f}%, after 80 steps MMCL {after['mmcl']:.1f}%, "
          f"SimCLR {after['simclr']:.1f}%")
    assert after["mmcl"] > before + 3.0 and after["simclr"] > before + 3.0


@pytest.mark.parametrize("args,message", [
    (["--C", "0"], "--C: 0.0 is out of range (must be > 0)"),
    (["--C", "nan"], "--C: nan is out of range"),
    (["--beta", "-1"], "--beta: -1.0 is out of range"),
    (["--sigma2", "0"], "--sigma2: 0.0 is out of range"),
    (["--sigma-decay", "inf"], "--sigma-decay: inf is out of range"),
    (["--sigma-milestones", "75,125"], "--sigma-milestones: invalid int value: '75,125'"),
    (["--sigma-milestones", "75", "-1"], "--sigma-milestones: 75 -1 is out of range (must be each >= 0)"),
    (["--pgd-steps", "0"], "--pgd-steps: 0 is out of range"),
    (["--temperature", "0"], "--temperature: 0.0 is out of range"),
    (["--batch-size", "1"], "at least 2 images"),
    (["--batch-size", "5000"], "larger than the dataset"),
    (["--resume", "/nonexistent/checkpoint.pt"], "does not exist"),
])
def test_bad_values_give_one_clear_error(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as error:
        mmcl.main(["--dataset", "synthetic", "--arch", "small", *args, "--out-dir", str(tmp_path / "run")])
    line = error_line(error, capsys)
    assert line.startswith("error:") and message in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args,message", [(["--solver", "cvx"], "invalid choice"),
                                          (["--C", "large"], "invalid float value"),
                                          (["--negatives", "all"], "invalid choice")])
def test_bad_flags_are_refused_with_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as error:
        mmcl.main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert error.value.code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]


def test_tanh_with_pgd_and_no_cap_is_refused_at_parse_time(tmp_path):
    # The combination that diverges is refused before any data is read: exit 1, one line on stderr, no traceback.
    result = run_script("mmcl.py", "--dataset", "synthetic", "--kernel", "tanh", "--solver", "pgd", "--C", "inf",
                        "--out-dir", str(tmp_path / "run"), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: --kernel tanh --solver pgd needs a finite --C") and "Traceback" not in lines[0]
    assert not (tmp_path / "run").exists()
    # The rest is allowed (documented in --kernel's help): a finite C, or INV, or SimCLR's loss.
    for args in (["--C", "100", "--solver", "pgd"], ["--C", "inf", "--solver", "inv"],
                 ["--C", "inf", "--solver", "pgd", "--loss", "simclr"]):
        engine.parse_config(mmcl.Config, ["--kernel", "tanh", *args])


def test_a_bad_value_exits_nonzero_with_one_stderr_line(tmp_path):
    result = run_script("mmcl.py", "--dataset", "synthetic", "--C", "-1", "--out-dir", str(tmp_path / "run"),
                        check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: argument --C: -1.0 is out of range (must be > 0) (see --help)"
