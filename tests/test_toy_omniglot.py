"""Tests for the Spatial-MultiOmniglot experiment (CM-ACC App. B, Fig. 3a): toy_mi/omniglot_data.py (the builder) and
toy_mi/multiomniglot.py (pretraining through moco_acc.py, per-position linear probes).

The builder is checked against what the construction promises, each computed here independently: I(x;y) from
the closed form and from the empirical joint of the drawn characters, y's characters as a function of x's, the
pixels of every cell against the glyph table, disjoint drawers, seeding, and the PNG loader against the npz one.
"""
import json
import math
import sys
from collections import defaultdict

import pytest
import torch

from conftest import DATA, ROOT, run_script

sys.path.insert(0, str(ROOT / "toy_mi"))
import omniglot_data as od  # noqa: E402
import multiomniglot  # noqa: E402

OMNIGLOT = DATA / "omniglot"
pytestmark = pytest.mark.skipif(not (OMNIGLOT / "images_background.npz").is_file(),
                                reason="../shared/data/omniglot not found")


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    """The nine-character dataset, 4000 training and 1000 evaluation pairs, built once for the module."""
    cache = tmp_path_factory.mktemp("cache")
    train, evaluation = od.load_or_build(OMNIGLOT, 9, 4000, 1000, seed=0, cache_dir=cache)
    return train, evaluation, cache


def with_characters(split, c):
    """The c-character dataset drawn from the first c alphabets of a built split's glyph tables."""
    return od.MultiOmniglot(split.glyphs[:c], **od.build(split.glyphs[:c], 4000, 1000, seed=0)["train"])


# ---------------------------------------------------------------------------------------------------------------------
# The builder
# ---------------------------------------------------------------------------------------------------------------------
def test_alphabets_are_the_nine_largest_of_the_background_split_in_the_papers_order():
    table = json.loads((OMNIGLOT / "alphabets.json").read_text())["background"]
    largest = sorted(table, key=lambda a: -a["characters"])[:9]  # stable: Armenian (id 27) before Mkhedruli (729)
    assert tuple(a["alphabet"] for a in largest) == od.ALPHABETS
    assert [a["characters"] for a in largest] == [55, 52, 48, 47, 46, 43, 42, 41, 41]  # Appendix B's list


def test_glyphs_are_32px_area_averages_of_the_105px_strokes(nine):
    train = nine[0]
    assert [tuple(g.shape) for g in train.glyphs] == [(l, 20, 32, 32) for l in (55, 52, 48, 47, 46, 43, 42, 41, 41)]
    strokes = od.load_npz(OMNIGLOT, od.ALPHABETS[:1])[0][3, 7]  # Tifinagh character 4, drawer 8: 105x105 bool
    # Independently: blow every source pixel up to 32x32 sub-pixels (3360x3360), then average 105x105 blocks.
    fine = strokes.double().repeat_interleave(32, 0).repeat_interleave(32, 1)
    expected = fine.view(32, 105, 32, 105).mean((1, 3))
    assert (train.glyphs[0][3, 7].double() - 255 * expected).abs().max() <= 0.5 + 1e-9
    assert train.glyphs[0][3, 7].double().sum() == pytest.approx(255 * strokes.sum().item() * (32 / 105) ** 2,
                                                                  rel=0.02)  # ink is conserved


@pytest.mark.parametrize("c", range(1, 10))
def test_grid_has_exactly_c_cells_and_mutual_information_is_the_sum_of_log_alphabet_sizes(nine, c):
    split = nine[0] if c == 9 else with_characters(nine[0], c)
    m, n = split.grid
    assert (m, n) == [(1, 1), (1, 2), (1, 3), (2, 2), (1, 5), (2, 3), (1, 7), (2, 4), (3, 3)][c - 1]
    assert tuple(split.x(0).shape) == tuple(split.y(0).shape) == (32 * m, 32 * n)
    sizes = [55, 52, 48, 47, 46, 43, 42, 41, 41][:c]
    assert split.mutual_information == pytest.approx(sum(math.log(l) for l in sizes), abs=1e-12)
    assert split.mutual_information == pytest.approx({1: 4.007, 9: 34.435}.get(c, split.mutual_information),
                                                     abs=5e-4)


def test_one_character_mutual_information_matches_the_empirical_joint_of_50k_pairs():
    """Plug-in I(z_x; z_y) over the 50K drawn pairs: ln 55 up to the plug-in bias (-(55-1)/(2N) = -0.0005)."""
    glyphs = [torch.zeros(55, 20, 32, 32, dtype=torch.uint8)]  # the draw does not look at pixels
    split = od.MultiOmniglot(glyphs, **od.build(glyphs, 50000, 10, seed=3)["train"])
    a, b = split.z[:, 0], split.z_y[:, 0]
    joint = torch.zeros(55, 55, dtype=torch.float64).index_put_((a, b), torch.ones(len(a), dtype=torch.float64),
                                                                accumulate=True) / len(a)
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nz = joint > 0
    mi = (joint[nz] * (joint[nz] / (pa * pb).expand_as(joint)[nz]).log()).sum().item()
    assert mi == pytest.approx(math.log(55), abs=0.01)


def test_y_shows_the_next_character_of_every_cell_and_is_a_function_of_xs_characters(nine):
    train = nine[0]
    sizes = torch.tensor([55, 52, 48, 47, 46, 43, 42, 41, 41])
    assert torch.equal(train.z_y, (train.z + 1) % sizes)
    assert ((train.z >= 0) & (train.z < sizes)).all()
    partners = defaultdict(set)  # x's character tuple -> every y tuple it comes with
    for zx, zy in zip(train.z.tolist(), train.z_y.tolist()):
        partners[tuple(zx)].add(tuple(zy))
    assert all(len(ys) == 1 for ys in partners.values())
    for i in (0, 1, 1234):  # every cell's pixels, row-major, against the glyph table
        x, y = train.x(i), train.y(i)
        for k in range(9):
            r, col = divmod(k, 3)
            cell = (slice(32 * r, 32 * r + 32), slice(32 * col, 32 * col + 32))
            assert torch.equal(x[cell], train.glyphs[k][train.z[i, k], train.d_x[i]])
            assert torch.equal(y[cell], train.glyphs[k][(train.z[i, k] + 1) % sizes[k], train.d_y[i]])


def test_training_and_evaluation_drawers_are_disjoint_and_independent(nine):
    train, evaluation, _ = nine
    train_drawers = set(train.d_x.tolist()) | set(train.d_y.tolist())
    eval_drawers = set(evaluation.d_x.tolist()) | set(evaluation.d_y.tolist())
    assert train_drawers == set(range(15)) and eval_drawers == set(range(15, 20))
    assert not train_drawers & eval_drawers
    same = (train.d_x == train.d_y).float().mean().item()  # independent uniform drawers coincide 1/15 of the time
    assert same == pytest.approx(1 / 15, abs=4 * math.sqrt((1 / 15) * (14 / 15) / len(train)))


def test_same_seed_same_data_other_seed_other_data_and_the_cache_is_reused(nine, tmp_path, monkeypatch):
    train, evaluation, cache = nine
    glyphs = train.glyphs
    again = od.build(glyphs, 4000, 1000, seed=0)
    for split, drawn in ((train, again["train"]), (evaluation, again["eval"])):
        assert all(torch.equal(getattr(split, k), drawn[k]) for k in ("z", "d_x", "d_y"))
    other = od.build(glyphs, 4000, 1000, seed=1)["train"]
    assert not torch.equal(other["z"], train.z)
    assert torch.equal(od.build(glyphs, 4000, 50, seed=0)["train"]["z"], train.z)  # eval size never moves train
    monkeypatch.setattr(od, "load_alphabets", lambda *a: pytest.fail("rebuilt although the cache holds it"))
    cached, _ = od.load_or_build("/nonexistent", 9, 4000, 1000, seed=0, cache_dir=cache)
    assert torch.equal(cached.z, train.z) and all(torch.equal(a, b) for a, b in zip(cached.glyphs, glyphs))


def test_png_folders_in_torchvisions_layout_give_the_same_glyphs_as_the_npz(tmp_path):
    from PIL import Image

    table = {a["alphabet"]: a for a in json.loads((OMNIGLOT / "alphabets.json").read_text())["background"]}
    strokes = od.load_npz(OMNIGLOT, od.ALPHABETS[:2])  # True = ink
    root = tmp_path / "omniglot-py" / "images_background"
    for alphabet, chars in zip(od.ALPHABETS[:2], strokes):
        for k, drawings in enumerate(chars):
            folder = root / alphabet / f"character{k + 1:02d}"
            folder.mkdir(parents=True)
            for d, ink in enumerate(drawings):  # the original files: white background, mode "1"
                Image.fromarray((~ink).numpy()).save(folder / f"{table[alphabet]['first_id'] + k:04d}_{d + 1:02d}.png")
    assert od.find_source(tmp_path) == ("png", root)
    from_png, from_npz = od.load_alphabets(tmp_path, 2), od.load_alphabets(OMNIGLOT, 2)
    assert all(torch.equal(a, b) for a, b in zip(from_png, from_npz))
    with pytest.raises(SystemExit, match="error: .*neither"):
        od.find_source(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------------------------------
def test_pair_views_are_seeded_shifts_of_the_pair(nine):
    train = with_characters(nine[0], 2)
    views = multiomniglot.PairViews(train, shift=0)
    views_x, views_y, label_x, label_y = views[(5, 123)]
    assert torch.equal(views_x[0], multiomniglot.to_input(train.x(5))) and tuple(views_x[0].shape) == (3, 32, 64)
    assert torch.equal(views_y[1], multiomniglot.to_input(train.y(5)))
    assert (label_x, label_y) == (int(train.z[5, 0]), int(train.z_y[5, 0]))
    shifted = multiomniglot.PairViews(train, shift=2)
    first, second = shifted[(5, 123)], shifted[(5, 123)]
    assert all(torch.equal(a, b) for a, b in zip(first[0] + first[1], second[0] + second[1]))  # exact resume
    assert not torch.equal(first[0][0], first[0][1])  # two different views


def test_shifted_views_translate_every_cell_by_its_own_offset_with_zeros_moving_in():
    """Each cell of each view is the cell moved by some (dy, dx) in [-2, 2]^2, written out pixel by pixel here; over
    many draws all 25 offsets occur, each about 1/25 of the time (4 standard errors)."""
    cells = torch.randint(1, 256, (3, 32, 32), dtype=torch.uint8)  # no zero pixel: every move is visible
    moved = {}
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            out = torch.zeros_like(cells)
            for i in range(32):
                for j in range(32):
                    if 0 <= i - dy < 32 and 0 <= j - dx < 32:
                        out[:, i, j] = cells[:, i - dy, j - dx]
            moved[dy, dx] = out
    views = multiomniglot.shifted_views(cells, 400, 2, torch.Generator().manual_seed(0))  # 400 x 3 x 32 x 32
    counts = defaultdict(int)
    for view in views:
        for k in range(3):
            offsets = [o for o, out in moved.items() if torch.equal(view[k], out[k])]
            assert len(offsets) == 1
            counts[offsets[0]] += 1
    assert len(counts) == 25
    n, p = 1200, 1 / 25
    assert all(abs(count - n * p) < 4 * math.sqrt(n * p * (1 - p)) for count in counts.values()), counts
    assert torch.equal(multiomniglot.shifted_views(cells, 2, 0, torch.Generator())[1], cells)  # --shift 0


def test_downsampled_views_are_area_averages():
    image = torch.randint(0, 256, (32, 64), dtype=torch.uint8)
    small = multiomniglot.to_input(image, 2)
    assert tuple(small.shape) == (3, 16, 32)
    expected = (image.double().view(16, 2, 32, 2).mean((1, 3)) / 255 - multiomniglot.MEAN) / multiomniglot.STD
    torch.testing.assert_close(small[0].double(), expected, rtol=0, atol=1e-5)


def test_summary_is_the_mean_and_sample_std_over_seeds():
    out = multiomniglot.summary([0.5, 0.7, 0.9])
    assert out["mean"] == pytest.approx(0.7) and out["std"] == pytest.approx(0.2) and out["runs"] == [0.5, 0.7, 0.9]


def test_bad_flags_give_one_error_line():
    result = run_script("toy_mi/multiomniglot.py", "--characters", "10", check=False)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["error: --characters 10: each must be 1..9"]
    with pytest.raises(SystemExit, match="error: --unit '1 moco 0': expected 'c method seed'"):
        multiomniglot.check_config(multiomniglot.parse(["--unit", "1 moco 0"]))


def test_typed_flags_win_over_the_preset_even_when_they_equal_the_default():
    """--seeds 0, --batch-size 128 and --epochs 50 are the defaults; typed, they must not become the preset's."""
    defaults = multiomniglot.Config()
    assert (defaults.seeds, defaults.batch_size, defaults.epochs) == ((0,), 128, 50)
    cfg = multiomniglot.parse(["--preset", "cpu", "--seeds", "0", "--batch-size", "128", "--epochs=50"])
    assert (cfg.seeds, cfg.batch_size, cfg.epochs) == ((0,), 128, 50)
    cpu = multiomniglot.PRESETS["cpu"]
    assert cpu["seeds"] != (0,) and cpu["batch_size"] != 128 and cpu["epochs"] != 50  # else the test shows nothing
    untyped = {k: v for k, v in cpu.items() if k not in ("seeds", "batch_size", "epochs")}
    assert {k: getattr(cfg, k) for k in untyped} == untyped
    quick = multiomniglot.parse(["--quick", "--characters", "1", "2", "3", "4", "5", "6", "7", "8", "9"])
    assert quick.characters == defaults.characters and quick.num_train == multiomniglot.QUICK["num_train"]
    assert multiomniglot.parse(["--preset", "cpu"]).seeds == cpu["seeds"]


@pytest.mark.parametrize("preset", ["quick", "cpu"])
def test_a_jobs_process_parses_back_exactly_the_resolved_config(preset):
    cfg = multiomniglot.parse(["--preset", preset, "--seeds", "0", "--moco-t", "0.1"])
    worker = multiomniglot.dataclasses.replace(cfg, preset="none", jobs=0, unit="3 cmacc 0")
    assert multiomniglot.parse(multiomniglot.explicit_argv(worker)) == worker


def test_loss_floor_is_the_mean_log_of_one_plus_the_tied_negatives():
    """E ln(1 + B), B ~ Binomial(K, 1/e^I), against the sum over the binomial written out with math.comb."""
    for k, e_mi in ((200, 55.0), (300, 2860.0)):
        p = 1 / e_mi
        expected = sum(math.comb(k, b) * p ** b * (1 - p) ** (k - b) * math.log(1 + b) for b in range(k + 1))
        assert multiomniglot.loss_floor(k, e_mi) == pytest.approx(expected, rel=1e-9)
    assert multiomniglot.loss_floor(3840, 137280.0) < 0.03 < 4.0 < multiomniglot.loss_floor(3840, 55.0)


def test_quick_run_end_to_end_is_far_above_chance_and_smoco_shift_learns_beyond_the_random_encoder(tmp_path):
    """--quick cut to one character and 40 steps of batch 32 (tau 0.1, which moves the small CNN fastest), in two
    single-threaded processes (--jobs 2): every method's probe is far above chance (1/55); SMoCo x-x' (two MoCos of
    shifted views) is clearly above the random-initialised encoder, both measured in this run (the cross-modal
    methods and the shared-encoder SMoCo need more steps than a test can afford to get there: XMoCo had 69.4%
    against 72.2% at random init); the JSON holds {'mean', 'std', 'runs', 'positions', 'loss'} per method. A rerun
    reuses the finished runs and their saved probes and gives the same table; with one run's probe.json deleted, it
    probes that run again from its checkpoint (no training) and gets the same numbers."""
    flags = ["--quick", "--characters", "1", "--num-train", "1024", "--num-eval", "500", "--probe-train", "1000",
             "--batch-size", "32", "--moco-k", "128", "--pool-size", "256", "--epochs", "2", "--max-steps", "40",
             "--moco-t", "0.1", "--warmup-steps", "5", "--probe-epochs", "20", "--cache-dir", str(tmp_path / "cache"),
             "--methods", "smoco", "xmoco", "cmacc", "smoco_shift", "--jobs", "2", "--out-dir", str(tmp_path / "runs")]
    run_script("toy_mi/multiomniglot.py", *flags, "--json", str(tmp_path / "a.json"), timeout=900)  # 4 runs + init
    results = json.loads((tmp_path / "a.json").read_text())["results"]
    assert len(results) == 1
    row = results[0]
    assert {"characters", "mi_nats", "num_train", "moco_k", "chance_loss", "floor_loss", "smoco", "xmoco", "cmacc",
            "init"} <= set(row)
    assert row["characters"] == 1 and row["mi_nats"] == pytest.approx(math.log(55)) and row["num_train"] == 1024
    assert row["chance_loss"] == pytest.approx(math.log(129)) and row["chance_probe"] == pytest.approx(1 / 55)
    for method in ("smoco", "xmoco", "cmacc", "smoco_shift", "init"):
        assert set(row[method]) == {"mean", "std", "runs", "positions", "loss"} and len(row[method]["runs"]) == 1
        assert row[method]["mean"] == row[method]["runs"][0] and row[method]["std"] == 0.0
        assert row[method]["positions"]["mean"] == [row[method]["mean"]]  # one character: one position
        assert 10 / 55 < row[method]["mean"] <= 1.0, (method, row)
        if method != "init":  # a contrastive loss below chance, ln(K + 1) per direction
            assert 0 < row[method]["loss"]["mean"] < row["chance_loss"], (method, row)
    assert row["smoco_shift"]["mean"] > row["init"]["mean"] + 0.05, row
    rerun = run_script("toy_mi/multiomniglot.py", *flags, "--json", str(tmp_path / "b.json"),
                       "--plot", str(tmp_path / "fig.png"), timeout=900)
    assert "0 to run" in rerun.stdout
    assert json.loads((tmp_path / "b.json").read_text())["results"] == results  # resumed at the end: no training
    assert (tmp_path / "fig.png").is_file() or "matplotlib is not installed" in rerun.stdout  # optional dependency
    xmoco = tmp_path / "runs" / "c1" / "xmoco" / "seed0"
    trained = (xmoco / "metrics.jsonl").read_text()
    (xmoco / "probe.json").unlink()
    again = run_script("toy_mi/multiomniglot.py", *flags, "--json", str(tmp_path / "c.json"), timeout=900)
    assert "1 to run" in again.stdout and (xmoco / "metrics.jsonl").read_text() == trained
    assert json.loads((tmp_path / "c.json").read_text())["results"] == results
