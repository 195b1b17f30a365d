"""Never lose a run, never show a traceback: kills and preemption followed by the same command again, bit-equal to
a run that was never stopped; bad inputs of every script's entry point give one error line, exit 1 or 2, and
write nothing."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import CIFAR_JPG, ROOT, error_line, needs_cifar, read_metrics, run_script

TAXONOMY = ["moco_taxonomy.py", "--synthetic-size", "200", "--frames", "16", "--width", "32", "--dim", "16",
            "--batch-size", "16", "--moco-k", "64", "--moco-k-dec", "32", "--probe-epochs", "0", "--knn-every", "0",
            "--epochs", "40", "--max-steps", "60", "--log-every", "1"]  # 12 steps per epoch; every step logged


def start(command: list[str], out_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, str(ROOT / command[0]), *command[1:], "--out-dir", str(out_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_after(process: subprocess.Popen, out_dir: Path, records: int, sig: signal.Signals) -> tuple[int, str]:
    """Send `sig` once metrics.jsonl holds `records` lines; return the process's exit code and stderr."""
    metrics, deadline = out_dir / "metrics.jsonl", time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= records:
            break
        time.sleep(0.02)
    process.send_signal(sig)
    stderr = process.communicate(timeout=300)[1]
    return process.returncode, stderr


def same_run(a: Path, b: Path) -> None:
    """Bit-equal models and the same loss at every step, each step logged once."""
    state_a, state_b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a, b))
    assert state_a["step"] == state_b["step"]
    for name, tensor in state_a["model"].items():
        assert torch.equal(tensor, state_b["model"][name]), name
    losses_a, losses_b = ([(r["step"], r["loss"]) for r in read_metrics(d) if "loss" in r] for d in (a, b))
    assert losses_a == losses_b and len({s for s, _ in losses_b}) == len(losses_b)


@pytest.fixture(scope="module")
def taxonomy_straight(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("straight")
    run_script(*TAXONOMY, "--out-dir", str(out_dir))
    return out_dir


@pytest.mark.parametrize("sig, minutes, records", [
    (signal.SIGTERM, "10", 20),  # preemption: finish the step, save, say so, exit 143 (128 + SIGTERM)
    (signal.SIGINT, "10", 20),  # Ctrl-C: the same, exit 130
    (signal.SIGKILL, "0", 5),  # killed before its first checkpoint: the directory holds no run yet
    (signal.SIGKILL, "0.001", 30),  # killed after interval checkpoints (every 60 ms): continue from the last
])
def test_a_stopped_run_continues_by_running_the_same_command(taxonomy_straight, tmp_path, sig, minutes, records):
    command = [*TAXONOMY, "--checkpoint-minutes", minutes]
    code, stderr = stop_after(start(command, tmp_path), tmp_path, records, sig)
    if sig == signal.SIGKILL:
        assert not (tmp_path / "checkpoint.pt.tmp").exists() or (tmp_path / "checkpoint.pt").exists()
    else:
        last = stderr.strip().splitlines()[-1]
        assert code == 128 + sig and "Traceback" not in stderr and "error:" not in stderr, stderr[-2000:]
        assert f"stopping ({sig.name}): saving after this step" in stderr
        assert last.startswith(f"stopped by {sig.name} at step ") and last.endswith("again to continue")
        stopped_at = int(last.split(" at step ")[1].split(" ")[0])
        assert 0 < stopped_at < 60 and torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == stopped_at
    run_script(*command, "--out-dir", str(tmp_path))  # the same command again
    same_run(taxonomy_straight, tmp_path)


def test_resume_accepts_a_run_directory_and_other_logging_flags(taxonomy_straight, tmp_path):
    short = [a if a != "60" else "24" for a in TAXONOMY]
    run_script(*short, "--out-dir", str(tmp_path))
    # --resume DIR alone takes every other setting from the checkpoint; logging and loader flags may change
    run_script("moco_taxonomy.py", "--resume", str(tmp_path), "--max-steps", "60", "--log-every", "1",
               "--knn-every", "0", "--workers", "0", "--out-dir", str(tmp_path))
    same_run(taxonomy_straight, tmp_path)


def test_a_changed_setting_is_named_and_nothing_is_touched(taxonomy_straight, tmp_path, capsys):
    import moco_taxonomy

    before = {p.name: p.stat().st_mtime_ns for p in taxonomy_straight.iterdir()}
    with pytest.raises(SystemExit) as stop:
        moco_taxonomy.main([*TAXONOMY[1:], "--moco-t", "0.2", "--out-dir", str(taxonomy_straight)])
    assert error_line(stop, capsys) == (f"error: {taxonomy_straight / 'checkpoint.pt'} was trained with other "
                                        "settings (--moco-t 0.1 -> 0.2); to start a new run, pass another --out-dir")
    assert {p.name: p.stat().st_mtime_ns for p in taxonomy_straight.iterdir()} == before


# Nonsense values that each once trained a run, or gave a traceback, with the rule each breaks.
NONSENSE = [(["--batch-size", "0"], "--batch-size: 0 is out of range"),
            (["--batch-size", "-8"], "--batch-size: -8 is out of range"),
            (["--epochs", "0"], "--epochs: 0 is out of range"),
            (["--max-steps", "-1"], "--max-steps: -1 is out of range"),
            (["--lr", "-1"], "--lr: -1.0 is out of range"),
            (["--lr", "nan"], "--lr: nan is out of range"),
            (["--workers", "-1"], "--workers: -1 is out of range"),
            (["--moco-t", "-0.1"], "--moco-t: -0.1 is out of range"),
            (["--moco-m", "1.5"], "--moco-m: 1.5 is out of range"),
            (["--dim", "0"], "--dim: 0 is out of range"),
            (["--knn-k", "0"], "--knn-k: 0 is out of range"),
            (["--log-every", "0"], "--log-every: 0 is out of range"),
            (["--checkpoint-minutes", "-1"], "--checkpoint-minutes: -1.0 is out of range")]
SCRIPT_NONSENSE = {
    "moco_ring": [(["--moco-k", "0"], "--moco-k: 0 is out of range"), (["--image-size", "-4"], "--image-size: -4"),
                  (["--bn-splits", "0"], "--bn-splits: 0 is out of range"), (["--ring-upper", "150"], "--ring-upper")],
    "moco_acc": [(["--moco-k", "-5"], "--moco-k: -5 is out of range"),
                 (["--warmup-steps", "-5"], "--warmup-steps: -5 is out of range")],
    "moco_taxonomy": [(["--moco-k", "0"], "--moco-k: 0 is out of range")],
    "adco": [(["--num-adversaries", "0"], "--num-adversaries: 0 is out of range"),
             (["--adv-t", "-1"], "--adv-t: -1.0 is out"),
             (["--image-size", "-4"], "--image-size: -4")],
    "mmcl": [(["--C", "-1"], "--C: -1.0 is out of range"), (["--temperature", "0"], "--temperature: 0.0 is out"),
             (["--pgd-steps", "0"], "--pgd-steps: 0 is out of range")],
}


def has_flag(script: str, flag: str) -> bool:
    return flag[2:].replace("-", "_") in __import__(script).Config.__dataclass_fields__


@pytest.mark.parametrize("script, args, message", [(script, *case) for script in SCRIPT_NONSENSE
                                                   for case in NONSENSE + SCRIPT_NONSENSE[script]
                                                   if has_flag(script, case[0][0])])
def test_nonsense_values_are_refused_before_anything_is_written(tmp_path, capsys, script, args, message):
    module = __import__(script)
    with pytest.raises(SystemExit) as stop:
        module.main([*args, "--out-dir", str(tmp_path / "run")])
    line = error_line(stop, capsys)
    assert line.startswith("error:") and message in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("make_bad, message", [
    (lambda d: (d / "file").write_text(""), "is a file, not a directory"),
])
def test_an_out_dir_that_cannot_hold_a_run_is_refused(tmp_path, capsys, make_bad, message):
    import moco_taxonomy

    make_bad(tmp_path)
    with pytest.raises(SystemExit) as stop:
        moco_taxonomy.main([*TAXONOMY[1:], "--max-steps", "1", "--out-dir", str(tmp_path / "file")])
    assert message in error_line(stop, capsys)


def test_a_zero_byte_or_foreign_checkpoint_gets_one_line(tmp_path, capsys):
    import engine
    import moco_taxonomy

    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match=r"^error: .*empty.pt is not a checkpoint of this project"):
        moco_taxonomy.main([*TAXONOMY[1:], "--resume", str(tmp_path / "empty.pt"), "--out-dir", str(tmp_path / "r")])
    moco_taxonomy.main([*TAXONOMY[1:], "--max-steps", "1", "--out-dir", str(tmp_path / "t")])
    with pytest.raises(SystemExit, match=r"^error: .* was written by moco_taxonomy.py, whose backbone is not an im"):
        engine.probe_main([str(tmp_path / "t" / "checkpoint.pt")])


@needs_cifar
@pytest.mark.parametrize("augment", ["device", "cpu"])
@pytest.mark.parametrize("content", [b"", b"not an image at all", None])
def test_an_unreadable_image_is_named_in_one_line(tmp_path, content, augment):
    """A zero-byte file, garbage, a truncated JPEG: one error line naming the file, from a loader worker too (the
    PIL path), and no run directory."""
    for split in ("train", "test"):
        for label in ("a", "b"):
            (tmp_path / split / label).mkdir(parents=True)
            for i, jpeg in enumerate(sorted((CIFAR_JPG / split / "cat").iterdir())[:8]):
                (tmp_path / split / label / jpeg.name).write_bytes(jpeg.read_bytes())
    bad = tmp_path / "train" / "b" / "bad.jpg"
    bad.write_bytes(content if content is not None else (CIFAR_JPG / "train" / "cat" / "0000.jpg").read_bytes()[:300])
    result = run_script("moco_ring.py", "--dataset", "folder", "--data-root", str(tmp_path), "--arch", "small",
                        "--workers", "1", "--batch-size", "17", "--moco-k", "34", "--bn-splits", "1",
                        "--knn-bank-size", "8", "--knn-test-size", "8", "--augment", augment,
                        "--out-dir", str(tmp_path / "run"), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: cannot read image {bad}")
    assert not (tmp_path / "run").exists()  # nothing written before the images are known to decode


def test_a_diverged_run_names_its_likely_causes_and_what_was_saved(tmp_path):
    result = run_script(*[a if a != "60" else "30" for a in TAXONOMY], "--lr", "1e30", "--checkpoint-minutes", "0",
                        "--out-dir", str(tmp_path), check=False)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert last.startswith("error: the loss is ") and "--lr 1e+30" in last and "--moco-t 0.1" in last, last
    assert "No checkpoint had been written yet" in last and not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("make_bad, message", [
    (lambda d: (d / "train").mkdir() or (d / "test").mkdir(), "Couldn't find any class folder"),
])
def test_a_folder_dataset_without_class_folders_gets_one_line(tmp_path, make_bad, message):
    import moco_ring

    make_bad(tmp_path)
    with pytest.raises(SystemExit, match=f"^error: --data-root {tmp_path}: {message}"):
        moco_ring.main(["--dataset", "folder", "--data-root", str(tmp_path), "--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_corrupt_avmnist_npz_gets_one_line(tmp_path):
    import moco_acc

    (tmp_path / "mnist5k").mkdir()
    (tmp_path / "mnist5k" / "mnist_5k.npz").write_text("garbage")
    (tmp_path / "fsdd" / "recordings").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"^error: cannot read .*mnist_5k.npz as MNIST arrays"):
        moco_acc.main(["--data-root", str(tmp_path), "--out-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()
