"""moco_ring.py: the Ring loss against a naive loop and plain InfoNCE, the annealing schedules, and the script end to
end (world sizes 1 and 2, resume, real learning on the CIFAR-10 JPEGs, bad input)."""
import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F

import common
import moco_ring
from conftest import CIFAR_JPG, needs_cifar, read_metrics, run_script, unit

SMALL_RUN = ["--dataset", "folder", "--data-root", str(CIFAR_JPG), "--arch", "small", "--workers", "0",
             "--batch-size", "32", "--moco-k", "256", "--knn-bank-size", "200", "--knn-test-size", "100",
             "--log-every", "1"]  # every step's loss in metrics.jsonl: the tests compare them



def naive_ring_loss(q, k, queue, t, lower, upper):
    """Algorithm 1 one query at a time, in float64: sort, slice the percentiles, logsumexp with the positive."""
    losses = []
    K = queue.shape[0]
    for qi, ki in zip(q.double(), k.double()):
        sims = sorted((qi @ row).item() / t for row in queue.double())  # farthest -> closest
        ring = sims[int(lower / 100 * K):max(int(upper / 100 * K), int(lower / 100 * K) + 1)]
        pos = (qi @ ki).item() / t
        losses.append(math.log(sum(math.exp(s) for s in [pos] + ring)) - pos)
    return sum(losses) / len(losses)


@pytest.mark.parametrize("lower,upper", [(0, 100), (10, 90), (90, 99), (50, 100), (99.9, 100)])
def test_ring_loss_equals_a_naive_per_sample_loop(lower, upper):
    q, k, queue = unit(6, 16, seed=1), unit(6, 16, seed=2), unit(300, 16, seed=3)
    ours = moco_ring.ring_loss(q, k, queue, 0.1, lower, upper).item()
    assert ours == pytest.approx(naive_ring_loss(q, k, queue, 0.1, lower, upper), rel=1e-5)


def test_full_ring_is_exactly_moco_infonce():
    q, k, queue = unit(8, 16, seed=1), unit(8, 16, seed=2), unit(64, 16, seed=3)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / 0.2  # MoCo's Eq. 4 as MoCo codes it
    infonce = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
    assert torch.equal(moco_ring.ring_loss(q, k, queue, 0.2, 0, 100), infonce)


def test_narrower_ring_of_closer_negatives_gives_a_larger_loss_than_the_rest():
    # The positive stays in the denominator, so a ring of the closest entries is the hardest (largest loss)
    # subset of the same size; a ring of the farthest entries the easiest.
    q, k, queue = unit(8, 16, seed=1), unit(8, 16, seed=2), unit(400, 16, seed=3)
    far = moco_ring.ring_loss(q, k, queue, 0.1, 0, 10)
    close = moco_ring.ring_loss(q, k, queue, 0.1, 90, 100)
    assert close > far


def test_gradients_reach_the_queries_only():
    q = unit(4, 8, seed=1).requires_grad_()
    k = unit(4, 8, seed=2).requires_grad_()
    queue = unit(50, 8, seed=3).requires_grad_()
    moco_ring.ring_loss(q, k, queue, 0.1, 20, 80).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


def test_ring_members_are_each_rows_percentile_slice():
    sim = torch.randn(5, 200, generator=torch.Generator().manual_seed(0))
    members = moco_ring.ring_members(sim, 75, 95)
    ranks = sim.argsort(1).argsort(1)  # rank of each candidate in its row, 0 = farthest
    assert torch.equal(ranks.gather(1, members), torch.arange(150, 190).expand(5, -1))
    assert torch.equal(moco_ring.ring_members(sim, 0, 100), torch.arange(200).expand(5, -1))


def test_ring_bounds_reject_impossible_percentiles():
    with pytest.raises(ValueError):
        moco_ring.ring_bounds(100, 50, 40)
    assert moco_ring.ring_bounds(10, 99, 100) == (9, 10)  # never empty


def test_ring_schedule_against_hand_computation():
    # anneal_steps 1000, targets [90, 99]. linear: w_l = 90 s/1000. step: the public code's StepThresholdPolicy,
    # thresholds f = 1.0, 0.9, ..., 0.1 of the set for 100 steps each, i.e. w_l = 100 (1 - f) = 0, 10, ..., 90.
    # With w_u annealed (the public code's dynamic inner cut, the closest 10% of the outer set f): w_u = 100 - 10 f.
    schedule = moco_ring.ring_schedule
    assert [schedule(s, 1000, 90, 99, "linear", False) for s in (0, 250, 500, 1000, 5000)] == \
        [(0.0, 99), (22.5, 99), (45.0, 99), (90.0, 99), (90.0, 99)]
    hand = {0: (0, 90), 250: (22.5, 92.25), 500: (45, 94.5), 1000: (90, 99), 5000: (90, 99)}
    for s, (w_l, w_u) in hand.items():
        assert schedule(s, 1000, 90, 99, "linear", True) == pytest.approx((w_l, w_u), abs=1e-12), s
    # step: level s // 100, capped at 9 (the last, f = 0.1, from step 900 on)
    hand = {0: (0, 90), 99: (0, 90), 100: (10, 91), 250: (20, 92), 899: (80, 98), 900: (90, 99), 999: (90, 99),
            5000: (90, 99)}
    for s, (w_l, w_u) in hand.items():
        assert schedule(s, 1000, 90, 99, "step", True) == pytest.approx((w_l, w_u), abs=1e-12), s
    assert schedule(150, 1000, 90, 99, "step", False) == pytest.approx((10, 99))
    assert schedule(0, 1000, 90, 99, "none", True) == (90, 99)
    assert schedule(0, 0, 90, 99, "linear", True) == (90, 99)  # no annealing span
    assert schedule(3, 9, 90, 99, "step", True) == (90, 99)  # span < 10 steps: the public code's repeat(.., 0) skips it
    # The MoCo v2 baseline (0, 100) stays the whole queue under any policy
    assert all(schedule(s, 1000, 0, 100, p, True) == (0, 100) for s in (0, 500) for p in ("linear", "step"))


def test_public_code_ring_slice_matches_our_percentiles():
    # Public NCERing/MoCoRing: sort descending, outer = first int(f K), ring = outer[int(0.1 outer):]. Ours: the
    # ascending slice ring_bounds(K, w_l, w_u) of the schedule. Same entries at every level of the step policy.
    K = 4096
    for level in range(10):
        f = round(1.0 - 0.1 * level, 10)
        outer = int(f * K)
        closest_first = list(range(K - 1, -1, -1))  # entry ids sorted by descending similarity (id = rank)
        theirs = sorted(closest_first[:outer][int(0.1 * outer):])
        w_l, w_u = moco_ring.ring_schedule(level * 100, 1000, 90, 99, "step", True)
        lo, hi = moco_ring.ring_bounds(K, w_l, w_u)
        assert abs(lo - theirs[0]) <= 1 and abs(hi - 1 - theirs[-1]) <= 1, (level, lo, hi, theirs[0], theirs[-1])


def test_paper_recipe_sets_its_defaults_and_explicit_flags_win():
    demo = moco_ring.parse_config([])
    paper = moco_ring.parse_config(["--recipe", "paper"])
    for name, value in moco_ring.PAPER_RECIPE.items():
        assert getattr(paper, name) == value and getattr(demo, name) != value, name
    mixed = moco_ring.parse_config(["--recipe", "paper", "--lr", "0.1", "--moco-k", "4096"])
    assert (mixed.lr, mixed.moco_k, mixed.moco_t, mixed.lr_drops) == (0.1, 4096, 0.07, (200, 250))


def test_learning_rate_schedules():
    cfg = moco_ring.parse_config(["--lr", "0.03", "--lr-drops", "200", "250"])
    # 10 steps per epoch: 0.03 until step 1999, 0.003 from 2000, 0.0003 from 2500
    assert [moco_ring.learning_rate(s, 10, 3000, cfg) for s in (0, 1999, 2000, 2499, 2500, 2999)] == \
        pytest.approx([0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003], rel=1e-12)
    cosine = moco_ring.parse_config(["--lr", "0.06"])
    assert moco_ring.learning_rate(1500, 10, 3000, cosine) == pytest.approx(0.03)


def naive_bank_ring_loss(q, bank, index, t, lower, upper, k, priority):
    """Eq. 3 with ring negatives, one query at a time in float64: rank the other M-1 bank entries, slice the ring,
    take its k members of highest priority (all of them if it holds k or fewer), logsumexp with the bank's own
    entry as positive."""
    M, losses = bank.shape[0], []
    for qi, i, prio in zip(q.double(), index.tolist(), priority.tolist()):
        sims = [(qi @ row).item() / t for row in bank.double()]
        others = sorted((j for j in range(M) if j != i), key=lambda j: sims[j])  # ascending similarity
        lo, hi = int(lower / 100 * (M - 1)), max(int(upper / 100 * (M - 1)), int(lower / 100 * (M - 1)) + 1)
        ring = others[lo:hi]
        drawn = sorted(ring, key=lambda j: -prio[j])[:k]
        terms = [sims[i]] + [sims[j] for j in drawn]
        losses.append(math.log(sum(math.exp(s) for s in terms)) - sims[i])
    return sum(losses) / len(losses)


@pytest.mark.parametrize("lower,upper,k", [(0, 100, 50), (50, 90, 50), (90, 99, 50), (50, 90, 500)])
def test_bank_ring_loss_equals_a_naive_per_sample_loop(lower, upper, k):
    q, bank, index = unit(6, 16, seed=1), unit(300, 16, seed=3), torch.tensor([5, 0, 299, 17, 42, 8])
    priority = torch.rand(6, 300, generator=torch.Generator().manual_seed(4))
    ours = moco_ring.bank_ring_loss(q, bank, index, 0.07, lower, upper, k, priority)
    naive = naive_bank_ring_loss(q, bank, index, 0.07, lower, upper, k, priority)
    assert ours.item() == pytest.approx(naive, rel=1e-5)


@pytest.mark.parametrize("lower,upper,k", [(0, 100, 40), (0, 100, 299), (30, 80, 20), (30, 80, 1000), (95, 100, 3)])
def test_bank_negatives_are_distinct_ring_members_never_the_own_entry(lower, upper, k):
    sim, own = torch.randn(50, 300, generator=torch.Generator().manual_seed(0)), torch.arange(0, 300, 6)
    priority = torch.rand(50, 300, generator=torch.Generator().manual_seed(1))
    drawn = moco_ring.sample_ring_negatives(sim, own, lower, upper, k, priority)
    lo, hi = moco_ring.ring_bounds(299, lower, upper)
    assert drawn.shape == (50, min(k, hi - lo))
    for n, (row, i) in enumerate(zip(drawn.tolist(), own.tolist())):
        ring = set(sorted((j for j in range(300) if j != i), key=lambda j: sim[n, j].item())[lo:hi])
        assert i not in row and len(set(row)) == len(row) and set(row) <= ring


def test_bank_draw_is_uniform_over_the_ring():
    # 4,000 draws of k = 5 from a ring of 20: each member's frequency is 1/4, standard error 0.0068; 5 SE allowed
    sim = torch.arange(21.0).expand(4000, -1)  # the same ranking in every row: own entry 0, ring = ids 1..20
    priority = torch.rand(4000, 21, generator=torch.Generator().manual_seed(2))
    drawn = moco_ring.sample_ring_negatives(sim, torch.zeros(4000, dtype=torch.long), 0, 100, 5, priority)
    frequency = torch.bincount(drawn.flatten(), minlength=21)[1:] / 4000
    assert (frequency - 0.25).abs().max() < 5 * math.sqrt(0.25 * 0.75 / 4000)


def test_whole_bank_with_k_at_least_m_minus_one_is_the_full_softmax():
    """Wu et al.'s LinearAverage: cross-entropy of q against every bank entry, the own index as target."""
    q, bank, index = unit(8, 16, seed=1).requires_grad_(), unit(40, 16, seed=3), torch.tensor([0, 3, 39, 7, 7, 12, 20, 1])
    ours = moco_ring.bank_ring_loss(q, bank, index, 0.1, 0, 100, 39, torch.rand(8, 40))
    full = F.cross_entropy(q @ bank.T / 0.1, index)
    assert ours.item() == pytest.approx(full.item(), rel=1e-6)
    torch.testing.assert_close(torch.autograd.grad(ours, q)[0], torch.autograd.grad(full, q)[0])


def test_bank_gradient_reaches_the_embeddings_only():
    q, bank = unit(4, 8, seed=1).requires_grad_(), unit(50, 8, seed=3).requires_grad_()
    moco_ring.bank_ring_loss(q, bank, torch.arange(4), 0.1, 20, 80, 10, torch.rand(4, 50)).backward()
    assert q.grad.abs().sum() > 0 and bank.grad is None


@pytest.mark.parametrize("m", [0.0, 0.5])
def test_memory_bank_update_by_hand(m):
    bank = moco_ring.MemoryBank(10, 4)
    before = bank.vectors.clone()
    v = unit(3, 4, seed=5)
    bank.update(torch.tensor([7, 2, 9]), v, m)
    for row, i in enumerate((7, 2, 9)):
        mixed = m * before[i] + (1 - m) * v[row]
        torch.testing.assert_close(bank.vectors[i], mixed / mixed.norm())
    untouched = [i for i in range(10) if i not in (7, 2, 9)]
    assert torch.equal(bank.vectors[untouched], before[untouched])


def test_symmetric_loss_is_the_demos_sum_of_both_directions():
    cfg = moco_ring.parse_config(["--arch", "small", "--symmetric", "--moco-k", "64", "--moco-t", "0.2"])
    common.seed_everything(0)
    model = moco_ring.MoCoRing(cfg, bn_splits=1).eval()  # eval: BN uses running stats, so shuffling is inert
    x1, x2 = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), \
        torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss, keys = model([x1, x2], 0, 100)
        q1, q2 = (F.normalize(model.encoder_q(x), dim=1) for x in (x1, x2))
        k1, k2 = (F.normalize(model.encoder_k(x), dim=1) for x in (x1, x2))
        queue = model.queue.keys
        demo = moco_ring.ring_loss(q1, k2, queue, 0.2) + moco_ring.ring_loss(q2, k1, queue, 0.2)  # loss_12 + loss_21
    assert loss.item() == pytest.approx(demo.item(), rel=1e-6)
    torch.testing.assert_close(keys, torch.cat([k1, k2]))


@needs_cifar
@pytest.mark.parametrize("negatives", ["queue", "bank"])
def test_one_and_two_processes_agree_on_the_first_steps(tmp_path, negatives):
    # Same global batch of 32: one process with BN in 2 contiguous groups computes what 2 gloo ranks compute. IRing:
    # the ring draws of each rank are its rows of the global draw, and both ranks write the whole batch to the bank.
    common_args = [*SMALL_RUN, "--max-steps", "2", "--negatives", negatives, "--bank-negatives", "64"]
    run_script("moco_ring.py", *common_args, "--bn-splits", "2", "--out-dir", str(tmp_path / "one"))
    run_script("moco_ring.py", *common_args, "--out-dir", str(tmp_path / "two"), nproc=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert one[0]["loss"] == pytest.approx(two[0]["loss"], rel=1e-5)
    assert one[1]["loss"] == pytest.approx(two[1]["loss"], rel=1e-4)
    assert "knn_top1" in one[-1] and "knn_top1" in two[-1]
    saved = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("one", "two")]
    state = "queue.keys" if negatives == "queue" else "bank.vectors"
    torch.testing.assert_close(saved[0]["model"][state], saved[1]["model"][state], atol=1e-5, rtol=0)
    for name, value in saved[0]["model"].items():  # BN statistics: averaged over the ranks before saving
        if name.endswith(("running_mean", "running_var")):
            torch.testing.assert_close(value, saved[1]["model"][name], atol=1e-5, rtol=1e-4, msg=name)
    config = json.loads((tmp_path / "two" / "config.json").read_text())
    assert config["world_size"] == 2 and config["config"]["stem"] == "cifar"


@needs_cifar
@pytest.mark.parametrize("negatives", ["queue", "bank"])
def test_resume_continues_exactly(tmp_path, negatives):
    args = [*SMALL_RUN, "--batch-size", "16", "--moco-k", "64", "--epochs", "1", "--knn-every", "0",
            "--negatives", negatives, "--bank-negatives", "32"]
    # 20k images / 16 = 1250 steps per epoch; stop at 3, resume to 6, compare with a straight run to 6
    moco_ring.main([*args, "--max-steps", "3", "--out-dir", str(tmp_path / "a")])
    moco_ring.main([*args, "--max-steps", "6", "--out-dir", str(tmp_path / "a"),
                    "--resume", str(tmp_path / "a" / "checkpoint.pt")])
    moco_ring.main([*args, "--max-steps", "6", "--out-dir", str(tmp_path / "b")])
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [r["loss"] for r in read_metrics(tmp_path / "a") if "loss" in r] == \
           [r["loss"] for r in read_metrics(tmp_path / "b") if "loss" in r]
    if negatives == "bank":  # 6 steps of 16 wrote 96 distinct entries; the other 19,904 keep their random init
        cfg = moco_ring.parse_config([*args, "--stem", "cifar"])
        common.seed_everything(cfg.seed)
        init = moco_ring.MoCoRing(cfg, bn_splits=8, bank_size=20000).bank.vectors
        assert (a["model"]["bank.vectors"] != init).any(dim=1).sum() == 96


LEARNING_RUN = ["--dataset", "folder", "--data-root", str(CIFAR_JPG), "--arch", "small", "--workers", "2",
                "--batch-size", "128", "--moco-k", "1024", "--epochs", "2", "--max-steps", "300", "--anneal-epochs",
                "1", "--knn-every", "0", "--knn-bank-size", "4000", "--knn-test-size", "1000"]


@pytest.fixture(scope="module")
def untrained_knn():
    """kNN top-1 of the encoder the learning run starts from (seed 0)."""
    cfg = moco_ring.parse_config(LEARNING_RUN)
    data = common.load_image_data(cfg.dataset, cfg.data_root)
    common.seed_everything(cfg.seed)
    untrained = moco_ring.MoCoRing(cfg, bn_splits=8)
    monitor = common.KnnMonitor(data, cfg.knn_bank_size, cfg.knn_test_size, 200, 0.1, 2, torch.device("cpu"))
    return monitor(untrained.encoder_q.backbone)


@needs_cifar
def test_short_cpu_run_learns_on_real_images(tmp_path, untrained_knn):
    """kNN top-1 on CIFAR-10 JPEGs after a short run is clearly above the same encoder at random init. The ring is
    annealed over the first epoch, so the second trains on the 90-99 ring itself: w_l 0 -> 90 with w_u at 99 (the
    text of Sec. 4), the setting measured on the 2-core CPU: 30.9% -> 37.9% (75 s idle; 776 s under load, same
    figures after the IRing changes). The default since, the public code's [0, 90] -> [90, 99], reached 34.7% in
    one run at this budget, too close to the margin to test. IR's and IRing's learning
    test is test_ir_and_iring_learn_on_real_images (slow)."""
    moco_ring.main([*LEARNING_RUN, "--no-anneal-upper", "--out-dir", str(tmp_path)])
    after = read_metrics(tmp_path)[-1]["knn_top1"]
    print(f"kNN top-1: random init {untrained_knn:.1f}%, after 300 steps {after:.1f}%")
    assert after > untrained_knn + 5.0


IMAGES_PER_CLASS = 128  # 1,280 training images: 10 steps of 128 per epoch, so 200 steps refresh the bank 20 times


@pytest.fixture(scope="module")
def cifar_first_images(tmp_path_factory):
    """An ImageFolder of the first IMAGES_PER_CLASS training JPEGs of each class (symlinks) and the whole test split.
    A memory bank needs epochs: its positives are last epoch's embeddings, random vectors all through epoch 1."""
    root = tmp_path_factory.mktemp("cifar10_first")
    for class_dir in sorted((CIFAR_JPG / "train").iterdir()):
        (root / "train" / class_dir.name).mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:IMAGES_PER_CLASS]:
            (root / "train" / class_dir.name / image.name).symlink_to(image)
    (root / "test").symlink_to(CIFAR_JPG / "test")
    return root


def ir_protocol(root, seed: int) -> list[str]:
    """Instance discrimination on 1,280 images with Wu et al.'s recipe (bank momentum 0.5, a linear head, lr 0.03),
    100 epochs of batch 128; kNN with the 1,280 training images as bank (k 20: 1.6% of it) and 1,000 test images."""
    return ["--dataset", "folder", "--data-root", str(root), "--arch", "small", "--workers", "2", "--negatives",
            "bank", "--bank-m", "0.5", "--no-mlp", "--lr", "0.03", "--batch-size", "128", "--epochs", "100",
            "--knn-every", "0", "--knn-k", "20", "--knn-test-size", "1000", "--seed", str(seed)]


@needs_cifar
@pytest.mark.slow
def test_ir_and_iring_learn_on_real_images(tmp_path, cifar_first_images):
    """IR (the whole bank as ring) and IRing (the default annealed ring) each end above the same encoder at random
    init by more than 3 standard errors of the per-seed gain over 3 seeds; IRing minus IR is printed with its noise
    (no claim: at this scale it is within it). Measured on a 2-core Intel Xeon (AVX-512 + AMX), seeds 0-2: init
    32.8 / 30.4 / 30.5, IR 40.5 / 39.8 / 40.6, IRing 39.8 / 41.1 / 41.5. About 5 minutes per run: slow."""
    gains = {"IR": [], "IRing": []}
    for seed in range(3):
        args = ir_protocol(cifar_first_images, seed)
        cfg = moco_ring.parse_config(args)
        data = common.load_image_data(cfg.dataset, cfg.data_root)
        common.seed_everything(cfg.seed)
        untrained = moco_ring.MoCoRing(cfg, bn_splits=8, bank_size=len(data.pretrain)).encoder_q.backbone
        before = common.KnnMonitor(data, cfg.knn_bank_size, cfg.knn_test_size, cfg.knn_k, cfg.knn_t, 2,
                                   torch.device("cpu"))(untrained)
        for method, ring in (("IR", ["--ring-lower", "0", "--ring-upper", "100"]), ("IRing", [])):
            out = tmp_path / f"{method}_{seed}"
            moco_ring.main([*args, *ring, "--out-dir", str(out)])
            after = read_metrics(out)[-1]["knn_top1"]
            print(f"seed {seed} {method}: random init {before:.1f}%, after 100 epochs {after:.1f}%")
            gains[method].append(after - before)
    gain = {m: torch.tensor(g, dtype=torch.float64) for m, g in gains.items()}
    for method, g in gain.items():
        print(f"{method}: gain {g.mean():.1f} +- {g.std() / math.sqrt(len(g)):.1f} (SE)")
        assert g.mean() > 3 * g.std() / math.sqrt(len(g))
    difference = gain["IRing"] - gain["IR"]
    print(f"IRing - IR: {difference.mean():+.1f} +- {difference.std() / math.sqrt(len(difference)):.1f} (SE)")


def test_ir_steps_equal_a_minimal_instance_discrimination():
    """IR in the script (--negatives bank, the whole bank as ring, k >= M - 1) takes the same steps as an
    independent minimal instance discrimination in Wu et al.'s LinearAverage form: v = norm(g(x)), loss =
    cross-entropy of v @ M.T / t at the own index, SGD step, then M[i] <- norm(m M[i] + (1 - m) v). Same batches,
    same encoder: the same loss, encoder and bank after each of 5 steps (the minimal state is reset to the
    script's after each comparison, so that float rounding cannot accumulate)."""
    bank_size, batch = 64, 16
    cfg = moco_ring.parse_config(["--dataset", "synthetic", "--arch", "small", "--dim", "16", "--negatives", "bank",
                                  "--ring-lower", "0", "--ring-upper", "100", "--bank-negatives", "63",
                                  "--bank-m", "0.5", "--no-mlp", "--batch-size", str(batch), "--lr", "0.03",
                                  "--moco-t", "0.07"])
    common.seed_everything(0)
    model = moco_ring.MoCoRing(cfg, bn_splits=1, bank_size=bank_size)
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    encoder = copy.deepcopy(model.encoder_q)
    minimal = torch.optim.SGD(encoder.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    minimal.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    bank = model.bank.vectors.clone()
    data = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(batch, 3, 32, 32, generator=data)
        index = torch.randperm(bank_size, generator=data)[:batch]
        stats = moco_ring.train_step(model, model, optimizer, [x], step, 4, 20, index)
        for group in minimal.param_groups:
            group["lr"] = stats["lr"]
        v = F.normalize(encoder(x).float(), dim=1)  # v: NxC
        loss = F.cross_entropy(v @ bank.T / cfg.moco_t, index)  # the full softmax over the bank M: MxC
        minimal.zero_grad(set_to_none=True)
        loss.backward()
        minimal.step()
        bank[index] = F.normalize(cfg.bank_m * bank[index] + (1 - cfg.bank_m) * v.detach(), dim=1)
        assert torch.allclose(stats["loss"], loss, rtol=1e-5, atol=1e-6), (step, stats["loss"], loss)
        for (name, mine), theirs in zip(model.encoder_q.state_dict().items(), encoder.state_dict().values()):
            assert torch.allclose(mine.float(), theirs.float(), rtol=1e-4, atol=1e-6), (step, name)
        assert torch.allclose(model.bank.vectors, bank, rtol=1e-5, atol=1e-6), step
        encoder.load_state_dict(model.encoder_q.state_dict())  # start the next step from the script's state
        minimal.load_state_dict(copy.deepcopy(optimizer.state_dict()))  # its own momentum buffers
        bank = model.bank.vectors.clone()


@pytest.mark.parametrize("args,message", [
    (["--dataset", "folder", "--data-root", "/nonexistent"], "no 'train/' folder"),
    (["--dataset", "imagenet"], "invalid choice"),
    (["--arch", "vgg"], "invalid choice"),
    (["--dataset", "synthetic", "--batch-size", "5000"], "larger than the dataset"),
    (["--dataset", "synthetic", "--ring-lower", "80", "--ring-upper", "20"], "0 <= lower < upper <= 100"),
    (["--dataset", "synthetic", "--resume", "README.md"], "not a checkpoint"),
    (["--dataset", "synthetic", "--negatives", "bank", "--symmetric"], "IRing (--negatives bank) has one view"),
    (["--bank-m", "1"], "--bank-m: 1.0 is out of range"),
])
def test_bad_input_gives_one_clear_error_line(tmp_path, args, message):
    result = run_script("moco_ring.py", *args, "--out-dir", str(tmp_path / "run"), check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_resume_with_a_different_config_is_refused(tmp_path):
    args = ["--dataset", "synthetic", "--arch", "small", "--workers", "0", "--batch-size", "16", "--moco-k", "32",
            "--max-steps", "1", "--knn-bank-size", "32", "--knn-test-size", "16", "--out-dir", str(tmp_path / "a")]
    moco_ring.main(args)
    result = run_script("moco_ring.py", *args, "--moco-t", "0.2", "--resume", str(tmp_path / "a" / "checkpoint.pt"),
                        check=False)
    assert result.returncode != 0 and "0.1 -> 0.2" in result.stderr  # moco_t, in either wording of common.py
    saved = (tmp_path / "a" / "checkpoint.pt").stat().st_mtime_ns
    run_script("moco_ring.py", *args)  # the same command again continues the run, which is already finished
    assert (tmp_path / "a" / "checkpoint.pt").stat().st_mtime_ns == saved


@pytest.mark.parametrize("flags", [["--symmetric"], ["--anneal", "step", "--no-mlp"], ["--no-anneal-upper"],
                                   ["--negatives", "bank", "--bank-negatives", "20", "--bank-m", "0.5"],
                                   ["--recipe", "paper", "--moco-k", "40", "--batch-size", "16", "--lr-drops", "1"],
                                   ["--augment", "cpu"],  # the GPU settings, run on the CPU:
                                   ["--precision", "bf16", "--channels-last", "on"],
                                   ["--negatives", "bank", "--bank-negatives", "20", "--precision", "bf16",
                                    "--channels-last", "on"]])
def test_variants_run(tmp_path, flags):
    moco_ring.main(["--dataset", "synthetic", "--arch", "small", "--workers", "0", "--batch-size", "16",
                    "--moco-k", "40", "--max-steps", "3", "--epochs", "1", "--knn-bank-size", "64",
                    "--knn-test-size", "32", "--log-every", "1", "--out-dir", str(tmp_path), *flags])
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
