"""Never lose a run, never show a traceback (issue 14): kills and preemption followed by the same command again,
bit-equal to a run that was never stopped; bad inputs of every script's entry point give one error line, exit 1
or 2, and write nothing."""
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
            "--epochs", "40", "--max-steps", "60"]  # 12 steps per epoch


def start(command: list[str], out_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.Popen([sys.executable, str(ROOT / command[0]), *command[1:], "--out-dir", str(out_dir)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_after(process: subprocess.Popen, out_dir: Path, records: int, sig: signal.Signals) -> str:
    """Send `sig` once metrics.jsonl holds `records` lines; return the process's stderr."""
    metrics, deadline = out_dir / "metrics.jsonl", time.monotonic() + 300
    while process.poll() is None and time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= records:
            break
        time.sleep(0.02)
    process.send_signal(sig)
    return process.communicate(timeout=300)[1]


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
    (signal.SIGTERM, "10", 20),  # preemption: finish the step, save, exit 1 with one line
    (signal.SIGINT, "10", 20),  # Ctrl-C: the same
    (signal.SIGKILL, "0", 5),  # killed before its first checkpoint: the directory holds no run yet
    (signal.SIGKILL, "0.001", 30),  # killed after interval checkpoints (every 60 ms): continue from the last
])
def test_a_stopped_run_continues_by_running_the_same_command(taxonomy_straight, tmp_path, sig, minutes, records):
    command = [*TAXONOMY, "--checkpoint-minutes", minutes]
    stderr = stop_after(start(command, tmp_path), tmp_path, records, sig)
    if sig == signal.SIGKILL:
        assert not (tmp_path / "checkpoint.pt.tmp").exists() or (tmp_path / "checkpoint.pt").exists()
    else:
        last = stderr.strip().splitlines()[-1]
        assert "Traceback" not in stderr and last.startswith(f"error: stopped by {sig.name} at step ")
        stopped_at = int(last.split(" at step ")[1].split(";")[0])
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
