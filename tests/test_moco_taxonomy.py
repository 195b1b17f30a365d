"""moco_taxonomy.py: the four objectives against independent computations, the 15 rows of Table 1, the skeleton
augmentations and data, the attractive-encoder collapse (Table 2), and the script end to end (world sizes 1 and 2,
resume, learning on the synthetic motions, the taxonomy driver, bad input)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import common
import engine
import moco_taxonomy as mt
from conftest import error_line, read_metrics, run_script, unit

# A small model on a small synthetic set: every run below takes seconds on one CPU core.
TINY = ["--synthetic-size", "200", "--frames", "16", "--width", "32", "--dim", "16", "--batch-size", "16",
        "--moco-k", "64", "--moco-k-dec", "32", "--probe-epochs", "0", "--knn-every", "0",
        "--log-every", "1"]  # every step's loss in metrics.jsonl: the tests compare them


pytestmark = pytest.mark.usefixtures("one_thread")



def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# The objectives
# ---------------------------------------------------------------------------------------------------------------------
def naive_info_nce(q, k, queue, t):
    """Eq. (1) one query at a time in float64, with its two terms of Eq. (2): (loss, attraction, repulsion)."""
    losses, attraction, repulsion = [], [], []
    for qi, ki in zip(q.double(), k.double()):
        pos = math.exp((qi @ ki).item() / t)
        negs = [math.exp((qi @ row).item() / t) for row in queue.double()]
        losses.append(-math.log(pos / (pos + sum(negs))))
        attraction.append(-(qi @ ki).item() / t)
        repulsion.append(math.log(pos + sum(negs)))
    return tuple(sum(v) / len(v) for v in (losses, attraction, repulsion))


def test_contrastive_loss_equals_a_naive_loop_and_eq_2():
    q, k, queue = unit(6, 16, seed=1), unit(6, 16, seed=2), unit(50, 16, seed=3)
    loss, attraction, repulsion = naive_info_nce(q, k, queue, 0.1)
    ours = mt.contrastive_loss(q, k, queue, 0.1).item()
    assert ours == pytest.approx(loss, rel=1e-5)
    assert ours == pytest.approx(attraction + repulsion, rel=1e-5)


def test_contrastive_loss_sends_gradients_to_the_queries_only():
    q, k, queue = unit(4, 8, seed=1).requires_grad_(), unit(4, 8, seed=2).requires_grad_(), unit(20, 8, seed=3)
    queue.requires_grad_()
    mt.contrastive_loss(q, k, queue, 0.1).backward()
    assert q.grad.abs().sum() > 0 and k.grad is None and queue.grad is None


def test_attractive_encoder_loss_is_the_squared_distance_with_gradients_to_both_sides():
    q, z = unit(5, 8, seed=1).requires_grad_(), unit(5, 8, seed=2).requires_grad_()
    loss = mt.attractive_encoder_loss(q, z)
    assert loss.item() == pytest.approx((q - z).pow(2).sum(1).mean().item(), rel=1e-6)
    loss.backward()
    # d/dq mean_i (2 - 2 q_i.z_i) = -2 z / N, and symmetrically for z: neither side is detached (Alg. 1)
    torch.testing.assert_close(q.grad, -2 * z.detach() / 5)
    torch.testing.assert_close(z.grad, -2 * q.detach() / 5)
    same = unit(1, 8, seed=3).expand(5, 8)  # a collapsed embedding is a global minimum
    assert mt.attractive_encoder_loss(same, same).item() == pytest.approx(0.0, abs=1e-6)


def test_attractive_decoder_loss_equals_a_naive_mean_squared_error():
    x_rec, x = randn(3, 4, 5, 3, seed=1), randn(3, 4, 5, 3, seed=2)
    total = sum((x_rec[n, t, j, c].item() - x[n, t, j, c].item()) ** 2
                for n in range(3) for t in range(4) for j in range(5) for c in range(3))
    assert mt.attractive_decoder_loss(x_rec, x).item() == pytest.approx(total / (3 * 4 * 5 * 3), rel=1e-5)


def test_total_loss_weights_the_attractive_terms_only():
    parts = {"ae": torch.tensor(2.0), "ce": torch.tensor(3.0), "ad": torch.tensor(5.0), "cd": torch.tensor(7.0)}
    assert mt.total_loss(parts, 0.5, 0.1).item() == pytest.approx(3.0 + 0.5 * 2.0 + 0.1 * 5.0 + 7.0)
    assert mt.total_loss({"ad": torch.tensor(5.0)}, 0.5, 0.1).item() == pytest.approx(0.5)


def test_the_taxonomy_has_the_15_rows_of_table_1():
    rows = mt.taxonomy_rows()
    assert len(rows) == len(set(rows)) == 15 == 2 ** 4 - 1
    assert all(row and set(row) <= set(mt.OBJECTIVES) for row in rows)


@pytest.mark.parametrize("row", mt.taxonomy_rows(), ids="-".join)
def test_every_row_trains_exactly_its_objectives(row):
    cfg = engine.parse_config(mt.Config, [*TINY, "--objectives", *row])
    common.seed_everything(0)
    model = mt.TaxonomyMoCo(cfg, joints=15, frames=16)
    x, x1, x2 = (randn(8, 16, 15, 3, seed=s) for s in range(3))
    loss, parts, q_var, keys, decoded_keys = model(x, x1, x2)
    assert set(parts) == set(row)
    assert loss.item() == pytest.approx(mt.total_loss(parts, cfg.w1, cfg.w2).item())
    assert (keys is None) == ("ce" not in row) and (decoded_keys is None) == ("cd" not in row)
    if keys is not None:
        assert keys.shape == (8, 16)
    if decoded_keys is not None:
        assert decoded_keys.shape == (8, 16 * 15 * 3)
    loss.backward()
    assert 0.0 <= q_var.item() <= 1.0
    assert all(p.grad is None for p in [*model.encoder_k.parameters(), *model.decoder_k.parameters()])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert (model.decoder_q.out.weight.grad is not None) == bool({"ad", "cd"} & set(row))


def test_the_model_computes_each_objective_of_its_networks_outputs():
    cfg = engine.parse_config(mt.Config, [*TINY, "--objectives", "ae", "ce", "ad", "cd"])
    common.seed_everything(0)
    model = mt.TaxonomyMoCo(cfg, joints=15, frames=16)
    model.queue_dec.enqueue(F.normalize(randn(32, 16 * 15 * 3, seed=5), dim=1))  # decoded-key-like negatives
    x, x1, x2 = (randn(8, 16, 15, 3, seed=s) for s in range(3))
    _, parts, _, _, _ = model(x, x1, x2)
    with torch.no_grad():
        (h_gt, z_gt), (h_q, q), (h_k, k) = model.encoder_q(x), model.encoder_q(x1), model.encoder_k(x2)
        x_rec = model.decoder_q(h_gt)
        d_q, d_k = model.decoder_q(h_q).flatten(1), model.decoder_k(h_k).flatten(1)
    assert parts["ae"].item() == pytest.approx((q - z_gt).pow(2).sum(1).mean().item(), rel=1e-5)  # 2 - 2 cos
    assert parts["ce"].item() == pytest.approx(naive_info_nce(q, k, model.queue.keys, 0.1)[0], rel=1e-5)
    assert parts["ad"].item() == pytest.approx(((x_rec - x) ** 2).sum().item() / x.numel(), rel=1e-5)
    d_q, d_k = d_q / d_q.norm(dim=1, keepdim=True), d_k / d_k.norm(dim=1, keepdim=True)  # cosine in D's space
    assert parts["cd"].item() == pytest.approx(naive_info_nce(d_q, d_k, model.queue_dec.keys, 0.1)[0], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Augmentations and data
# ---------------------------------------------------------------------------------------------------------------------
def test_rotation_matrix_is_a_rotation_composed_x_then_y_then_z():
    r = mt.rotation_matrix(torch.tensor([0.3, -1.1, 2.0]))
    torch.testing.assert_close(r @ r.T, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.linalg.det(r).item() == pytest.approx(1.0, abs=1e-6)
    quarter = mt.rotation_matrix(torch.tensor([0.0, 0.0, math.pi / 2]))  # about z: x -> y
    torch.testing.assert_close(quarter @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6,
                               rtol=0)


def test_augment_without_strength_is_the_identity_and_rotation_keeps_bone_lengths():
    x = mt.center(randn(20, 15, 3, seed=1))
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(mt.augment(x, 1.0, 0.0, 0.0, 0.0, g), x, atol=1e-6, rtol=0)
    rotated = mt.augment(x, 1.0, 180.0, 0.0, 0.0, g)
    assert not torch.allclose(rotated, x, atol=1e-3)
    torch.testing.assert_close(torch.cdist(rotated, rotated), torch.cdist(x, x), atol=1e-5, rtol=0)
    sheared = mt.augment(x, 1.0, 0.0, 0.5, 0.0, g)  # a shear is linear but changes lengths
    assert not torch.allclose(torch.cdist(sheared, sheared), torch.cdist(x, x), atol=1e-3)


def test_temporal_crop_is_a_resampled_window_of_at_least_the_given_fraction():
    frames = 40
    ramp = torch.arange(frames, dtype=torch.float32).view(frames, 1, 1).expand(frames, 2, 3)  # position = time
    for seed in range(20):
        view = mt.augment(ramp, 0.5, 0.0, 0.0, 0.0, torch.Generator().manual_seed(seed))
        steps = view[1:, 0, 0] - view[:-1, 0, 0]  # a window [a, a + L - 1] resampled to T frames: constant steps
        torch.testing.assert_close(steps, steps[0].expand_as(steps))
        length = steps[0].item() * (frames - 1) + 1
        assert 0.5 * frames - 1 <= length <= frames + 1e-4


def test_views_are_a_pure_function_of_the_seed():
    x, y = mt.synthetic_motions(4, 16, seed=0)
    cfg = engine.parse_config(mt.Config, [])
    views = mt.SkeletonViews(mt.center(x), y, cfg)
    a, b, c = views[(2, 7)], views[(2, 7)], views[(2, 8)]
    assert all(torch.equal(u, v) for u, v in zip(a[0], b[0])) and a[1] == y[2]
    assert torch.equal(a[0][0], c[0][0]) and not torch.equal(a[0][1], c[0][1])  # x stays unaugmented
    assert not torch.equal(a[0][1], a[0][2])  # two different views


def test_synthetic_motions_are_labelled_deterministic_and_centred_on_load():
    x, y = mt.synthetic_motions(50, 24, seed=3)
    assert x.shape == (50, 24, len(mt.SYNTHETIC_JOINTS), 3) and x.dtype == torch.float32
    assert torch.equal(torch.bincount(y), torch.full((10,), 5))
    assert torch.equal(x, mt.synthetic_motions(50, 24, seed=3)[0])
    assert not torch.equal(x, mt.synthetic_motions(50, 24, seed=4)[0])
    data = mt.load_sequences(engine.parse_config(mt.Config, ["--synthetic-size", "40", "--frames", "24"]))
    assert data.train.shape == (40, 24, 15, 3) and data.test.shape == (10, 24, 15, 3) and data.num_classes == 10
    assert data.train.mean(dim=(1, 2)).abs().max() < 1e-5


def write_npz(path, n=40, frames=12, joints=5, **overrides):
    """The documented format: `sequences` float32 (N, T, J, 3), `labels` int64 (N,); an override None leaves an
    array out."""
    g = np.random.default_rng(0)
    arrays = {"sequences": g.normal(size=(n, frames, joints, 3)).astype(np.float32),
              "labels": (np.arange(n) % 4).astype(np.int64), **overrides}
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


def test_npz_arrays_train_and_resample(tmp_path):
    write_npz(tmp_path / "train.npz")
    write_npz(tmp_path / "test.npz", n=12)
    mt.main(["--dataset", "npz", "--data-root", str(tmp_path), *TINY, "--frames", "20", "--max-steps", "2",
             "--objectives", "ae", "ce", "ad", "cd", "--out-dir", str(tmp_path / "run")])
    records = read_metrics(tmp_path / "run")
    assert records[-1]["step"] == 2 and 0.0 <= records[-1]["knn_top1"] <= 100.0
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert saved["config"]["frames"] == 20 and saved["model"]["queue_dec.keys"].shape == (32, 20 * 5 * 3)
    # the exported backbone is a plain nn.GRU over the flattened joints
    torch.nn.GRU(5 * 3, 32, 1, batch_first=True).load_state_dict(saved["backbone"], strict=True)


# ---------------------------------------------------------------------------------------------------------------------
# The script end to end
# ---------------------------------------------------------------------------------------------------------------------
def test_attractive_encoder_alone_collapses_the_embedding(tmp_path):
    """Table 2's hypothesis, observed: under L_AE alone the queries' variance (1 - |mean q|^2) falls towards 0,
    while L_CE, whose repulsion term pushes queries apart, keeps it."""
    args = [*TINY, "--max-steps", "40", "--lr", "3e-3"]
    mt.main([*args, "--objectives", "ae", "--out-dir", str(tmp_path / "ae")])
    mt.main([*args, "--objectives", "ce", "--out-dir", str(tmp_path / "ce")])
    ae, ce = ([r for r in read_metrics(tmp_path / d) if "q_var" in r] for d in ("ae", "ce"))
    print(f"q_var: L_AE {ae[0]['q_var']:.3f} -> {ae[-1]['q_var']:.4f}, L_CE {ce[0]['q_var']:.3f} -> "
          f"{ce[-1]['q_var']:.3f}")
    assert ae[0]["q_var"] == pytest.approx(ce[0]["q_var"])  # same start
    assert ae[-1]["q_var"] < 0.05 * ae[0]["q_var"]
    assert ce[-1]["q_var"] > ae[0]["q_var"]
    features = {d: read_metrics(tmp_path / d)[-1]["feature_var"] for d in ("ae", "ce")}  # test set, frozen h
    assert features["ae"] < 0.5 * features["ce"]


def test_one_and_two_processes_agree_on_the_first_steps(tmp_path):
    # No BatchNorm here and every loss is a mean over the queries: the same global batch of 16 on 1 process or
    # split over 2 gives the same loss, the same (averaged) gradient, the same queues.
    args = [*TINY, "--objectives", "ae", "ce", "ad", "cd", "--max-steps", "2"]
    mt.main([*args, "--out-dir", str(tmp_path / "one")])
    result = run_script("moco_taxonomy.py", *args, "--out-dir", str(tmp_path / "two"), nproc=2, check=False)
    # tqdm's carriage-return updates fill the tail of stderr: show the other lines if it failed
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip() and "it/s" not in line]
    assert result.returncode == 0, "\n".join(lines[-80:])
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    for key in ("loss", "loss_ae", "loss_ce", "loss_ad", "loss_cd"):
        assert one[0][key] == pytest.approx(two[0][key], rel=1e-5), key
        assert one[1][key] == pytest.approx(two[1][key], rel=1e-4), key
    assert "knn_top1" in one[-1] and "knn_top1" in two[-1]  # (evaluated once, by rank 0)
    saved = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in ("one", "two")]
    for key in ("queue.keys", "queue_dec.keys", "encoder_k.head.weight"):
        torch.testing.assert_close(saved[0][key], saved[1][key], atol=1e-5, rtol=0)


def test_bf16_autocast_runs_on_the_cpu_with_the_losses_in_fp32(tmp_path):
    # --precision bf16 (the GPU setting) runs on a CPU too: the linear layers in bf16, the recurrent nets in
    # fp32 on a CPU (run_recurrent: a CPU LSTM under autocast fails on CPUs without AVX-512 BF16), losses in fp32.
    cfg = engine.parse_config(mt.Config, [*TINY, "--objectives", "ae", "ce", "ad", "cd"])
    common.seed_everything(0)
    model = mt.TaxonomyMoCo(cfg, joints=15, frames=16)
    x, x1, x2 = (randn(8, 16, 15, 3, seed=s) for s in range(3))
    fp32_loss, fp32_parts, *_ = model(x, x1, x2)
    with common.autocast(torch.device("cpu"), "bf16"):
        assert mt.run_recurrent(model.encoder_q.rnn, x.flatten(2)).dtype == torch.float32
        assert model.decoder_q(model.encoder_q(x)[0]).dtype == torch.bfloat16  # the output layer does run in bf16
        loss, parts, *_ = model(x, x1, x2)
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in parts.values())
    assert loss.item() == pytest.approx(fp32_loss.item(), rel=0.05) and loss.item() != fp32_loss.item()
    for cell in ("gru", "lstm"):  # the script end to end, 2 steps (an LSTM under CPU autocast needs run_recurrent)
        mt.main([*TINY, "--cell", cell, "--objectives", "ae", "ce", "ad", "cd", "--max-steps", "2", "--precision",
                 "bf16", "--out-dir", str(tmp_path / cell)])
        records = [r for r in read_metrics(tmp_path / cell) if "loss" in r]
        assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss"]) for r in records)
        assert torch.load(tmp_path / cell / "checkpoint.pt", weights_only=True)["step"] == 2


def test_logging_every_few_steps_keeps_the_numbers_and_names_the_step_a_nan_began(tmp_path, monkeypatch):
    # 12 steps per epoch. Records only at --log-every steps and the last, each with the numbers a --log-every 1 run
    # writes for that step; a loss that turns NaN at step 14 stops the run at the next record (step 15), the error
    # naming step 14, and the checkpoint of step 12 is kept.
    args = [*TINY, "--objectives", "ae", "ce", "ad", "--epochs", "2", "--max-steps", "16"]
    mt.main([*args, "--out-dir", str(tmp_path / "every")])
    mt.main([*args, "--log-every", "5", "--out-dir", str(tmp_path / "few")])
    every, few = ({r["step"]: r for r in read_metrics(tmp_path / d) if "loss" in r} for d in ("every", "few"))
    assert sorted(every) == list(range(1, 17)) and sorted(few) == [5, 10, 15, 16]
    rateless = lambda record: {k: v for k, v in record.items() if k != "images_per_s"}  # noqa: E731
    assert all(rateless(few[step]) == rateless(every[step]) for step in few)

    real_loss, calls = mt.attractive_encoder_loss, []

    def nan_from_step_14(*loss_args):
        calls.append(1)
        return real_loss(*loss_args) * (float("nan") if len(calls) >= 14 else 1.0)

    monkeypatch.setattr(mt, "attractive_encoder_loss", nan_from_step_14)
    with pytest.raises(SystemExit, match=r"^error: the loss is nan at step 14: training diverged"):
        mt.main([*args, "--log-every", "5", "--out-dir", str(tmp_path / "nan")])
    assert [r["step"] for r in read_metrics(tmp_path / "nan") if "loss" in r] == [5, 10]
    assert torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)["step"] == 12


def test_resume_continues_exactly(tmp_path):
    args = [*TINY, "--objectives", "ae", "ce", "ad", "cd", "--epochs", "3"]
    # 200 sequences / 16 = 12 steps per epoch: stop at 10, resume across the epoch boundary to 16
    mt.main([*args, "--max-steps", "10", "--out-dir", str(tmp_path / "a")])
    mt.main([*args, "--max-steps", "16", "--out-dir", str(tmp_path / "a"), "--resume",
             str(tmp_path / "a" / "checkpoint.pt")])
    mt.main([*args, "--max-steps", "16", "--out-dir", str(tmp_path / "b")])
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in ("a", "b"))
    assert a["step"] == b["step"] == 16
    for key in b["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    loss = lambda d: [r["loss"] for r in read_metrics(tmp_path / d) if "loss" in r]  # noqa: E731
    assert loss("a") == loss("b")


def test_short_cpu_run_learns_on_the_synthetic_motions(tmp_path):
    """kNN top-1 of the action classes after a short run is clearly above the same encoder at random init. (The
    motions are synthetic: ../shared/data holds no skeleton sequences.)"""
    args = ["--synthetic-size", "800", "--width", "64", "--objectives", "ae", "ce", "ad", "--max-steps", "200",
            "--probe-epochs", "0", "--out-dir", str(tmp_path)]
    cfg = engine.parse_config(mt.Config, args)
    data = mt.load_sequences(cfg)
    common.seed_everything(cfg.seed)
    untrained = mt.TaxonomyMoCo(cfg, joints=15, frames=32)
    before = mt.evaluate(untrained.encoder_q, data, cfg, torch.device("cpu"))["knn_top1"]
    mt.main(args)
    after = read_metrics(tmp_path)[-1]["knn_top1"]
    print(f"kNN top-1: random init {before:.1f}%, after 200 steps {after:.1f}%")
    assert after > before + 5.0


def test_taxonomy_trains_all_15_rows_prints_the_table_and_resumes(tmp_path, capsys):
    args = [*TINY, "--synthetic-size", "64", "--max-steps", "2", "--out-dir", str(tmp_path)]
    rows = mt.taxonomy(args)
    assert sorted(r["objectives"] for r in rows) == sorted(mt.taxonomy_rows())
    table = capsys.readouterr().out.strip().splitlines()[-17:]
    assert table[0].startswith("| L_AE | L_CE | L_AD | L_CD |") and len(table) == 17
    assert (tmp_path / "taxonomy.md").read_text().strip().splitlines() == table
    assert (tmp_path / "ae-ce-ad-cd" / "checkpoint.pt").exists()
    without_time = lambda rows: [{k: v for k, v in r.items() if k != "minutes"} for r in rows]  # noqa: E731
    assert without_time(mt.taxonomy(args)) == without_time(rows)  # finished rows are resumed, not retrained


@pytest.mark.parametrize("args,message", [
    (["--objectives"], "needs at least one"),
    (["--objectives", "ae", "ae"], "lists one twice"),
    (["--batch-size", "5000"], "larger than the dataset"),
    (["--crop", "0"], "--crop: 0.0 is out of range (must be in (0, 1])"),
    (["--crop", "nan"], "--crop: nan is out of range"),
    (["--layers", "0"], "--layers: 0 is out of range (must be >= 1)"),
    (["--frames", "1"], "at least 2"),
    (["--frames", "-3"], "--frames: -3 is out of range (must be >= 0)"),
    (["--synthetic-size", "0"], "--synthetic-size: 0 is out of range (must be >= 1)"),
    (["--moco-m", "1.5"], "--moco-m: 1.5 is out of range (must be in [0, 1])"),
    (["--lr", "nan"], "--lr: nan is out of range"),
    (["--dataset", "npz"], "needs --data-root"),
    (["--dataset", "npz", "--data-root", "/nonexistent"], "does not exist"),
    (["--resume", "JUNK"], "not a checkpoint"),
])
def test_bad_input_stops_with_one_clear_error(tmp_path, capsys, args, message):
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    args = [str(tmp_path / "junk.pt") if a == "JUNK" else a for a in args]
    with pytest.raises(SystemExit) as stop:
        mt.main([*TINY, *args, "--out-dir", str(tmp_path / "run")])
    line = error_line(stop, capsys)
    assert line.startswith("error:") and message in line
    assert not (tmp_path / "run").exists()  # nothing written before the inputs are known to be good


@pytest.mark.parametrize("arrays,message", [
    ({"labels": None}, "lacks the array(s) labels"),
    ({"sequences": np.zeros((40, 12, 5, 2), np.float32)}, "expected (N, T, J, 3)"),
    ({"labels": np.zeros(39, np.int64)}, "expected integers of shape (40,)"),
    ({"labels": np.full(40, 0.5)}, "expected integers"),
    ({"sequences": np.full((40, 12, 5, 3), np.nan, np.float32)}, "must be finite"),
    ({"labels": np.full(40, -1)}, "labels must be 0..C-1"),
])
def test_bad_arrays_stop_with_one_clear_error(tmp_path, arrays, message):
    write_npz(tmp_path / "test.npz")
    write_npz(tmp_path / "train.npz", **arrays)
    with pytest.raises(SystemExit) as stop:
        mt.main(["--dataset", "npz", "--data-root", str(tmp_path), "--out-dir", str(tmp_path / "run")])
    assert str(stop.value.code).startswith("error:") and message in str(stop.value.code), stop.value.code


def test_bad_input_on_the_command_line_prints_one_line_and_exits_non_zero(tmp_path):
    result = run_script("moco_taxonomy.py", *TINY, "--objectives", "ae", "xx", "--out-dir", str(tmp_path),
                        check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "invalid choice: 'xx'" in lines[0]


def test_unknown_flags_and_choices_are_refused(capsys):
    for args in (["--objectives", "ae", "xx"], ["--cell", "rnn"], ["--no-such-flag"]):
        with pytest.raises(SystemExit) as stop:
            engine.parse_config(mt.Config, args)
        assert stop.value.code == 2 and capsys.readouterr().err.startswith("error:")
