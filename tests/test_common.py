"""common.py against independent computations: queue, momentum, SplitBN, shuffle BN, gathers (world 1 and 2),
sampler sharding, kNN, config parsing, checkpoints, backbone export."""
import collections
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import common
import engine
from conftest import CIFAR_JPG, needs_cifar, run_script


def test_queue_matches_a_fifo_for_any_batch_size():
    torch.manual_seed(0)
    queue = common.Queue(size=10, dim=3)
    fifo = collections.deque(queue.keys.clone(), maxlen=10)  # oldest entry first
    for batch in (4, 3, 7, 10, 13, 1):  # none of these divides K except 10; 13 is larger than K
        keys = F.normalize(torch.randn(batch, 3), dim=1)
        queue.enqueue(keys)
        fifo.extend(keys)
        # the queue is a ring buffer: read from the pointer on, it lists entries oldest first
        order = (queue.ptr + torch.arange(10)) % 10
        assert torch.equal(queue.keys[order], torch.stack(list(fifo)))


def test_momentum_update_is_the_convex_combination_of_parameters_only():
    torch.manual_seed(0)
    q, k = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    k[1].running_mean.fill_(3.0)
    expected = [0.9 * pk + 0.1 * pq for pk, pq in zip(k.parameters(), q.parameters())]
    common.momentum_update(k, q, 0.9)
    for p, e in zip(k.parameters(), expected):
        torch.testing.assert_close(p, e)
    assert torch.all(k[1].running_mean == 3.0)  # buffers untouched


def test_split_batchnorm_normalizes_each_contiguous_group_separately():
    torch.manual_seed(0)
    x = torch.randn(12, 5, 4, 4)
    bn = common.SplitBatchNorm(5, num_splits=3)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-1, 1)
    plain = nn.BatchNorm2d(5)
    plain.load_state_dict(bn.state_dict())  # same keys, so exported weights load into plain BatchNorm2d
    groups = [F.batch_norm(g, None, None, bn.weight, bn.bias, True) for g in x.chunk(3)]
    torch.testing.assert_close(bn(x), torch.cat(groups))
    # running statistics: the mean of what each group alone would have recorded
    running = [nn.BatchNorm2d(5) for _ in range(3)]
    for r, g in zip(running, x.chunk(3)):
        r(g)
    torch.testing.assert_close(bn.running_mean, torch.stack([r.running_mean for r in running]).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack([r.running_var for r in running]).mean(0))


def test_shuffled_bn_returns_keys_in_input_order_at_world_one():
    torch.manual_seed(0)
    encoder = nn.Linear(6, 3)  # per-sample: shuffling must not change anything once undone
    x = torch.randn(10, 6)
    torch.testing.assert_close(common.encode_with_shuffled_bn(encoder, x), encoder(x))


def test_gathers_are_identity_at_world_one():
    x = torch.randn(4, 3, requires_grad=True)
    assert common.concat_all_gather(x) is x
    assert common.gather_with_grad(x) is x
    torch.testing.assert_close(common.all_reduce_mean(x), x)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    full = torch.randn(8, 5)  # the global batch, identical on both ranks; rank r holds rows [4r, 4r+4)
    weight = torch.randn(5, 5)
    mine = full.chunk(world)[rank].clone().requires_grad_()
    out = {}
    out["gather"] = torch.equal(common.concat_all_gather(mine.detach()), full)
    # gather_with_grad: the gradient of a loss over the whole gathered batch, summed over ranks, must be the
    # single-process gradient of that loss with respect to my rows.
    gathered = common.gather_with_grad(mine)
    loss = (gathered @ weight).tanh().sum()
    loss.backward()
    reference = full.clone().requires_grad_()
    (reference @ weight).tanh().sum().backward()
    out["grad"] = torch.allclose(mine.grad, world * reference.grad.chunk(world)[rank], atol=1e-6)
    # shuffle BN round trip: a per-sample encoder must give back my own rows' outputs
    encoder = nn.Linear(5, 3)
    torch.manual_seed(1)
    encoder.reset_parameters()
    out["shuffle"] = torch.allclose(common.encode_with_shuffled_bn(encoder, mine.detach()), encoder(mine.detach()))
    # sampler: ranks' slices, gathered, are the global batches a single process would read
    sampler = common.EpochSampler(num_samples=20, global_batch=8, seed=3)
    sampler.set_epoch(2)
    out["sampler"] = list(sampler)
    results[rank] = out
    dist.destroy_process_group()


def test_gathers_shuffle_and_sampler_at_world_two():
    results = mp.Manager().dict()
    mp.spawn(_distributed_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    for rank in (0, 1):
        assert results[rank]["gather"] and results[rank]["shuffle"]
        # gradient of the SUM of both ranks' identical losses: twice the single-process gradient
        assert results[rank]["grad"]
    single = common.EpochSampler(num_samples=20, global_batch=8, seed=3)
    single.set_epoch(2)
    single = list(single)
    assert len(single) == 16  # 2 full batches of 8; the last 4 samples are dropped
    rebuilt = [pair for b in range(2) for rank in (0, 1) for pair in results[rank]["sampler"][b * 4:(b + 1) * 4]]
    assert rebuilt == single


def test_sampler_resumes_mid_epoch_with_the_same_samples_and_seeds():
    full = common.EpochSampler(num_samples=50, global_batch=10, seed=0)
    full.set_epoch(1)
    resumed = common.EpochSampler(num_samples=50, global_batch=10, seed=0)
    resumed.set_epoch(1, start_batch=3)
    assert list(resumed) == list(full)[30:]
    other_epoch = common.EpochSampler(num_samples=50, global_batch=10, seed=0)
    assert list(other_epoch) != list(full)


@needs_cifar
def test_augmented_views_seed_the_cpu_generator_alone_with_the_same_views_as_fork_rng():
    """Seeding only the CPU generator gives the views fork_rng + manual_seed gave, bit for bit, and leaves
    the global generator where it was."""
    data = common.load_image_data("folder", str(CIFAR_JPG))
    augment = common.pretrain_transform(data.image_size, data.mean, data.std)
    views = common.AugmentedViews(data.pretrain, common.MultiView([augment, augment]))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for index, seed in [(0, 7), (1234, 2**62 - 1), (19999, 42)]:
        (view_1, view_2), label = views[index, seed]
        image, expected_label = data.pretrain[index]
        with torch.random.fork_rng(devices=[]):  # reference: the global RNG seeded per sample
            torch.manual_seed(seed)
            expected_1, expected_2 = augment(image), augment(image)
        assert torch.equal(view_1, expected_1) and torch.equal(view_2, expected_2) and label == expected_label
        assert not torch.equal(view_1, view_2)
    assert torch.equal(torch.get_rng_state(), before)


def test_knn_predict_matches_a_naive_weighted_vote():
    torch.manual_seed(0)
    bank = F.normalize(torch.randn(60, 8), dim=1)
    labels = torch.randint(0, 4, (60,))
    queries = F.normalize(torch.randn(7, 8), dim=1)
    pred = common.knn_predict(queries, bank, labels, 4, k=10, temperature=0.1)
    for i, query in enumerate(queries):
        sims = [(float(query @ b), int(y)) for b, y in zip(bank, labels)]
        votes = [0.0] * 4
        for sim, label in sorted(sims, reverse=True)[:10]:
            votes[label] += torch.exp(torch.tensor(sim / 0.1)).item()
        assert pred[i].item() == max(range(4), key=votes.__getitem__)


def test_backbone_state_dict_loads_strictly_into_torchvision_resnet18():
    ours = common.build_backbone("resnet18", "cifar", bn_splits=8)
    reference = common.cifar_stem(torchvision.models.resnet18())
    reference.fc = nn.Identity()
    reference.load_state_dict(ours.state_dict(), strict=True)
    plain = common.build_backbone("resnet18", "imagenet")
    imagenet = torchvision.models.resnet18()
    missing, unexpected = imagenet.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected


def test_parse_config_turns_fields_into_flags_with_defaults_in_help(capsys):
    import moco_ring

    cfg = engine.parse_config(moco_ring.Config, ["--batch-size", "64", "--no-mlp", "--anneal", "step"])
    assert cfg.batch_size == 64 and cfg.mlp is False and cfg.anneal == "step" and cfg.moco_k == 4096
    with pytest.raises(SystemExit):
        engine.parse_config(moco_ring.Config, ["--batch-size", "many"])
    assert "error: argument --batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        engine.parse_config(moco_ring.Config, ["--help"])
    assert "(default: 4096)" in capsys.readouterr().out


def test_checkpoint_is_written_atomically_and_refused_when_foreign(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "checkpoint.pt"
    engine.save_checkpoint(path, "moco_ring", {"lr": 0.1}, 7, model, {"encoder": opt}, model)
    assert not (tmp_path / "checkpoint.pt.tmp").exists()
    state = engine.load_checkpoint(str(path), "moco_ring", {"lr": 0.1, "out_dir": "elsewhere"})
    assert state["step"] == 7 and torch.equal(state["model"]["weight"], model.weight)
    with pytest.raises(SystemExit, match="different config"):
        engine.load_checkpoint(str(path), "moco_ring", {"lr": 0.2})
    # settings added to the script after the checkpoint was written take the given value; removed ones are refused
    assert engine.load_checkpoint(str(path), "moco_ring", {"lr": 0.1, "precision": "bf16"})["step"] == 7
    with pytest.raises(SystemExit, match="lr: 0.1 -> None"):
        engine.load_checkpoint(str(path), "moco_ring", {"precision": "bf16"})
    with pytest.raises(SystemExit, match="written by moco_ring.py"):
        engine.load_checkpoint(str(path), "adco", None)
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="not a checkpoint"):
        engine.load_checkpoint(str(tmp_path / "junk.pt"))


def test_linear_probe_separates_linearly_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 3
    labels = torch.arange(300) % 3
    features = centers[labels] + 0.3 * torch.randn(300, 16, generator=g)
    top1 = common.linear_probe(features[:200], labels[:200], features[200:], labels[200:], 3, epochs=20)
    assert top1 == 100.0


@pytest.mark.skipif(not CIFAR_JPG.is_dir(), reason="../shared/data/cifar10-jpg not found")
def test_probe_command_reads_a_saved_checkpoint(tmp_path):
    import moco_ring

    moco_ring.main(["--dataset", "folder", "--data-root", str(CIFAR_JPG), "--arch", "small", "--workers", "0",
                    "--batch-size", "16", "--moco-k", "32", "--max-steps", "1", "--knn-bank-size", "32",
                    "--knn-test-size", "16", "--out-dir", str(tmp_path)])
    result = run_script("engine.py", "probe", str(tmp_path / "checkpoint.pt"), "--epochs", "3", "--train-size",
                        "500", "--test-size", "200", "--workers", "0")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["step"] == 1 and 10.0 < report["linear_top1"] <= 100.0  # above chance on real images
