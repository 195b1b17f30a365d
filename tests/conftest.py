"""Shared test helpers: where the real data lives, and how to run a script at world size 1 or 2 (gloo on CPU)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

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


def error_line(stop: pytest.ExceptionInfo, capsys) -> str:
    """The one error line of a script stopped in-process: `common.fail` carries it in SystemExit (exit code 1),
    argparse and the flags' range checks print it before exiting with code 2."""
    code = stop.value.code
    if isinstance(code, str):
        return code
    assert code == 2, f"exit code {code}"
    return capsys.readouterr().err.strip().splitlines()[-1]


def read_metrics(out_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long experiment, not run in CI (select with -m slow)")


needs_cifar = pytest.mark.skipif(not CIFAR_JPG.is_dir(), reason="../shared/data/cifar10-jpg not found")


def unit(*shape, seed=0, dtype=torch.float32):
    """Random rows of unit length (the normalized embeddings every loss here takes), from a private generator."""
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype), dim=-1)


@pytest.fixture
def one_thread():
    """One torch thread for in-process training runs, as run_script gives every subprocess: on two busy cores, two
    threads per process wait on each other at every parallel region (measured: steps up to 30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
