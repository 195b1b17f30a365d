"""MMCL: Max-Margin Contrastive Learning, whose negatives are the support vectors of a kernel SVM (with SimCLR as
the baseline in the same script).

Paper: Anshul Shah, Suvrit Sra, Rama Chellappa, Anoop Cherian, "Max-Margin Contrastive Learning", AAAI 2022
(../shared/papers/mmcl_max_margin_contrastive.txt). For every anchor image, an SVM separates one view z+ of it from
the views Y of the other images of the batch; its dual variables alpha weigh the negatives (zero for easy ones,
C for misclassified ones), and the loss of Eq. (9) pushes the anchor's other view z to the z+ side of that hyperplane.
Proposition 1 reduces each SVM to a box-constrained QP in alpha_Y alone,
    min_{0 <= a <= C} g(a) = 1/2 a^T Delta a - 2 a^T 1,   Delta = k_xx 11^T + K_YY - k_xY 1^T - 1 k_xY^T (+ beta I),
solved approximately by truncated least squares (INV, a = clip(2 Delta^-1 1, 0, C)) or projected gradient (PGD).

Algorithm 1 (MMCL), batched over all anchors at once, as implemented here (line numbers are cited in the code):
     1  x+, x = t1(B), t2(B)                             # two views of N images          (AugmentedViews, MultiView)
     2  z+, z = norm(f(x+)), norm(f(x))                  # NxD each, gathered with grad   (MMCL.forward, mmcl_loss)
     3  Y_k = views of the other images                  # n = 2N-2 per anchor k          (negative_indices)
     4  k_xx, k_xY, K_YY = K(z+_k, z+_k), K(z+_k, Y_k), K(Y_k, Y_k)  # Table 6 kernels   (kernel_matrix)
     5  Delta_k = k_xx 11^T + K_YY - k_xY 1^T - 1 k_xY^T # Prop. 1, Bxnxn for B anchors   (svm_delta)
     6  alpha_k = argmin_{0<=a<=C} g(a) on Delta_k + beta I, by INV or PGD, no gradient    (svm_dual_inv, _pgd)
     7  alpha_k[alpha_k == C] = 0                        # optional false-negative fix    (mmcl_loss)
     8  loss += alpha_k^T (K(Y_k, z_k) - K(z+_k, z_k) 1) # Eq. (9)                        (mmcl_loss)
     9  loss.backward(); Adam step                       #                                (train_step)
    10  sigma^2 /= 10 at the milestone epochs            # CIFAR-100 recipe               (sigma2_at)
--loss simclr replaces lines 3-8 by SimCLR's NT-Xent (Eq. 1) over the same gathered batch: the paper's baseline.

Where the paper and its public code (anshulbshah/MMCL, ../shared/papers/README.md) differ, and what I follow:
- Negatives: Algorithm 1 uses both views of the other images (2N-2); the public code uses their first views only
  (N-1). I follow the paper; --negatives first gives the code's choice.
- Delta: Prop. 1 writes 11^T, which is k_xx 11^T with k_xx = K(z+, z+) = 1 (RBF, linear on unit vectors). The proof
  gives k_xx 11^T for any kernel, which I use (k_xx = tanh(gamma + eta) for tanh). But tanh is not a positive
  semi-definite kernel: Delta + beta I can have negative eigenvalues, g is then not convex, INV returns a stationary
  point and PGD with a finite C a local minimum of the box. With C = inf nothing bounds PGD (max alpha 1e67 after
  1000 iterations at gamma 5), so --kernel tanh --solver pgd --C inf is refused when the flags are parsed.
- RBF bandwidth: I write K = exp(-||x-y||^2 / (2 sigma^2)) (Table 6) and --sigma2 is that sigma^2. The CIFAR-100
  recipe "sigma^2 = 0.02, times 10 at epochs 75 and 125" is, in the public code, K = exp(-||x-y||^2 / 50) divided
  down to /5 and /0.5: the coefficient 1/(2 sigma^2) grows 0.02 -> 0.2 -> 2, i.e. sigma^2 = 25 -> 2.5 -> 0.25,
  my defaults (--sigma2 25 --sigma-milestones 75 125 --sigma-decay 10): the kernel sharpens as features improve.
- tanh kernel: Table 6 prints tanh(-gamma x.y + eta); the code computes tanh(gamma x.y). I use tanh(gamma x.y + eta)
  with eta = 0 by default, the code's kernel (a minus sign would rank the closest points as the least similar).
- PGD (appendix "PGD Solver"): Nesterov-accelerated, alpha restarted at random before every step (relu of a
  Gaussian, as the code; drawn for the whole global batch from the seeded RNG, so the same at any world size and on
  resume), at most 1000 steps, "a step size of 0.001 and optionally 1/||Delta||_2". The paper gives no stopping
  rule; the public code stops the whole batch at the first iteration where the mean over all entries of
  |a_m - a_m-1| / (a_m-1 + 1e-7) is below 1e-2, the default here (--pgd-stop batch; under torchrun one scalar
  all-reduce per iteration keeps the mean global). --pgd-stop anchor stops each anchor on its own when
  ||a_m - a_m-1|| <= tol ||a_m-1||: a batch then gives exactly what a loop over anchors gives, with no
  communication. I use FISTA's momentum sequence (t_1 = 1; the code starts it at a random number) and a step of
  1/(||Delta||_F + beta) (the Frobenius norm is what the code's torch.norm(p=2, dim=(1,2)) computes; it bounds
  lambda_max); --pgd-step 1e-3 gives the paper's fixed step, which at sigma^2 25 is far below 1/lambda_max, so PGD
  stops long before the optimum (`python benchmark.py mmcl` prints how far each rule and step stop).
- Loss scale: Algorithm 1 sums over anchors, the code averages; I average (Adam is insensitive to the scale).
- C = inf is --C inf (the code's C = -1). beta = 0.1 (Practical considerations) is --beta.
- Defaults for CIFAR follow the paper's small-dataset recipe: batch 256, Adam lr 1e-3 (weight decay 1e-6, constant
  lr, as the code), 400 epochs, RBF with the CIFAR-100 bandwidth schedule, C = 100, INV (the better variant on
  CIFAR-100 and STL-10, Table 8). The backbone is ResNet-18 with the 3x3 stem (the code uses a ResNet-50 there).
  SimCLR's temperature is 0.5, as in the CIFAR code MMCL builds on (HCL).

Run:
    python mmcl.py                                                 # CIFAR-10 (downloaded), ResNet-18, MMCL-INV
    python mmcl.py --solver pgd                                    # MMCL-PGD (the public code's stopping rule)
    python mmcl.py --solver pgd --pgd-step 1e-3                    # ... with the paper's fixed step
    python mmcl.py --loss simclr                                   # the SimCLR baseline, same pipeline
    python mmcl.py --augment cpu                                   # PIL in loader workers (default: device)
    python mmcl.py --dataset folder --data-root ../shared/data/cifar10-jpg --arch small --workers 2   # CPU
    torchrun --nproc_per_node=4 mmcl.py --batch-size 256           # 4 GPUs (global batch 256), or 4 CPU processes
    python engine.py probe runs/mmcl/checkpoint.pt                 # linear probe of the saved backbone

Results (what reproduces at CPU scale, what needs a GPU, with commands, commits and machines): RESULTS.md.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import engine
from engine import NON_NEGATIVE, POSITIVE, at_least, greater_than, option

# ---------------------------------------------------------------------------------------------------------------------
# Kernels (Table 6), the SVM dual of Proposition 1 and its two solvers
# ---------------------------------------------------------------------------------------------------------------------
KERNELS = ("rbf", "tanh", "linear")


def kernel_matrix(x: torch.Tensor, y: torch.Tensor, kind: str, sigma2: float = 1.0, gamma: float = 1.0,
                  eta: float = 0.0) -> torch.Tensor:
    """K(x_i, y_j) for the rows of x: PxD and y: QxD, both L2-normalized -> PxQ (Table 6).

    rbf: exp(-||x - y||^2 / (2 sigma^2)), which on unit vectors is exp((x.y - 1) / sigma^2);
    tanh: tanh(gamma x.y + eta); linear: x.y.
    """
    dot = x @ y.T  # PxQ
    if kind == "rbf":
        return torch.exp((dot - 1.0) / sigma2)
    if kind == "tanh":
        return torch.tanh(gamma * dot + eta)
    if kind == "linear":
        return dot
    raise ValueError(f"unknown kernel '{kind}' (choose from {', '.join(KERNELS)})")


def negative_indices(num_images: int, anchors: torch.Tensor, negatives: str = "both") -> torch.Tensor:
    """Anchor k's negatives Y_k as rows of Z = [z+ of the N images; z of the N images] (2NxD). Alg. 1 line 3.

    anchors: B image indices in [0, N). both: the 2N-2 views of the other images (Algorithm 1);
    first: the N-1 first views z+ of the other images (the public code). Returns Bxn, each row ascending.
    """
    columns = 2 * num_images if negatives == "both" else num_images
    rows = torch.arange(len(anchors), device=anchors.device)
    keep = torch.ones(len(anchors), columns, dtype=torch.bool, device=anchors.device)  # Bx2N or BxN
    keep[rows, anchors] = False  # the anchor's own z+ is the SVM's positive, not a negative
    if negatives == "both":
        keep[rows, anchors + num_images] = False  # nor is its own z, the point the loss classifies
    all_columns = torch.arange(columns, device=anchors.device).expand(len(anchors), columns)
    return all_columns[keep].view(len(anchors), -1)  # Bxn


def svm_delta(K: torch.Tensor, anchors: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Delta of Proposition 1 for every anchor at once (Alg. 1 line 5), without the beta I the solvers add.

    K: 2Nx2N kernel between all views (rows of Z); anchors: B rows of Z that are the SVM positives z+;
    negatives: Bxn rows of Z that are each anchor's Y. Returns Bxnxn with
        Delta_k = k_xx 11^T + K_YY - k_xY 1^T - 1 k_xY^T.
    This is the SVM dual of [z+, Y] with alpha_x = 1^T alpha_Y substituted (the equality constraint of Eq. 7).
    """
    n = negatives.shape[1]
    k_xx = K[anchors, anchors]  # B: K(z+, z+)
    k_xY = K[anchors.unsqueeze(1), negatives]  # Bxn: K(z+, Y)
    # K_YY: Bxnxn. Gather rows, then columns: indexing K with a Bxnxn pair of indices would build int64 index
    # tensors twice the size of the result.
    delta = K[negatives].gather(2, negatives.unsqueeze(1).expand(-1, n, -1))
    return delta.sub_(k_xY.unsqueeze(2)).sub_(k_xY.unsqueeze(1)).add_(k_xx.view(-1, 1, 1))


@torch.no_grad()
def svm_dual_inv(Delta: torch.Tensor, C: float, beta: float) -> torch.Tensor:
    """MMCL_INV, Proposition 1 (iii): alpha = clip(2 (Delta + beta I)^-1 1, 0, C), one batched linear solve.

    Delta: Bxnxn -> alpha: Bxn. The unconstrained minimizer of g, truncated to the box; C may be inf. With a kernel
    that is not positive semi-definite (tanh) the solve returns a stationary point of g that need not be a minimum.
    """
    n = Delta.shape[-1]
    A = Delta + beta * torch.eye(n, dtype=Delta.dtype, device=Delta.device)  # Bxnxn
    two = torch.full(Delta.shape[:-1] + (1,), 2.0, dtype=Delta.dtype, device=Delta.device)  # Bxnx1
    return solve_batched(A, two).squeeze(-1).clamp(0.0, C)  # Bxn


def solve_batched(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.linalg.solve(A, b) for A: Bxnxn, b: Bxnx1, one matrix at a time on a CPU with several threads.

    There torch's batched LU runs one MKL factorization per thread at once, and MKL's row swaps are not safe to run
    that way: measured on torch 2.14.1 with 2 threads, 4 matrices of 200x200 (or 256 of 510x510, MMCL's default
    batch) come back wrong, with an MKL error line or without a word (pytorch/pytorch#142815). One matrix at a time
    lets MKL use the threads inside each factorization instead. GPUs and single-threaded CPUs keep the batched call.
    """
    if A.device.type == "cpu" and torch.get_num_threads() > 1:
        return torch.stack([torch.linalg.solve(a, r) for a, r in zip(A, b)])
    return torch.linalg.solve(A, b)


PGD_STOP_RULES = ("batch", "anchor")


@torch.no_grad()
def svm_dual_pgd(Delta: torch.Tensor, C: float, steps: int, beta: float = 0.1, step_size: float = 0.0,
                 tol: float = 1e-2, alpha0: torch.Tensor | None = None,
                 stop: str = "batch") -> tuple[torch.Tensor, torch.Tensor]:
    """MMCL_PGD, Proposition 1 (ii) with Nesterov momentum (appendix "PGD Solver"), batched over anchors.

    Minimizes g(a) = 1/2 a^T (Delta + beta I) a - 2 a^T 1 over 0 <= a <= C (C may be inf) for each of the B
    problems in Delta: Bxnxn. step_size 0 takes 1/(||Delta||_F + beta) per anchor (at most 1/L, L the largest
    eigenvalue of Delta + beta I, so the step never overshoots); alpha0: Bxn start (zeros if None). It stops
    (tol 0: never, all `steps` run) by one of two rules:
      batch:  the public code's. Every anchor stops at the first iteration m where the mean, over every entry of
              the global batch, of |a_m - a_m-1| / (a_m-1 + 1e-7) is below tol. An entry that leaves 0 counts as a
              change of about 1e7, so a short fixed step does not stop while alphas are still being switched on.
              Under torchrun the mean covers all ranks' anchors (one all-reduce of a scalar per iteration), as the
              public code solves every anchor of the global batch on every GPU.
      anchor: each anchor stops on its own when ||a_m - a_m-1|| <= tol ||a_m-1||, so a batch gives exactly what a
              loop over anchors gives, with no communication; with a fixed step of 1e-3 it can stop after one
              iteration far from the optimum (benchmark.py mmcl prints how far each rule stops).
    Returns alpha: Bxn and the iterations each anchor used: B (int).
    """
    B, n = Delta.shape[:2]
    if step_size > 0:
        eta = torch.full((B, 1), step_size, dtype=Delta.dtype, device=Delta.device)
    else:
        # ||Delta + beta I||_2 <= ||Delta||_F + beta: the Frobenius norm (what the code's torch.norm computes)
        # bounds the largest eigenvalue, the gradient's Lipschitz constant, at the cost of one pass over Delta.
        eta = 1.0 / (torch.linalg.matrix_norm(Delta).unsqueeze(1) + beta)  # Bx1
    alpha = torch.zeros(B, n, dtype=Delta.dtype, device=Delta.device) if alpha0 is None else alpha0.clamp(0.0, C)
    y = alpha  # Bxn, the extrapolated point where the gradient is taken
    t = 1.0  # FISTA's momentum sequence
    active = torch.ones(B, 1, dtype=torch.bool, device=Delta.device)  # anchors not yet stopped
    iterations = torch.zeros(B, dtype=torch.long, device=Delta.device)
    for _ in range(steps):
        grad = torch.bmm(Delta, y.unsqueeze(2)).squeeze(2) + beta * y - 2.0  # Bxn: (Delta + beta I) y - 2
        new = (y - eta * grad).clamp(0.0, C)  # projection onto the box [0, C]^n
        t_next = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        if stop == "batch":  # one number for the whole global batch: all anchors go on, or all stop
            change = common.all_reduce_mean(((new - alpha) / (alpha + 1e-7)).abs().mean())
            go_on = (change >= tol).expand(B, 1)
        elif stop == "anchor":
            change = (new - alpha).norm(dim=1, keepdim=True) / alpha.norm(dim=1, keepdim=True).clamp_min(1e-12)
            go_on = change > tol
        else:
            raise ValueError(f"unknown PGD stopping rule '{stop}' (choose from {', '.join(PGD_STOP_RULES)})")
        iterations += active.squeeze(1)
        y = torch.where(active, new + (t - 1.0) / t_next * (new - alpha), alpha)
        alpha = torch.where(active, new, alpha)  # stopped anchors keep their alpha
        t = t_next
        active &= go_on
        if not active.any():
            break
    return alpha, iterations


@torch.no_grad()
def svm_dual_exact(Delta: torch.Tensor, C: float, beta: float, tol: float = 1e-9, rounds: int = 50) -> torch.Tensor:
    """The exact minimizer of g over the box, to measure how far INV and PGD stop from it (benchmark.py mmcl, tests).

    Delta: Bxnxn -> alpha: Bxn, float64. Needs Delta + beta I positive definite (RBF or linear kernel, beta > 0), so
    the minimizer is unique. Long PGD runs find which coordinates sit at 0 and at C; the free ones are then solved
    exactly, and the result is returned only once it is feasible and satisfies the KKT conditions (gradient >= 0
    where alpha = 0, <= 0 where alpha = C, 0 in between; all to tol), which certify the optimum of a convex QP.
    """
    A = Delta.double() + beta * torch.eye(Delta.shape[-1], dtype=torch.float64, device=Delta.device)  # Bxnxn
    alpha = torch.zeros(Delta.shape[:2], dtype=torch.float64, device=Delta.device)
    for _ in range(rounds):
        alpha, _ = svm_dual_pgd(Delta.double(), C, 2000, beta, tol=1e-13, alpha0=alpha, stop="anchor")
        exact = torch.zeros_like(alpha)
        for k in range(len(A)):  # the free coordinates' linear system, one anchor at a time
            upper, free = alpha[k] >= C, (alpha[k] > 0) & (alpha[k] < C)
            exact[k, upper] = C
            if free.any():
                rhs = 2.0 - A[k][free][:, upper] @ exact[k, upper]
                exact[k, free] = torch.linalg.solve(A[k][free][:, free], rhs)
        grad = torch.bmm(A, exact.unsqueeze(2)).squeeze(2) - 2.0  # Bxn
        at_zero, at_c = exact <= 0, exact >= C
        kkt = torch.where(at_zero, grad >= -tol, torch.where(at_c, grad <= tol, grad.abs() <= tol))
        if kkt.all() and (exact >= 0).all() and (exact <= C).all():
            return exact
    raise RuntimeError(f"svm_dual_exact: no KKT point after {rounds} rounds (is Delta + beta I positive definite?)")


def mmcl_loss(z1: torch.Tensor, z2: torch.Tensor, kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              C: float, solver: str, beta: float = 0.1, negatives: str = "both", fn_correction: bool = False,
              pgd_steps: int = 1000, pgd_step: float = 0.0, pgd_tol: float = 1e-2,
              pgd_stop: str = "batch") -> tuple[torch.Tensor, dict]:
    """The MMCL loss of Eq. (9) for this rank's anchors against the negatives of the whole global batch.

    z1: BxD the views z+ that train the SVMs, z2: BxD the views z that the loss classifies (L2-normalized; this
    rank's B images of a global batch of N). kernel(X, Y) -> K (e.g. functools.partial(kernel_matrix, kind="rbf")).
    solver: 'inv' or 'pgd'. Returns the mean over anchors of alpha^T (K(Y, z) - K(z+, z) 1), and solver statistics
    (alpha: Bxn, detached; fractions of support vectors and of alphas at the bound C; PGD iterations per anchor).

    No gradient flows through alpha (Practical considerations): through Delta^-1 the gradient could raise the
    margin by making Delta ill-conditioned instead of separating the points, and the paper found that it stops
    learning. So alpha is a constant weight on each negative, and only the kernel values of line 8 are trained.
    """
    B = z1.shape[0]
    # Line 2. Every rank sees the whole global batch of views as candidates; gradients flow back to the rank that
    # encoded them (common.gather_with_grad), so the sum over ranks is one big batch's gradient.
    Z = torch.cat([common.gather_with_grad(z1), common.gather_with_grad(z2)])  # Z: 2NxD = [z+ of all; z of all]
    N = Z.shape[0] // 2
    anchors = common.rank() * B + torch.arange(B, device=Z.device)  # this rank's images in the global batch
    Y = negative_indices(N, anchors, negatives)  # Y: Bxn rows of Z, each anchor's negatives, line 3
    n = Y.shape[1]
    with torch.no_grad():  # lines 4-7: alpha is a constant of the loss
        Delta = svm_delta(kernel(Z, Z), anchors, Y)  # Delta: Bxnxn, lines 4-5
        stats = {}
        if solver == "inv":
            alpha = svm_dual_inv(Delta, C, beta)  # alpha: Bxn, line 6
        elif solver == "pgd":
            # The appendix restarts alpha at random before every step; drawing the start for the whole global batch
            # and keeping my rows makes it independent of how many processes share the batch.
            alpha0 = torch.randn(N, n, dtype=Z.dtype, device=Z.device).relu_()[anchors]  # Bxn
            alpha, iterations = svm_dual_pgd(Delta, C, pgd_steps, beta, pgd_step, pgd_tol, alpha0, pgd_stop)  # l. 6
            stats["pgd_iters"] = iterations.float().mean()
        else:
            raise ValueError(f"unknown solver '{solver}' (choose inv or pgd)")
        at_bound = alpha == C  # misclassified points (never, for C = inf)
        stats.update(sv_frac=(alpha > 0).float().mean(), bound_frac=at_bound.float().mean())
        if fn_correction:
            alpha = alpha.masked_fill(at_bound, 0.0)  # line 7: points inside the margin may be false negatives
    k_z = kernel(z2, Z)  # Bx2N: K(z_k, every view), with gradient
    k_Yz = k_z.gather(1, Y)  # Bxn: K(Y_k, z_k)
    k_xz = k_z[torch.arange(B, device=Z.device), anchors]  # B: K(z+_k, z_k)
    loss = (alpha * (k_Yz - k_xz.unsqueeze(1))).sum(1).mean()  # line 8, Eq. (9)
    return loss, {"alpha": alpha, **stats}


def simclr_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent (Eq. 1 with g = exp(cos / t)) for this rank's 2B anchors against the global batch.

    z1, z2: BxD, L2-normalized views of this rank's B images. Each view's positive is the other view of its
    image; its negatives are the 2N-2 views of the other images, the same candidates MMCL's SVMs see.
    """
    B = z1.shape[0]
    Z = torch.cat([common.gather_with_grad(z1), common.gather_with_grad(z2)])  # Z: 2NxD, gradients flow back
    N = Z.shape[0] // 2
    mine = common.rank() * B + torch.arange(B, device=Z.device)  # my images' rows among the first views
    rows = torch.cat([mine, mine + N])  # 2B: my anchors' own rows of Z
    logits = torch.cat([z1, z2]) @ Z.T / temperature  # logits: 2Bx2N
    logits = logits.masked_fill(F.one_hot(rows, 2 * N).bool(), float("-inf"))  # a view is not its own negative
    return F.cross_entropy(logits, torch.cat([mine + N, mine]))  # positive: the other view of the same image


# ---------------------------------------------------------------------------------------------------------------------
# Config: every field is a flag (`sigma_milestones` -> `--sigma-milestones`); help and default live here only
# ---------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config(engine.ImageRunConfig):
    """MMCL's and SimCLR's options; the data, run and kNN options every image script shares are in
    engine.ImageRunConfig."""
    seed: int = option(0, "random seed (model init, data order, augmentations, PGD starts)", check=NON_NEGATIVE)
    # encoder
    dim: int = option(128, "feature dimension D of the contrastive space", check=at_least(1))
    mlp: bool = option(True, "MLP projection head (--no-mlp: a linear head)")
    bn_splits: int = option(1, "BatchNorm groups per view on one device (SplitBatchNorm imitates that many GPUs); "
                               "under torchrun each process is one group", check=at_least(1))
    # loss
    loss: str = option("mmcl", "'mmcl': the SVM loss of Eq. (9); 'simclr': NT-Xent, the paper's baseline",
                       choices=("mmcl", "simclr"))
    temperature: float = option(0.5, "SimCLR softmax temperature (--loss simclr only)", check=POSITIVE)
    negatives: str = option("both", "negatives per anchor: 'both' views of the other images (2N-2, Algorithm 1) "
                                    "or their 'first' views (N-1, the public code)", choices=("both", "first"))
    kernel: str = option("rbf", "SVM kernel (Table 6); tanh is not positive semi-definite: the SVM dual is then "
                                "not convex (INV returns a stationary point, PGD a local minimum; refused with "
                                "--solver pgd --C inf, where it diverges)", choices=KERNELS)
    sigma2: float = option(25.0, "RBF bandwidth sigma^2 in exp(-||x-y||^2 / (2 sigma^2)) at the start", check=POSITIVE)
    sigma_milestones: tuple[int, ...] = option((75, 125), "epochs at which sigma^2 is divided by --sigma-decay "
                                                          "(none: a constant bandwidth)",
                                               check=engine.each(NON_NEGATIVE))
    sigma_decay: float = option(10.0, "factor sigma^2 is divided by at each milestone", check=POSITIVE)
    tanh_gamma: float = option(1.0, "tanh kernel scale gamma in tanh(gamma x.y + eta)")
    tanh_eta: float = option(0.0, "tanh kernel offset eta")
    C: float = option(100.0, "SVM slack penalty C, the upper bound on alpha ('inf': hard margin)",
                      check=greater_than(0, allow_inf=True))
    beta: float = option(0.1, "ridge beta added to Delta's diagonal (Practical considerations)", check=NON_NEGATIVE)
    solver: str = option("inv", "SVM dual solver: 'inv' truncated least squares, 'pgd' projected gradient",
                         choices=("inv", "pgd"))
    pgd_steps: int = option(1000, "maximum PGD iterations", check=at_least(1))
    pgd_step: float = option(0.0, "PGD step size; 0: 1/(||Delta||_F + beta) per anchor, at most 1/lambda_max (the "
                                  "paper and the public configs use a fixed 1e-3, or 1/||Delta||_2)",
                             check=NON_NEGATIVE)
    # The paper gives no stopping rule; the public code's is the default, so PGD runs as it did for the paper's numbers.
    pgd_stop: str = option("batch", "when PGD stops: 'batch' (the public code) when the global batch's mean of "
                                    "|a_m - a_m-1| / (a_m-1 + 1e-7) is below --pgd-tol; 'anchor': each anchor when "
                                    "||a_m - a_m-1|| <= tol ||a_m-1||", choices=PGD_STOP_RULES)
    pgd_tol: float = option(1e-2, "PGD stopping tolerance of --pgd-stop (0: run all --pgd-steps)",
                            check=NON_NEGATIVE)
    fn_correction: bool = option(False, "false-negative correction: alpha[alpha == C] = 0 (appendix)")
    # optimization
    epochs: int = option(400, "training epochs", check=at_least(1))
    batch_size: int = option(256, "global batch size N (split evenly over processes)", check=at_least(1))
    lr: float = option(1e-3, "Adam learning rate", check=NON_NEGATIVE)
    weight_decay: float = option(1e-6, "Adam weight decay", check=NON_NEGATIVE)
    cosine: bool = option(False, "cosine-decay the learning rate to 0 (the paper's CIFAR/STL recipe keeps it)")

    def __post_init__(self):
        # Checked when the flags are parsed, before any data is read. With tanh, Delta + beta I has negative
        # eigenvalues, so g is unbounded below along them: without the box's upper side PGD follows them off to
        # infinity (measured: alpha 1e67 after 1000 iterations at gamma 5). A finite C keeps it bounded.
        if self.loss == "mmcl" and self.kernel == "tanh" and self.solver == "pgd" and math.isinf(self.C):
            common.fail("--kernel tanh --solver pgd needs a finite --C: tanh is not positive semi-definite, so the "
                        "SVM dual is unbounded below and PGD diverges (use --C 100, or --kernel rbf)")


def sigma2_at(step: int, steps_per_epoch: int, sigma2: float, milestones: tuple[int, ...], decay: float) -> float:
    """The RBF bandwidth sigma^2 at a global step (Alg. 1 line 10): divided by `decay` at each milestone epoch
    passed, so the kernel sharpens as the features spread out (CIFAR-100 recipe, Hyperparameters)."""
    epoch = step // steps_per_epoch
    return sigma2 / decay ** sum(epoch >= m for m in milestones)


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------
class MMCL(nn.Module):
    """One encoder f (backbone + projection head) and the loss: MMCL has no key encoder, queue or bank."""

    def __init__(self, cfg: Config, bn_splits: int):
        super().__init__()
        self.cfg = cfg
        self.encoder = common.Encoder(common.build_backbone(cfg.arch, cfg.stem, bn_splits), cfg.dim, cfg.mlp)

    def forward(self, views: list[torch.Tensor], sigma2: float) -> tuple[torch.Tensor, dict]:
        """views: two NxCxHxW batches (x+, x). Returns the loss and the solver's statistics (empty for SimCLR)."""
        cfg = self.cfg
        x1, x2 = views
        # Each view is encoded on its own, so BatchNorm statistics are per view (as the public code does).
        z1 = F.normalize(self.encoder(x1).float(), dim=1)  # z+: NxD, Alg. 1 line 2
        z2 = F.normalize(self.encoder(x2).float(), dim=1)  # z: NxD
        with torch.autocast(z1.device.type, enabled=False):  # kernels and the SVM in fp32
            if cfg.loss == "simclr":
                return simclr_loss(z1, z2, cfg.temperature), {}
            kernel = functools.partial(kernel_matrix, kind=cfg.kernel, sigma2=sigma2, gamma=cfg.tanh_gamma,
                                       eta=cfg.tanh_eta)
            return mmcl_loss(z1, z2, kernel, cfg.C, cfg.solver, cfg.beta, cfg.negatives, cfg.fn_correction,
                             cfg.pgd_steps, cfg.pgd_step, cfg.pgd_tol, cfg.pgd_stop)


def train_step(model: MMCL, ddp_model: nn.Module, optimizer: torch.optim.Optimizer, views: list[torch.Tensor],
               step: int, steps_per_epoch: int, total_steps: int) -> dict:
    """One step of Algorithm 1 at a global step; returns what gets logged, the loss and the solver's figures as
    device tensors (read on the host only at log steps)."""
    cfg = model.cfg
    lr = common.cosine_lr(step, total_steps, cfg.lr) if cfg.cosine else cfg.lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    sigma2 = sigma2_at(step, steps_per_epoch, cfg.sigma2, cfg.sigma_milestones, cfg.sigma_decay)  # line 10
    with common.autocast(views[0].device, cfg.precision):
        loss, solver = ddp_model(views, sigma2)  # lines 1-8
    optimizer.zero_grad(set_to_none=True)
    loss.backward()  # line 9
    optimizer.step()
    names = [k for k in ("sv_frac", "bound_frac", "pgd_iters") if k in solver]
    # One all-reduce for everything logged; every rank has as many anchors, so the mean is the global batch's.
    values = common.all_reduce_mean(torch.stack([loss.detach(), *(solver[k] for k in names)]))
    stats = {"loss": values[0], "lr": lr, **dict(zip(names, values[1:]))}
    if cfg.loss == "mmcl":
        stats["sigma2"] = sigma2
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# Training loop (the same skeleton in every method script)
# ---------------------------------------------------------------------------------------------------------------------
def check_config(cfg: Config, num_images: int) -> None:
    engine.check_batch_size(cfg.batch_size, num_images, cfg.bn_splits)
    if cfg.batch_size < 2:
        common.fail(f"--batch-size {cfg.batch_size}: contrastive learning needs at least 2 images (negatives)")


def main(argv: list[str] | None = None) -> None:
    cfg = engine.parse_config(Config, argv, __doc__)
    run = engine.Run(cfg)
    data = common.load_image_data(cfg.dataset, cfg.data_root, cfg.image_size)
    check_config(cfg, len(data.pretrain))
    cfg.settle(data)

    common.seed_everything(cfg.seed)  # same seed on every rank: identical initial encoders and PGD starts
    model = run.place(MMCL(cfg, bn_splits=cfg.bn_splits if common.world_size() == 1 else 1))
    optimizer = torch.optim.Adam(model.encoder.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run.start(model, {"encoder": optimizer}, model.encoder.backbone)
    ddp_model = run.distributed(model)  # BatchNorm statistics stay per rank, as per GPU in the paper's runs

    sampler = common.EpochSampler(len(data.pretrain), cfg.batch_size, cfg.seed)
    loader = engine.pretrain_batches(data, cfg.augment, sampler, 2, cfg.batch_size // common.world_size(),
                                     cfg.workers, run.device)  # two views x+, x of each image (Alg. 1 line 1)
    knn = common.KnnMonitor(data, cfg.knn_bank_size, cfg.knn_test_size, cfg.knn_k, cfg.knn_t, cfg.workers,
                            run.device)
    total_steps = cfg.epochs * sampler.batches_per_epoch
    for step, (views, _) in run.steps(loader, sampler, lambda: {"knn_top1": knn(model.encoder.backbone)},
                                      show=("sv_frac",)):  # logged by --loss mmcl only
        run.log(train_step(model, ddp_model, optimizer, run.to_device(views), step, sampler.batches_per_epoch,
                           total_steps))


if __name__ == "__main__":
    engine.run_main(main)
