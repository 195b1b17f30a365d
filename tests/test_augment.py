"""The device augmentation (engine.DeviceAugment) against torchvision: its parameter samplers (distributions,
probabilities) and its functional ops (pixels, for the same parameters); seeds -> views as a pure function (resume,
1 process == N processes); the in-memory dataset and its loader; StepMetrics; `benchmark.py gpu --smoke`.

Pixel tolerance: 1e-5 on [0, 1] pixels (1e-4 after normalising by std ~0.25). The filters are torchvision's own
(the antialiased bilinear of interpolate, the blend formulas, the HSV sector table), so what differs is float32
rounding only (measured: 3e-7 crop and resize, 2e-6 hue, 3e-6 the whole jitter chain)."""
import json
import math
import os
import subprocess
import sys
import threading

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import common
import engine
from conftest import ROOT

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def images(n, size, seed=0):
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def seeds(n, seed=1):
    return torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(seed))


def reference_view(image: torch.Tensor, p: engine.ViewParams, i: int, size: int, blur_kernel: int) -> torch.Tensor:
    """torchvision.transforms.functional, step by step, with sample i's parameters (pretrain_transform's order)."""
    x = TF.resized_crop(image.float() / 255, int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i]),
                        [size, size], antialias=True)
    if p.jitter[i]:
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in p.order[i].tolist():
            x = ops[op](x, float(p.factors[i, op]))
    if p.grayscale[i]:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if p.blur[i]:
        x = TF.gaussian_blur(x, [blur_kernel, blur_kernel], [float(p.sigma[i])] * 2)
    if p.flip[i]:
        x = TF.hflip(x)
    return TF.normalize(x, MEAN, STD)


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest gap between the empirical CDFs of two samples (two-sample Kolmogorov-Smirnov statistic)."""
    values = torch.cat([a, b]).unique()
    cdf = lambda s: torch.searchsorted(s.sort().values.contiguous(), values, right=True).double() / len(s)
    return (cdf(a) - cdf(b)).abs().max().item()


def ks_threshold(n: int, m: int) -> float:
    return 1.95 * math.sqrt((n + m) / (n * m))  # two-sample KS at p = 0.001 (conservative for discrete values)


@pytest.mark.parametrize("side", [32, 96])
def test_crop_boxes_follow_random_resized_crop_get_params(side):
    n = 20_000
    p = engine.DeviceAugment(side, MEAN, STD).params(seeds(n), side, side)
    torch.manual_seed(0)
    reference = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(1, side, side), (0.2, 1.0), (3 / 4, 4 / 3))
                              for _ in range(n)])  # (top, left, height, width)
    ours = torch.stack([p.top, p.left, p.height, p.width], dim=1)
    assert (ours[:, 0] + ours[:, 2] <= side).all() and (ours[:, 1] + ours[:, 3] <= side).all() and (ours >= 0).all()
    for column, name in enumerate(("top", "left", "height", "width")):
        assert ks_distance(ours[:, column].double(), reference[:, column].double()) < ks_threshold(n, n), name
    area = (ours[:, 2] * ours[:, 3]).double() / side**2
    assert ks_distance(area, (reference[:, 2] * reference[:, 3]).double() / side**2) < ks_threshold(n, n)


def test_crop_falls_back_to_torchvision_centre_crop_when_no_box_fits():
    augment = engine.DeviceAugment(32, MEAN, STD, min_scale=0.99)
    p = augment.params(seeds(2000), 8, 64)  # 8x64: a 4/3 box of 99% of the area never fits
    assert (p.height == 8).all() and (p.width == round(8 * 4 / 3)).all()
    assert (p.top == 0).all() and (p.left == (64 - 11) // 2).all()


def test_jitter_factors_probabilities_and_orders_follow_torchvision():
    n = 20_000
    p = engine.DeviceAugment(96, MEAN, STD).params(seeds(n), 96, 96)
    torch.manual_seed(0)
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
    draws = [T.ColorJitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
             for _ in range(n)]
    reference = torch.tensor([d[1:] for d in draws])  # b, c, s, h factors
    for op in range(4):
        assert ks_distance(p.factors[:, op].double(), reference[:, op].double()) < ks_threshold(n, n)
    assert p.factors[:, :3].min() >= 0.6 and p.factors[:, :3].max() <= 1.4 and p.factors[:, 3].abs().max() <= 0.1
    for drawn, probability in ((p.jitter, 0.8), (p.grayscale, 0.2), (p.blur, 0.5), (p.flip, 0.5)):
        assert abs(drawn.double().mean() - probability) < 5 * math.sqrt(probability * (1 - probability) / n)
    assert ks_distance(p.sigma.double(), torch.empty(n).uniform_(0.1, 2.0).double()) < ks_threshold(n, n)
    # the order: each of the 24 permutations of the 4 ops, as often as randperm(4) gives it
    codes = (p.order * torch.tensor([64, 16, 4, 1])).sum(1)
    counts = torch.bincount(codes, minlength=256)[torch.bincount(codes, minlength=256) > 0]
    assert len(counts) == 24 and (counts - n / 24).abs().max() < 5 * math.sqrt(n / 24 * (23 / 24))


def test_no_blur_below_64_px_as_pretrain_transform():
    assert not engine.DeviceAugment(32, MEAN, STD).params(seeds(1000), 32, 32).blur.any()


@pytest.mark.parametrize("stored, out", [(32, 32), (96, 96), (80, 32)])  # enlarge, enlarge, shrink (antialias)
def test_crop_and_resize_equal_torchvision_resized_crop_and_hflip(stored, out):
    x, p = images(64, stored), engine.DeviceAugment(out, MEAN, STD).params(seeds(64), stored, stored)
    rows = engine.resize_matrix(p.top, p.height, stored, out)
    cols = engine.resize_matrix(p.left, p.width, stored, out, p.flip)
    ours = engine.crop_resize(x, rows, cols) / 255
    for i in range(64):
        ref = TF.resized_crop(x[i].float() / 255, int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i]),
                              [out, out], antialias=True)
        torch.testing.assert_close(ours[i], TF.hflip(ref) if p.flip[i] else ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("stored, out", [(32, 32), (64, 64), (20, 32)])
def test_enlarging_crops_by_grid_sample_equal_torchvision_resized_crop_and_hflip(stored, out):
    """apply()'s path when no crop is larger than the output (stored <= out, out a power of two): bilinear,
    clamped to the crop."""
    x, p = images(64, stored), engine.DeviceAugment(out, MEAN, STD).params(seeds(64), stored, stored)
    ours = engine.crop_enlarge(x, p, out) / 255
    assert ours.shape == (64, 3, out, out)
    for i in range(64):
        ref = TF.resized_crop(x[i].float() / 255, int(p.top[i]), int(p.left[i]), int(p.height[i]), int(p.width[i]),
                              [out, out], antialias=True)
        torch.testing.assert_close(ours[i], TF.hflip(ref) if p.flip[i] else ref, atol=1e-5, rtol=0)


def test_whole_view_of_shrinking_crops_equals_torchvision_ops():
    """Stored 80 px, views of 32 px: apply() takes the antialiased matrix path."""
    n, stored, side = 24, 80, 32
    augment, x, s = engine.DeviceAugment(side, MEAN, STD), images(n, stored), seeds(n)
    p = augment.params(s, stored, stored)
    ours = augment(x, s)
    for i in range(n):
        torch.testing.assert_close(ours[i], reference_view(x[i], p, i, side, augment.blur_kernel), atol=1e-4, rtol=0)

@pytest.mark.parametrize("op", range(4))
def test_each_jitter_op_equals_torchvision(op):
    """One op with its factor, the three others at their identity factors (1, 1, 1, hue 0: rounding only)."""
    x = images(32, 32).float() / 255
    factor = torch.linspace(-0.1, 0.1, 32) if op == 3 else torch.linspace(0.6, 1.4, 32)
    factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(32, 1)
    factors[:, op] = factor
    order = torch.tensor([op, *[o for o in range(4) if o != op]]).repeat(32, 1)
    ours = x.clone()
    engine.color_jitter(ours, torch.ones(32, dtype=torch.bool), order, factors)
    torchvision_op = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)[op]
    for i in range(32):
        torch.testing.assert_close(ours[i], torchvision_op(x[i], float(factor[i])), atol=1e-5, rtol=0)


def test_jitter_skips_the_samples_it_is_not_applied_to():
    x = images(16, 32).float() / 255
    ours = x.clone()
    applied = torch.arange(16) % 2 == 0
    engine.color_jitter(ours, applied, torch.arange(4).repeat(16, 1), torch.tensor([1.3, 0.7, 1.2, 0.05]).repeat(16, 1))
    assert torch.equal(ours[~applied], x[~applied]) and not torch.allclose(ours[applied], x[applied])


def test_hue_of_grey_and_saturated_pixels_equals_torchvision():
    x = torch.tensor([[0.5, 0.5, 0.5], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0],
                      [0.2, 0.7, 0.7], [0.0, 0.0, 0.0]]).T.reshape(1, 3, 1, 7)
    for hue in (-0.1, -0.03, 0.0, 0.05, 0.1):
        torch.testing.assert_close(engine.adjust_hue(x, torch.tensor([hue])), TF.adjust_hue(x, hue), atol=1e-6, rtol=0)


def test_whole_jitter_chain_in_random_orders_equals_torchvision():
    """The fused blend pass (brightness, contrast, saturation as one a x + b gray + c per position, identity where
    the sample has hue or no jitter) against torchvision's ops one after the other, in each sample's own order."""
    n = 96
    x = images(n, 32, seed=4).float() / 255
    p = engine.DeviceAugment(32, MEAN, STD).params(seeds(n, seed=7), 32, 32)
    ours = x.clone()
    engine.color_jitter(ours, p.jitter, p.order, p.factors)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(n):
        ref = x[i]
        if p.jitter[i]:
            for op in p.order[i].tolist():
                ref = ops[op](ref, float(p.factors[i, op]))
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)
    assert torch.equal(ours[~p.jitter], x[~p.jitter])


def test_hue_without_remainder_at_the_ends_of_its_range_equals_torchvision():
    """6h + 6 hue spans [-1.6, 5.6): pixels whose hue sits at either end of torchvision's sectors (max r with b > g:
    6h near -1; max b with r > g: 6h near 5), each sector boundary and random pixels, rotated by hue in [-0.1, 0.1]."""
    edge = torch.tensor([[1.0, 0.0, 0.999], [0.999, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.5], [0.5, 0.0, 1.0],
                         [1.0, 1.0, 0.2], [0.2, 1.0, 1.0], [1.0, 0.2, 1.0], [0.3, 0.3, 0.3]]).T
    noise = torch.rand(1, 3, 1, 500, generator=torch.Generator().manual_seed(0))
    for hue in (-0.1, -0.0999, -0.05, 0.0, 0.02, 0.0999, 0.1):
        for x, atol in ((edge.reshape(1, 3, 1, -1), 1e-6), (noise, 1e-5)):  # 1e-5: this file's pixel tolerance
            torch.testing.assert_close(engine.adjust_hue(x, torch.tensor([hue])), TF.adjust_hue(x, hue), atol=atol,
                                       rtol=0)


def test_grayscale_and_normalize_in_two_passes_equal_torchvision():
    x, gray = images(16, 32).float() / 255, torch.arange(16) % 3 == 0
    out = torch.empty(16, 3, 32, 32)
    result = engine.grayscale_normalize(x, gray, torch.tensor(MEAN).view(1, 3, 1, 1),
                                        torch.tensor(STD).view(1, 3, 1, 1), out=out)
    assert result.data_ptr() == out.data_ptr()
    for i in range(16):
        ref = TF.rgb_to_grayscale(x[i], num_output_channels=3) if gray[i] else x[i]
        torch.testing.assert_close(out[i], TF.normalize(ref, MEAN, STD), atol=1e-5, rtol=0)


def test_blur_before_grayscale_gives_torchvision_s_grayscale_then_blur():
    """apply() blurs before the grayscale (they commute); forced on for every sample, against torchvision's order."""
    n, side = 8, 96
    augment, x = engine.DeviceAugment(side, MEAN, STD), images(n, side, seed=2)
    p = augment.params(seeds(n, seed=3), side, side)._replace(grayscale=torch.ones(n, dtype=torch.bool),
                                                              blur=torch.ones(n, dtype=torch.bool))
    ours = augment.apply(x, p)
    for i in range(n):
        torch.testing.assert_close(ours[i], reference_view(x[i], p, i, side, augment.blur_kernel), atol=1e-4, rtol=0)

def test_grayscale_and_blur_equal_torchvision():
    x = images(8, 96).float() / 255
    torch.testing.assert_close(engine.grayscale(x).expand(-1, 3, -1, -1), TF.rgb_to_grayscale(x, 3), atol=1e-6, rtol=0)
    sigma = torch.linspace(0.1, 2.0, 8)
    ours = engine.gaussian_blur(x, 9, sigma)
    for i in range(8):
        torch.testing.assert_close(ours[i], TF.gaussian_blur(x[i], [9, 9], [float(sigma[i])] * 2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("side, n", [(32, 40), (96, 12)])  # 96: the blur is on (kernel 9)
def test_whole_view_equals_torchvision_ops_with_the_same_parameters(side, n):
    augment, x, s = engine.DeviceAugment(side, MEAN, STD), images(n, side), seeds(n)
    p = augment.params(s, side, side, view=1)
    ours = augment(x, s, view=1)
    assert ours.shape == (n, 3, side, side) and ours.dtype == torch.float32
    for i in range(n):
        torch.testing.assert_close(ours[i], reference_view(x[i], p, i, side, augment.blur_kernel), atol=1e-4, rtol=0)


def test_a_sample_s_views_depend_on_its_seed_only_not_on_its_batch():
    """Exact resume and 1 process == N processes: the views of sample i are a function of (image i, seed i), the
    same whatever its neighbours, its position, the batch size or the CPU slicing (300 > CPU_CHUNK)."""
    augment, x, s = engine.DeviceAugment(32, MEAN, STD), images(300, 32), seeds(300)
    whole = augment.views(x, s, 2)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(3))
    shuffled = augment.views(x[perm], s[perm], 2)
    alone = [augment.views(x[i:i + 1], s[i:i + 1], 2) for i in (0, 131, 299)]
    for v in range(2):
        torch.testing.assert_close(shuffled[v], whole[v][perm], atol=1e-6, rtol=0)
        for i, views in zip((0, 131, 299), alone):
            torch.testing.assert_close(views[v][0], whole[v][i], atol=1e-6, rtol=0)
    assert torch.equal(augment.views(x, s, 2)[0], whole[0])  # the same call twice: bit for bit
    assert not torch.allclose(whole[0], whole[1])  # the two views differ


def test_seeded_uniforms_are_a_pure_uniform_function_of_the_seed():
    s = seeds(5000)
    u = engine.seeded_uniforms(s, 64)
    assert u.shape == (5000, 64) and u.min() >= 0 and u.max() < 1
    assert torch.equal(engine.seeded_uniforms(s[10:20], 64), u[10:20])
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / u.numel())
    assert not torch.equal(engine.seeded_uniforms(s, 64, stream=1), u)
    assert abs(torch.corrcoef(torch.stack([u[:, 0], u[:, 1]]))[0, 1]) < 5 / math.sqrt(5000)


def write_folder(root, sizes, bad=None):
    for i, size in enumerate(sizes):
        folder = root / "train" / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = images(1, size, seed=i)[0].permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")
    if bad:
        (root / "train" / "class0" / bad).write_bytes(b"not an image")


def test_folder_is_decoded_once_into_one_uint8_tensor(tmp_path):
    write_folder(tmp_path, [16] * 6)
    import torchvision.datasets as D

    folder = D.ImageFolder(tmp_path / "train", loader=common.read_image)
    memory = engine.load_into_memory(folder, torch.device("cpu"))
    assert memory.images.shape == (6, 3, 16, 16) and memory.images.dtype == torch.uint8
    for i in range(6):
        image, label = folder[i]
        assert torch.equal(memory.images[i], TF.pil_to_tensor(image)) and memory.labels[i] == label
    assert engine.dataset_bytes(folder) == 6 * 3 * 16 * 16 and engine.fits_in_memory(folder, torch.device("cpu"))


def test_a_bad_image_names_its_file_and_mixed_sizes_ask_for_the_cpu_path(tmp_path):
    import torchvision.datasets as D

    write_folder(tmp_path / "bad", [16] * 2, bad="broken.jpg")
    with pytest.raises(common.DataError, match="broken.jpg"):
        engine.load_into_memory(D.ImageFolder(tmp_path / "bad" / "train", loader=common.read_image),
                                torch.device("cpu"))
    write_folder(tmp_path / "mixed", [16, 20])
    with pytest.raises(SystemExit, match="--augment cpu"):
        engine.load_into_memory(D.ImageFolder(tmp_path / "mixed" / "train", loader=common.read_image),
                                torch.device("cpu"))


def test_torchvision_arrays_are_taken_as_they_are():
    class FakeCifar:  # torchvision's CIFAR10 layout: data NxHxWx3 uint8, targets a list
        data = images(5, 8).permute(0, 2, 3, 1).numpy()
        targets = [3, 1, 4, 1, 5]

    memory = engine.load_into_memory(FakeCifar(), torch.device("cpu"))
    assert torch.equal(memory.images, torch.from_numpy(FakeCifar.data).permute(0, 3, 1, 2))
    assert memory.labels.tolist() == [3, 1, 4, 1, 5]


def loader_batches(memory, monkeypatch, world, rank, start_batch=0, yield_index=True):
    monkeypatch.setattr(common, "world_size", lambda: world)
    monkeypatch.setattr(common, "rank", lambda: rank)
    sampler = common.EpochSampler(len(memory.images), 8, seed=5)
    sampler.set_epoch(2, start_batch)
    loader = engine.DeviceViewLoader(memory, engine.DeviceAugment(16, MEAN, STD), 2, sampler, 8 // world,
                                     yield_index)
    return list(loader), len(loader)


def test_loader_resumes_mid_epoch_and_two_ranks_see_the_one_process_batch(monkeypatch):
    memory = engine.ImagesInMemory(images(40, 16), torch.arange(40) % 3)
    full, length = loader_batches(memory, monkeypatch, 1, 0)
    assert length == len(full) == 5 and all(len(views) == 2 and views[0].shape == (8, 3, 16, 16)
                                            for views, _ in full)
    resumed, _ = loader_batches(memory, monkeypatch, 1, 0, start_batch=3)
    for (views, index), (views_r, index_r) in zip(full[3:], resumed):
        assert torch.equal(index, index_r) and all(torch.equal(a, b) for a, b in zip(views, views_r))
    halves = [loader_batches(memory, monkeypatch, 2, r)[0] for r in (0, 1)]
    for b, (views, index) in enumerate(full):
        (v0, i0), (v1, i1) = halves[0][b], halves[1][b]
        assert torch.equal(torch.cat([i0, i1]), index)
        for v in range(2):
            torch.testing.assert_close(torch.cat([v0[v], v1[v]]), views[v], atol=1e-6, rtol=0)
    labelled, _ = loader_batches(memory, monkeypatch, 1, 0, yield_index=False)
    assert torch.equal(labelled[0][1], full[0][1] % 3)


def test_prefetching_loader_yields_the_one_thread_batches_and_passes_errors_on():
    memory = engine.ImagesInMemory(images(40, 16), torch.arange(40) % 3)
    sampler = common.EpochSampler(40, 8, seed=5)
    loader = engine.DeviceViewLoader(memory, engine.DeviceAugment(16, MEAN, STD), 2, sampler, 8)
    for (views, labels), (views_1, labels_1) in zip(loader, loader._batches(), strict=True):
        assert torch.equal(labels, labels_1) and all(torch.equal(a, b) for a, b in zip(views, views_1))
    before = set(threading.enumerate())
    batches = iter(loader)  # a loop that stops early (--max-steps) leaves no thread running once it lets go
    next(batches)
    prefetcher = set(threading.enumerate()) - before
    assert len(prefetcher) == 1
    batches.close()
    assert not any(thread.is_alive() for thread in prefetcher)

    class Failing(engine.DeviceAugment):
        def views(self, images, seeds, num_views):
            raise common.DataError("made in the background thread")

    with pytest.raises(common.DataError, match="background thread"):
        next(iter(engine.DeviceViewLoader(memory, Failing(16, MEAN, STD), 2, sampler, 8)))


def test_step_metrics_log_exact_values_and_name_the_first_nonfinite_step():
    metrics, reported = engine.StepMetrics(), []
    for step, loss in enumerate([1.5, 1.25, 1.0], start=1):
        metrics.add(step, {"loss": torch.tensor(loss), "lr": 0.1 * step})
    assert metrics.pop(lambda loss, step: reported.append((loss, step))) == {"loss": 1.0, "lr": pytest.approx(0.3)}
    assert reported == []
    for step, loss in enumerate([2.0, float("nan"), float("inf"), 3.0], start=4):
        metrics.add(step, {"loss": torch.tensor(loss)})
    assert metrics.pop(lambda loss, step: reported.append((loss, step)))["loss"] == 3.0
    assert len(reported) == 1 and math.isnan(reported[0][0]) and reported[0][1] == 5


def test_benchmark_gpu_smoke_runs_on_cpu_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmark.py"), "gpu", "--smoke", "--json", str(out)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    for key in ("step_ratios", "end_to_end_images_per_s", "bare_encoder_images_per_s", "peak_memory_bytes",
                "torchrun_smoke"):
        assert key in report, key
    assert report["torchrun_smoke"]["returncode"] == 0


def test_augment_path_keeps_the_pil_path_for_data_that_does_not_fit(monkeypatch, capsys):
    class Huge:
        data = torch.empty(0, dtype=torch.uint8).numpy()

    assert engine.augment_path("device", Huge(), torch.device("cpu")) == "device"
    monkeypatch.setattr(engine, "dataset_bytes", lambda dataset: 2**62)
    assert engine.augment_path("device", Huge(), torch.device("cpu")) == "cpu"
    assert "--augment cpu" in capsys.readouterr().out
    assert engine.augment_path("cpu", Huge(), torch.device("cpu")) == "cpu"


def test_bf16_autocast_and_channels_last_run_on_cpu_and_match_fp32():
    """The GPU-only code paths on a CPU: an encoder in channels_last under bf16 autocast gives the
    fp32 features up to bf16 rounding (8 mantissa bits: relative error ~0.4% per op, a few % after 4 layers), and
    its backward pass gives finite gradients close in direction."""
    torch.manual_seed(0)
    encoder = common.Encoder(common.build_backbone("small", "cifar"), 128, True)
    x = torch.randn(16, 3, 32, 32)
    reference = encoder(x)
    reference.pow(2).mean().backward()
    grads = [p.grad.clone() for p in encoder.parameters()]
    encoder.zero_grad()
    fast = encoder.to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fast(x.contiguous(memory_format=torch.channels_last))
    assert out.dtype == torch.bfloat16
    assert torch.nn.functional.cosine_similarity(out.float(), reference, dim=1).min() > 0.99
    out.float().pow(2).mean().backward()
    flat = torch.cat([p.grad.flatten() for p in encoder.parameters()])
    assert torch.isfinite(flat).all()
    assert torch.nn.functional.cosine_similarity(flat, torch.cat([g.flatten() for g in grads]), dim=0) > 0.95
