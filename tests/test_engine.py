"""engine.Run as a user meets it: a copied script is a new method, a finished run says so, a resumed run and a
finished one print one line each, and Ctrl-C during an evaluation saves within seconds and exits 130."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import CIFAR_JPG, ROOT, needs_cifar, read_metrics, run_script

RUN = ["--dataset", "folder", "--data-root", str(CIFAR_JPG), "--arch", "small", "--workers", "0", "--batch-size",
       "32", "--moco-k", "64", "--epochs", "1", "--knn-bank-size", "100", "--knn-test-size", "50"]


def run_copy(script, *args, cwd, check=True):
    """Run a copy of a script that lives outside the repository (as a student's my_ring.py would)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=300)
    assert not check or result.returncode == 0, result.stderr[-2000:]
    return result


@needs_cifar
def test_a_copied_script_is_a_new_method_with_its_own_runs(tmp_path):
    """`cp moco_ring.py my_ring.py`: the copy's runs go to runs/my_ring, carry its name, and a run directory of
    one script is refused by the other in one line naming both, untouched."""
    copy = tmp_path / "my_ring.py"
    shutil.copy(ROOT / "moco_ring.py", copy)
    run_copy(copy, *RUN, "--max-steps", "2", cwd=tmp_path)
    mine = tmp_path / "runs" / "my_ring"
    assert torch.load(mine / "checkpoint.pt", weights_only=True)["script"] == "my_ring"
    before = {p.name: p.stat().st_mtime_ns for p in mine.iterdir()}
    result = run_script("moco_ring.py", *RUN, "--max-steps", "4", "--out-dir", str(mine), check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert "holds a run of my_ring.py, not of moco_ring.py" in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in mine.iterdir()} == before


@needs_cifar
def test_resume_finished_and_summary_lines(tmp_path):
    """A run prints a summary at its end, a continued one where it resumes, a finished one that there is nothing
    to do (exit 0, nothing rewritten); epochs are counted from 1."""
    first = run_script("moco_ring.py", *RUN, "--max-steps", "2", "--out-dir", str(tmp_path))
    assert f"done at step 2 of 2 in " in first.stdout and f"checkpoint {tmp_path / 'checkpoint.pt'}" in first.stdout
    assert "knn_top1" in first.stdout.strip().splitlines()[-1]
    second = run_script("moco_ring.py", *RUN, "--max-steps", "4", "--out-dir", str(tmp_path))
    assert f"resuming {tmp_path} at step 2 of 4 (epoch 1 of 1)" in second.stdout
    assert "done at step 4 of 4" in second.stdout
    assert {r["epoch"] for r in read_metrics(tmp_path)} == {1}
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    third = run_script("moco_ring.py", *RUN, "--max-steps", "4", "--out-dir", str(tmp_path))
    assert third.stdout.strip().splitlines()[-1].startswith(f"{tmp_path} is finished: step 4 of 4, knn_top1 ")
    assert "nothing to do" in third.stdout
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before


@needs_cifar
def test_ctrl_c_during_an_evaluation_saves_within_seconds_and_exits_130(tmp_path):
    """The kNN over all 20,000 training and 10,000 test images takes minutes on a CPU; Ctrl-C during it abandons
    it at once, saves the trained steps and exits 130 with the stopping line, not an error."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    args = [a for a in RUN if a not in ("--knn-bank-size", "100", "--knn-test-size", "50")]
    process = subprocess.Popen([sys.executable, str(ROOT / "moco_ring.py"), *args, "--max-steps", "3",
                                "--log-every", "1", "--out-dir", str(tmp_path)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        metrics = tmp_path / "metrics.jsonl"
        if metrics.exists() and any(r["step"] == 3 for r in read_metrics(tmp_path)):
            break  # the last step is logged: the evaluation has begun
        time.sleep(0.05)
    time.sleep(1.0)
    sent = time.monotonic()
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    waited = time.monotonic() - sent
    print(f"exit {process.returncode} {waited:.1f} s after Ctrl-C")
    assert process.returncode == 130 and "error:" not in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert "stopping (SIGINT): abandoning the evaluation, saving after this step" in stderr
    assert waited < 30  # the whole evaluation takes minutes here
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["step"] == 3
    assert not any("knn_top1" in r for r in read_metrics(tmp_path))
