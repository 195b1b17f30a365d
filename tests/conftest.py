"""Shared test helpers: where the real data lives, and how to run a script at world size 1 or 2 (gloo on CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"  # ../shared/data beside the checkout (never copied into the repo)
CIFAR_JPG = DATA / "cifar10-jpg"
sys.path.insert(0, str(ROOT))


def run_script(script: str, *args: str, nproc: int = 1, timeout: int = 300, check: bool = True):
    """Run `python script args` (nproc=1) or `torchrun --nproc_per_node=nproc script args` on CPU; return the
    CompletedProcess (stdout/stderr as text). Each process gets one thread, as the CI machine has two cores."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    if nproc == 1:
        cmd = [sys.executable, str(ROOT / script), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / script), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long experiment, not run in CI (select with -m slow)")


needs_cifar = pytest.mark.skipif(not CIFAR_JPG.is_dir(), reason="../shared/data/cifar10-jpg not found")
