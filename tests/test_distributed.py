"""Multi-process training: global relation scope matches one process on the same global batch."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rald_hf.modeling_rald import gather_across_processes

SCRIPT = Path(__file__).with_name("distributed_step.py")
GLOBAL_BATCH = 16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_step(data_dir: Path, output: Path, scope: str, processes: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable]
    if processes > 1:
        command += [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(processes),
            "--master_port",
            str(_free_port()),
        ]
    command += [str(SCRIPT), str(data_dir), str(output), scope, str(GLOBAL_BATCH)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(output)


@pytest.mark.data
def test_global_scope_matches_single_process(data_dir, tmp_path):
    single = _run_step(data_dir, tmp_path / "single.pt", "global", 1)
    two = _run_step(data_dir, tmp_path / "global.pt", "global", 2)
    local = _run_step(data_dir, tmp_path / "local.pt", "local", 2)
    assert single["world_size"] == 1
    assert two["world_size"] == 2

    assert two["log"]["loss"] == pytest.approx(single["log"]["loss"], rel=1e-5)
    assert two["log"]["ce_loss"] == pytest.approx(single["log"]["ce_loss"], abs=2e-4)
    assert two["log"]["nnldl_loss"] == pytest.approx(single["log"]["nnldl_loss"], abs=2e-4)
    # One SGD step: the parameter change is the learning rate times the gradient.
    for name, value in single["parameters"].items():
        torch.testing.assert_close(two["parameters"][name], value, rtol=1e-4, atol=1e-6, msg=f"{name} differs")

    # With local scope each image relates only to the 8 images of its own process.
    differences = [
        float((local["parameters"][name] - value).abs().max()) for name, value in single["parameters"].items()
    ]
    assert max(differences) > 1e-4
    assert local["log"]["loss"] != pytest.approx(single["log"]["loss"], rel=1e-6)


def _gather_worker(rank: int, world_size: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        rows = 3 if rank == 0 else 2  # unequal batches, as at the end of an epoch
        local = torch.arange(rows * 4, dtype=torch.float64).reshape(rows, 4).add(100 * rank).requires_grad_()
        gathered, offset = gather_across_processes(local)
        # Each process weighs all rows; the gradient of a row is the sum of the weights over processes.
        weights = torch.arange(1, gathered.shape[0] + 1, dtype=torch.float64)[:, None] * (rank + 1)
        (gathered * weights).sum().backward()
        torch.save((gathered.detach(), offset, local.grad), Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gather_with_unequal_batches_and_gradients(tmp_path):
    mp.start_processes(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    results = {rank: torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)}
    expected = torch.cat([torch.arange(12.0).reshape(3, 4), torch.arange(8.0).reshape(2, 4) + 100]).double()
    for rank, (gathered, offset, grad) in results.items():
        torch.testing.assert_close(gathered, expected)
        assert offset == (0 if rank == 0 else 3)
        rows = range(offset, offset + grad.shape[0])
        # Row r is weighted (r + 1) by process 0 and 2 (r + 1) by process 1.
        expected_grad = torch.tensor([[3.0 * (r + 1)] * 4 for r in rows], dtype=torch.float64)
        torch.testing.assert_close(grad, expected_grad)


@pytest.mark.data
def test_two_process_cli_training(data_dir, tmp_path):
    """The documented torchrun command trains, scores and saves once, on CPU with gloo."""
    output = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
        "-m", "rald_hf.cli", "train", "--dataset", str(data_dir / "fer2013"), "--output-dir", str(output),
        "--preset", "fer2013", "--rald-l", "--backbone", "test_convnext", "--image-size", "32", "--epochs", "1",
        "--batch-size", "32", "--max-train-samples", "256", "--max-eval-samples", "128",
        "--reference-bank-size", "32", "--no-progress",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("test: accuracy") == 1, "only the main process reports"
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["num_images"] == 128
    summary = json.loads((output / "training_summary.json").read_text())
    assert summary["batch_size"] == 64, "the global batch is the per-process batch times the processes"
    config = json.loads((output / "config.json").read_text())
    assert config["reference_bank_size"] == 32
