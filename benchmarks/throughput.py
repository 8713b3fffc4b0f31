"""Speed and memory of RALD against the bare timm backbone, measured side by side in one process.

Inference: images per second of RALD in reference mode (the batch-independent default once a bank exists)
and of the same timm backbone with its own classifier, at batch 1 and 64. Training: optimizer steps per
second of RALD with NNLDL (RALDTrainer.compute_loss) against the backbone with a linear head and
cross-entropy. Each repeat times both models back to back, alternating which goes first, so that load on
this shared machine hits both alike; the table gives the median over repeats, the interquartile range and
the median of the per-repeat ratios. Peak memory (resident set size, or CUDA allocations on a GPU) comes from
a fresh subprocess per model.

Usage:
    python benchmarks/throughput.py --backbones resnet18 mobilenetv2_100 --write-docs
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F

from rald_hf import LabelSpace, RALDConfig, RALDForImageClassification
from rald_hf.training import RALDTrainer, RALDTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import command_line, machine_description, write_section  # noqa: E402


def build_models(backbone: str, image_size: int, bank_size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Return RALD (FG-Emotions labels, with a reference bank) and the bare backbone with a 33-way head."""
    torch.manual_seed(0)
    space = LabelSpace.from_preset("fg-emotions")
    config = RALDConfig.from_label_space(space, backbone=backbone, image_size=image_size)
    rald = RALDForImageClassification(config)
    features = torch.randn(bank_size, rald.rald.backbone_width)
    rald.rald.set_reference_bank(features, torch.arange(bank_size) % space.num_labels)
    bare = timm.create_model(backbone, num_classes=space.num_labels)
    return rald, bare


def time_calls(function: Any, min_seconds: float) -> float:
    """Call ``function`` until ``min_seconds`` pass; return seconds per call."""
    function()  # warm-up
    calls, start = 0, time.perf_counter()
    while True:
        function()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / calls


def paired_rates(
    first: Any, second: Any, repeats: int, min_seconds: float, items: int
) -> tuple[np.ndarray, np.ndarray]:
    """Time two functions in alternating order; return their rates (items per second) per repeat."""
    rates_first, rates_second = [], []
    for repeat in range(repeats):
        pair = [(first, rates_first), (second, rates_second)]
        for function, rates in pair if repeat % 2 == 0 else pair[::-1]:
            rates.append(items / time_calls(function, min_seconds))
    return np.array(rates_first), np.array(rates_second)


def inference_functions(rald: torch.nn.Module, bare: torch.nn.Module, batch: int, image_size: int):
    images = torch.randn(batch, 3, image_size, image_size)
    rald.eval()
    bare.eval()

    def run_rald() -> None:
        with torch.inference_mode():
            rald(images)

    def run_bare() -> None:
        with torch.inference_mode():
            bare(images)

    return run_rald, run_bare


def training_functions(rald: torch.nn.Module, bare: torch.nn.Module, batch: int, image_size: int, workdir: Path):
    images = torch.randn(batch, 3, image_size, image_size)
    labels = torch.arange(batch) % 33
    args = RALDTrainingArguments(output_dir=str(workdir), report_to="none", use_cpu=not torch.cuda.is_available())
    trainer = RALDTrainer(model=rald, args=args)
    rald_optimizer = torch.optim.SGD(rald.parameters(), lr=1e-4, momentum=0.9)
    bare_optimizer = torch.optim.SGD(bare.parameters(), lr=1e-4, momentum=0.9)
    inputs = {"pixel_values": images, "labels": labels}
    rald.train()
    bare.train()

    def step_rald() -> None:
        loss = trainer.compute_loss(rald, inputs, num_items_in_batch=batch)
        loss.backward()
        rald_optimizer.step()
        rald_optimizer.zero_grad(set_to_none=True)

    def step_bare() -> None:
        loss = F.cross_entropy(bare(images), labels)
        loss.backward()
        bare_optimizer.step()
        bare_optimizer.zero_grad(set_to_none=True)

    return step_rald, step_bare


def memory_probe(model_kind: str, backbone: str, image_size: int, batch: int, bank_size: int, workdir: str) -> None:
    """Run one inference batch and one training step of one model; print its peak memory in MiB as JSON."""
    rald, bare = build_models(backbone, image_size, bank_size)
    if model_kind == "rald":
        train_step, _ = training_functions(rald, bare, batch, image_size, Path(workdir))
        infer, _ = inference_functions(rald, bare, batch, image_size)
    else:
        _, train_step = training_functions(rald, bare, batch, image_size, Path(workdir))
        _, infer = inference_functions(rald, bare, batch, image_size)
    infer()
    train_step()
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mib": peak_kib / 1024}))


def peak_memory(model_kind: str, args: argparse.Namespace, backbone: str) -> float:
    command = [
        sys.executable, __file__, "--memory-probe", model_kind, "--backbones", backbone,
        "--image-size", str(args.image_size), "--bank-size", str(args.bank_size),
    ]  # fmt: skip
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mib"]


def describe(rates: np.ndarray) -> str:
    low, median, high = np.percentile(rates, [25, 50, 75])
    return f"{median:.1f} ({low:.1f} to {high:.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenetv2_100"])
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--bank-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15, help="paired repeats per measurement")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timed seconds per repeat and model")
    parser.add_argument("--memory-probe", choices=["rald", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--write-docs", action="store_true", help="write the tables into docs/benchmarks.md")
    args = parser.parse_args()
    workdir = Path(__file__).resolve().parents[1] / "runs" / "throughput"
    workdir.mkdir(parents=True, exist_ok=True)
    if args.memory_probe:
        memory_probe(
            args.memory_probe, args.backbones[0], args.image_size, args.train_batch_size, args.bank_size, str(workdir)
        )
        return

    rows = []
    for backbone in args.backbones:
        rald, bare = build_models(backbone, args.image_size, args.bank_size)
        for batch in args.batch_sizes:
            first, second = inference_functions(rald, bare, batch, args.image_size)
            rald_rates, bare_rates = paired_rates(first, second, args.repeats, args.min_seconds, batch)
            rows.append((backbone, f"inference, batch {batch}", "images/s", rald_rates, bare_rates))
            print(rows[-1][:2], np.median(rald_rates / bare_rates), flush=True)
        first, second = training_functions(rald, bare, args.train_batch_size, args.image_size, workdir)
        rald_rates, bare_rates = paired_rates(first, second, args.repeats, args.min_seconds, args.train_batch_size)
        rows.append((backbone, f"training step, batch {args.train_batch_size}", "images/s", rald_rates, bare_rates))
        print(rows[-1][:2], np.median(rald_rates / bare_rates), flush=True)

    memory = {
        backbone: (peak_memory("rald", args, backbone), peak_memory("bare", args, backbone))
        for backbone in args.backbones
    }

    lines = [
        "| backbone | measurement | RALD, median (IQR) | backbone alone, median (IQR) "
        "| ratio RALD / backbone, median (IQR) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for backbone, what, unit, rald_rates, bare_rates in rows:
        ratios = rald_rates / bare_rates
        lines.append(
            f"| {backbone} | {what} ({unit}) | {describe(rald_rates)} | {describe(bare_rates)} | "
            f"{np.median(ratios):.3f} ({np.percentile(ratios, 25):.3f} to {np.percentile(ratios, 75):.3f}) |"
        )
    lines += [
        "",
        f"Peak memory of one training step and one inference batch at batch {args.train_batch_size} "
        "(resident set size of a fresh process, MiB):",
        "",
        "| backbone | RALD | backbone alone | difference |",
        "| --- | --- | --- | --- |",
    ]
    for backbone, (rald_mib, bare_mib) in memory.items():
        lines.append(f"| {backbone} | {rald_mib:.0f} | {bare_mib:.0f} | {rald_mib - bare_mib:+.0f} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write_docs:
        body = (
            f"Command: `{command_line()}`\n\nMachine: {machine_description()}.\n\n"
            f"{args.image_size} px images, FG-Emotions labels (41 label nodes), reference bank of {args.bank_size} "
            f"images, {args.repeats} paired repeats of at least {args.min_seconds} s per model.\n\n" + table
        )
        print(f"Wrote {write_section('throughput', body)}")


if __name__ == "__main__":
    main()
