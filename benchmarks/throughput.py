"""Speed and memory of RALD against the bare timm backbone, measured side by side in one process per backbone.

Inference: images per second of RALD in reference mode (the batch-independent default once a bank exists)
and of the same timm backbone with its own classifier, at batch 1 and 64. Training: optimizer steps per
second of RALD with NNLDL (RALDTrainer.compute_loss) against the backbone with a linear head and
cross-entropy. Each repeat times both models back to back, alternating which goes first, so that load on
this shared machine hits both alike; the table gives the median over repeats, the interquartile range and
the median of the per-repeat ratios. Each backbone is timed in a fresh process, so that the order of the
backbones does not matter. Memory (resident set size) comes from a fresh process per model. The
script measures on the CPU only. With --head-sweep it instead times batch 1 for several head sizes and
image sizes of one backbone, and with --head-parts each part of the default head, to show where the cost of
the head comes from. With --processes it times the batch-1 ratio of the default head in several fresh
processes, because the readings of separate runs differ by more than the spread within one run. With
--precision it times training steps in float32 against bfloat16 autocast with channels-last convolutions.

Usage:
    python benchmarks/throughput.py --backbones resnet18 mobilenetv2_100 --write-docs
    python benchmarks/throughput.py --head-sweep --repeats 9 --write-docs
    python benchmarks/throughput.py --head-parts --repeats 5 --write-docs
    python benchmarks/throughput.py --processes 8 --repeats 9 --write-docs
    python benchmarks/throughput.py --precision --repeats 5 --write-docs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F

from rald_hf import LabelSpace, RALDConfig, RALDForImageClassification
from rald_hf.modeling_rald import _exact_gelu
from rald_hf.training import RALDTrainer, RALDTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import provenance, write_section  # noqa: E402

# Head configurations of the sweep: a name, RALDConfig overrides, and the image size.
HEAD_SWEEP: list[tuple[str, dict[str, Any], int]] = [
    ("hidden_size 256, mlp_ratio 4 (the earlier defaults)", {"hidden_size": 256, "mlp_ratio": 4.0}, 112),
    ("defaults (hidden_size 128, mlp_ratio 2)", {}, 112),
    ("hidden_size 32, mlp_ratio 1", {"hidden_size": 32, "mlp_ratio": 1.0}, 112),
    (
        "hidden_size 32, mlp_ratio 1, no ITRR, no LGIFO",
        {"hidden_size": 32, "mlp_ratio": 1.0, "use_itrr": False, "use_lgifo": False},
        112,
    ),
    ("hidden_size 256, mlp_ratio 4 (the earlier defaults)", {"hidden_size": 256, "mlp_ratio": 4.0}, 224),
    ("defaults (hidden_size 128, mlp_ratio 2)", {}, 224),
]


def build_rald(backbone: str, image_size: int, bank_size: int, **overrides: Any) -> RALDForImageClassification:
    """Return RALD with FG-Emotions labels and a reference bank of ``bank_size`` random features.

    ``overrides`` are further `RALDConfig` fields, such as ``hidden_size``.
    """
    torch.manual_seed(0)
    space = LabelSpace.from_preset("fg-emotions")
    config = RALDConfig.from_label_space(space, backbone=backbone, image_size=image_size, **overrides)
    rald = RALDForImageClassification(config)
    features = torch.randn(bank_size, rald.rald.backbone_width)
    rald.rald.set_reference_bank(features, torch.arange(bank_size) % space.num_labels)
    return rald


def build_bare(backbone: str) -> torch.nn.Module:
    """Return the bare timm backbone with a 33-way classifier, the size of FG-Emotions' fine label set."""
    torch.manual_seed(0)
    return timm.create_model(backbone, num_classes=33)


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


def interleaved_rates(functions: list[Any], repeats: int, min_seconds: float, items: int) -> list[np.ndarray]:
    """Time several functions one after another in each repeat, reversing their order every other repeat.

    Returns:
        The rates (items per second) of each function, one per repeat.
    """
    rates: list[list[float]] = [[] for _ in functions]
    order = list(range(len(functions)))
    for repeat in range(repeats):
        for index in order if repeat % 2 == 0 else order[::-1]:
            rates[index].append(items / time_calls(functions[index], min_seconds))
    return [np.array(values) for values in rates]


def paired_rates(
    first: Any, second: Any, repeats: int, min_seconds: float, items: int
) -> tuple[np.ndarray, np.ndarray]:
    """Time two functions in alternating order; return their rates (items per second) per repeat."""
    rates_first, rates_second = interleaved_rates([first, second], repeats, min_seconds, items)
    return rates_first, rates_second


def inference_function(model: torch.nn.Module, batch: int, image_size: int) -> Callable[[], None]:
    """Return a function that classifies one batch of random images without gradients."""
    images = torch.randn(batch, 3, image_size, image_size)
    model.eval()

    def run() -> None:
        with torch.inference_mode():
            model(images)

    return run


def paired_inference_rates(
    rald: torch.nn.Module, bare: torch.nn.Module, batch: int, args: argparse.Namespace, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Time inference of RALD and the bare backbone side by side; return their images per second per repeat."""
    first = inference_function(rald, batch, image_size)
    second = inference_function(bare, batch, image_size)
    return paired_rates(first, second, args.repeats, args.min_seconds, batch)


def run_probe(command: list[str]) -> Any:
    """Run a probe of this script in a fresh process and return the JSON on the last line of its output."""
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def training_function(
    model: torch.nn.Module, batch: int, image_size: int, workdir: Path, fast: bool = False
) -> Callable[[], None]:
    """Return a function that takes one SGD step: RALD through RALDTrainer.compute_loss, anything else with CE.

    ``fast`` trains as the options ``bf16=True, channels_last=True`` do, with bfloat16 autocast and
    channels-last convolutions.
    """
    images = torch.randn(batch, 3, image_size, image_size)
    labels = torch.arange(batch) % 33
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train()
    if isinstance(model, RALDForImageClassification):
        args = RALDTrainingArguments(
            output_dir=str(workdir), report_to="none", use_cpu=True, bf16=fast, channels_last=fast
        )
        trainer = RALDTrainer(model=model, args=args)
        inputs = {"pixel_values": images, "labels": labels}

        def loss() -> torch.Tensor:
            return trainer.compute_loss(model, inputs, num_items_in_batch=batch)
    else:
        if fast:
            model.to(memory_format=torch.channels_last)
            images = images.contiguous(memory_format=torch.channels_last)

        def loss() -> torch.Tensor:
            return F.cross_entropy(model(images), labels)

    def step() -> None:
        # With bf16 the Trainer runs the model's forward pass under this autocast. Here the loss runs inside
        # it too, which is a small part of the step.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fast):
            value = loss()
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def backbone_rates(args: argparse.Namespace, backbone: str, workdir: Path) -> list[tuple[str, str, list, list]]:
    """Time RALD and the bare backbone at each batch size and for a training step.

    Returns:
        Rows of (backbone, measurement, RALD rates, bare backbone rates), the rates in images per second.
    """
    rald, bare = build_rald(backbone, args.image_size, args.bank_size), build_bare(backbone)
    rows = []
    for batch in args.batch_sizes:
        rald_rates, bare_rates = paired_inference_rates(rald, bare, batch, args, args.image_size)
        rows.append((backbone, f"inference, batch {batch}", rald_rates.tolist(), bare_rates.tolist()))
    first = training_function(rald, args.train_batch_size, args.image_size, workdir)
    second = training_function(bare, args.train_batch_size, args.image_size, workdir)
    rald_rates, bare_rates = paired_rates(first, second, args.repeats, args.min_seconds, args.train_batch_size)
    rows.append((backbone, f"training step, batch {args.train_batch_size}", rald_rates.tolist(), bare_rates.tolist()))
    return rows


def fresh_process_rates(args: argparse.Namespace, backbone: str) -> list[tuple[str, str, np.ndarray, np.ndarray]]:
    """Run `backbone_rates` for one backbone in a fresh process, so that no other model's run shapes its timing."""
    command = [
        sys.executable, __file__, "--rates-probe", "--backbones", backbone,
        "--image-size", str(args.image_size), "--bank-size", str(args.bank_size),
        "--batch-sizes", *map(str, args.batch_sizes), "--train-batch-size", str(args.train_batch_size),
        "--repeats", str(args.repeats), "--min-seconds", str(args.min_seconds),
    ]  # fmt: skip
    rows = []
    for name, measurement, rald_rates, bare_rates in run_probe(command):
        rows.append((name, measurement, np.array(rald_rates), np.array(bare_rates)))
        print(rows[-1][:2], np.median(rows[-1][2] / rows[-1][3]), flush=True)
    return rows


def resident_mib(field: str) -> float:
    """Read one memory field of this process (``VmRSS`` now, ``VmHWM`` peak) from /proc, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


def memory_probe(model_kind: str, backbone: str, image_size: int, batch: int, bank_size: int, workdir: str) -> None:
    """Run one inference batch and one training step of one model; print its memory in MiB as JSON.

    Only the measured model is built. Writing 5 to /proc/self/clear_refs resets the peak resident set size
    (Linux 4.0 and later), so the peak covers the inference batch and the training step, not the imports.
    The tensors autograd keeps for the backward pass are counted exactly through saved-tensor hooks, each
    storage once and parameters excluded. The resident set size also contains allocator slack, so it varies
    between runs.
    """
    model = build_rald(backbone, image_size, bank_size) if model_kind == "rald" else build_bare(backbone)
    infer = inference_function(model, batch, image_size)
    train_step = training_function(model, batch, image_size, Path(workdir))
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    before = resident_mib("VmRSS")
    infer()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        train_step()
    result = {
        "parameters_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
        "saved_for_backward_mib": sum(saved.values()) / 2**20,
        "before_mib": before,
        "peak_mib": resident_mib("VmHWM"),
    }
    print(json.dumps(result))


def peak_memory(model_kind: str, args: argparse.Namespace, backbone: str) -> dict[str, float]:
    """Run :func:`memory_probe` in a fresh process and return its measurements."""
    command = [
        sys.executable, __file__, "--memory-probe", model_kind, "--backbones", backbone,
        "--image-size", str(args.image_size), "--bank-size", str(args.bank_size),
    ]  # fmt: skip
    return run_probe(command)


def batch1_probe(args: argparse.Namespace) -> None:
    """Time the default head against the bare backbone at batch 1 in this process and print the rates as JSON."""
    rald, bare = build_rald(args.sweep_backbone, args.image_size, args.bank_size), build_bare(args.sweep_backbone)
    rald_rates, bare_rates = paired_inference_rates(rald, bare, 1, args, args.image_size)
    print(json.dumps({"rald": rald_rates.tolist(), "bare": bare_rates.tolist()}))


def batch1_processes(args: argparse.Namespace) -> str:
    """Run `batch1_probe` in ``args.processes`` fresh processes, one after another, and return a Markdown table."""
    command = [
        sys.executable, __file__, "--batch1-probe", "--sweep-backbone", args.sweep_backbone,
        "--image-size", str(args.image_size), "--bank-size", str(args.bank_size),
        "--repeats", str(args.repeats), "--min-seconds", str(args.min_seconds),
    ]  # fmt: skip
    lines = [
        "| process | RALD, ms per image | backbone alone, ms per image | ratio RALD / backbone, median (IQR) |",
        "| --- | --- | --- | --- |",
    ]
    medians = []
    for process in range(1, args.processes + 1):
        rates = run_probe(command)
        rald_rates, bare_rates = np.array(rates["rald"]), np.array(rates["bare"])
        ratios = rald_rates / bare_rates
        medians.append(float(np.median(ratios)))
        lines.append(
            f"| {process} | {1e3 / np.median(rald_rates):.2f} | {1e3 / np.median(bare_rates):.2f} "
            f"| {medians[-1]:.3f} ({np.percentile(ratios, 25):.3f} to {np.percentile(ratios, 75):.3f}) |"
        )
        print(lines[-1], flush=True)
    low, middle, high = np.percentile(medians, [25, 50, 75])
    lines.append(f"| median of the {len(medians)} processes | | | {middle:.3f} ({low:.3f} to {high:.3f}) |")
    return "\n".join(lines) + "\n"


def machine_load(at_start: float) -> str:
    """Describe the 1-minute load average at the start of the run and now, for the docs."""
    return (
        f"Load average over one minute at the start and the end: {at_start:.2f} and {os.getloadavg()[0]:.2f}. "
        "The run itself adds about 1 to the figure at the end; more than that means other processes shared the "
        "machine, which changes the batch-1 ratios most.\n\n"
    )


def head_sweep(args: argparse.Namespace) -> str:
    """Time RALD against the bare backbone at batch 1 for each head of `HEAD_SWEEP` and return a Markdown table."""
    backbone = args.sweep_backbone
    bare = build_bare(backbone)
    lines = [
        "| head | image size | head parameters (MiB) | RALD, ms per image | backbone alone, ms per image "
        "| ratio RALD / backbone, median (IQR) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, overrides, image_size in HEAD_SWEEP:
        rald = build_rald(backbone, image_size, args.bank_size, **overrides)
        head_bytes = sum(
            p.numel() * p.element_size() for n, p in rald.named_parameters() if not n.startswith("rald.backbone.")
        )
        rald_rates, bare_rates = paired_inference_rates(rald, bare, 1, args, image_size)
        ratios = rald_rates / bare_rates
        lines.append(
            f"| {name} | {image_size} px | {head_bytes / 2**20:.1f} | {1e3 / np.median(rald_rates):.2f} "
            f"| {1e3 / np.median(bare_rates):.2f} | {np.median(ratios):.3f} "
            f"({np.percentile(ratios, 25):.3f} to {np.percentile(ratios, 75):.3f}) |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines) + "\n"


def head_parts(args: argparse.Namespace) -> str:
    """Time each part of the default head at batch 1, hot and right after a backbone call, in a Markdown table.

    "Hot" repeats the part in a loop. "After the backbone" runs the bare backbone before every call of the part
    and times the part alone, as it runs inside a real forward pass, where the backbone has just replaced the
    head's code and data in the processor caches.
    """
    backbone = args.sweep_backbone
    image_size = args.image_size
    rald, bare = build_rald(backbone, image_size, args.bank_size).eval(), build_bare(backbone).eval()
    model = rald.rald
    images = torch.randn(1, 3, image_size, image_size)
    with torch.inference_mode():
        features = model.extract_backbone_features(images)
        tokens = model.embed_features(features)
        constants = model.inference_constants(with_bank=True)
        hidden = model.itrr.mlp.fc1(tokens)
    extract_backbone_features = model.extract_backbone_features
    backbones = {
        "bare backbone with its classifier": lambda: bare(images),
        "RALD's backbone and pooling": lambda: extract_backbone_features(images),
    }
    plan = constants.plan
    if plan is None:
        raise RuntimeError(
            "The head has no evaluation plan (a module of it has hooks or was replaced), so its parts cannot be timed"
        )
    parts: list[tuple[str, Callable[[], Any]]] = [
        ("whole head: RALD with the backbone features given", lambda: rald(images)),
        ("weight check of the inference cache", lambda: model.inference_constants(with_bank=True)),
        ("module check of the evaluation plan", plan.applies),
        ("image projection", lambda: plan.embed(features)),
        ("ITRR block (reference mode)", lambda: plan.relate(tokens, "reference", constants.bank)),
        ("LGIFO block", lambda: plan.guide(tokens)),
        ("classifier", lambda: rald.classifier(tokens)),
        (f"exact GELU of one {hidden.shape[1]}-wide row, nn.GELU (oneDNN)", lambda: model.itrr.mlp.act(hidden)),
        (f"exact GELU of one {hidden.shape[1]}-wide row, from erf (evaluation path)", lambda: _exact_gelu(hidden)),
    ]
    # For timing the head alone, an instance attribute replaces the backbone call of this one model.
    model.extract_backbone_features = lambda pixel_values: features
    hot: dict[str, list[float]] = {name: [] for name, _ in parts}
    cold: dict[str, list[float]] = {name: [] for name, _ in parts}
    backbone_ms: dict[str, list[float]] = {name: [] for name in backbones}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, function in backbones.items():
                backbone_ms[name].append(time_calls(function, args.min_seconds) * 1e3)
            for name, function in parts:
                hot[name].append(time_calls(function, args.min_seconds / 4) * 1e6)
                samples = []
                for _ in range(50):
                    bare(images)
                    start = time.perf_counter()
                    function()
                    samples.append(time.perf_counter() - start)
                cold[name].append(float(np.median(samples)) * 1e6)
    lines = [
        "| part | hot loop, µs per call | right after the backbone, µs per call | slowdown |",
        "| --- | --- | --- | --- |",
    ]
    for name, _ in parts:
        hot_us, cold_us = np.median(hot[name]), np.median(cold[name])
        lines.append(f"| {name} | {hot_us:.0f} | {cold_us:.0f} | {cold_us / hot_us:.1f}x |")
        print(lines[-1], flush=True)
    timings = ", ".join(f"{name} {np.median(ms):.2f} ms" for name, ms in backbone_ms.items())
    return f"For scale, per call in a hot loop: {timings}.\n\n" + "\n".join(lines) + "\n"


def precision_rates(args: argparse.Namespace) -> str:
    """Time training steps in float32 and with bfloat16 autocast and channels-last convolutions; return a table.

    Four models are timed in one interleaved loop per backbone: RALD (through RALDTrainer.compute_loss, with
    NNLDL) and the backbone with a linear head and cross-entropy, each in both settings.
    """
    batch, size = args.train_batch_size, args.image_size
    workdir = Path(__file__).resolve().parents[1] / "runs" / "throughput"
    lines = [
        "| backbone | model | float32, images/s, median (IQR) | bf16 + channels-last, images/s, median (IQR) "
        "| speed-up, median (IQR) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for backbone in args.backbones:
        functions = [
            training_function(build(backbone), batch, size, workdir, fast=fast)
            for build in (lambda name: build_rald(name, size, args.bank_size), build_bare)
            for fast in (False, True)
        ]
        rates = interleaved_rates(functions, args.repeats, args.min_seconds, batch)
        for name, (slow, fast) in (("RALD", rates[:2]), ("backbone alone", rates[2:])):
            lines.append(f"| {backbone} | {name} | {describe(slow)} | {describe(fast)} | {describe(fast / slow, 2)} |")
            print(lines[-1], flush=True)
        lines.append(
            f"| {backbone} | ratio RALD / backbone | {np.median(rates[0] / rates[2]):.3f} "
            f"| {describe(rates[1] / rates[3], 3)} | |"
        )
    return "\n".join(lines) + "\n"


def describe(values: np.ndarray, digits: int = 1) -> str:
    """Format the median and interquartile range of ``values`` as "median (low to high)"."""
    low, median, high = np.percentile(values, [25, 50, 75])
    return f"{median:.{digits}f} ({low:.{digits}f} to {high:.{digits}f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet18", "mobilenetv2_100"])
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--bank-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15, help="paired repeats per measurement")
    parser.add_argument("--min-seconds", type=float, default=0.5, help="timed seconds per repeat and model")
    parser.add_argument(
        "--head-sweep",
        action="store_true",
        help="instead of the main tables, time batch 1 for several head sizes and image sizes of --sweep-backbone",
    )
    parser.add_argument(
        "--head-parts",
        action="store_true",
        help="instead of the main tables, time each part of the default head of --sweep-backbone at batch 1",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="instead of the main tables, time batch 1 of the default head of --sweep-backbone in this many fresh "
        "processes",
    )
    parser.add_argument(
        "--precision",
        action="store_true",
        help="instead of the main tables, time training steps in float32 and with --bf16 --channels-last",
    )
    parser.add_argument("--sweep-backbone", default="mobilenetv2_100")
    parser.add_argument("--batch1-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rates-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-probe", choices=["rald", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--write-docs", action="store_true", help="write the tables into docs/benchmarks.md")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    workdir = Path(__file__).resolve().parents[1] / "runs" / "throughput"
    workdir.mkdir(parents=True, exist_ok=True)
    if args.memory_probe:
        memory_probe(
            args.memory_probe, args.backbones[0], args.image_size, args.train_batch_size, args.bank_size, str(workdir)
        )
        return
    if args.batch1_probe:
        batch1_probe(args)
        return
    if args.head_sweep or args.head_parts or args.processes or args.precision:
        if args.precision:
            table, section = precision_rates(args), "throughput-precision"
            setup = (
                f"Training steps at batch {args.train_batch_size}, {args.image_size} px, FG-Emotions labels, RALD with "
                f"the default head and NNLDL, {args.repeats} interleaved repeats of at least {args.min_seconds} s "
                "per model. The last row of each backbone gives RALD's training rate over the backbone's in each "
                "setting.\n\n"
            )
        elif args.processes:
            table, section = batch1_processes(args), "throughput-processes"
            setup = (
                f"{args.sweep_backbone} at {args.image_size} px, batch 1, default head, reference mode (bank of "
                f"{args.bank_size} images), FG-Emotions labels. {args.processes} fresh processes, one after another, "
                f"each timing {args.repeats} paired repeats of at least {args.min_seconds} s per model.\n\n"
            )
        elif args.head_sweep:
            table, section = head_sweep(args), "throughput-heads"
            setup = (
                f"{args.sweep_backbone}, inference at batch 1 in reference mode (bank of {args.bank_size} images), "
                f"FG-Emotions labels, {args.repeats} paired repeats of at least {args.min_seconds} s per model.\n\n"
            )
        else:
            table, section = head_parts(args), "throughput-head-parts"
            setup = (
                f"{args.sweep_backbone} at {args.image_size} px, batch 1, default head, reference mode (bank of "
                f"{args.bank_size} images), FG-Emotions labels. Each figure is the median over {args.repeats} "
                "repeats. Each repeat times a hot loop and 50 calls each preceded by one call of the bare backbone.\n\n"
            )
        if args.write_docs:
            body = provenance() + machine_load(load_at_start) + setup + table
            print(f"Wrote {write_section(section, body)}")
        return

    if args.rates_probe:
        print(json.dumps(backbone_rates(args, args.backbones[0], workdir)))
        return
    rows = [row for backbone in args.backbones for row in fresh_process_rates(args, backbone)]

    memory = {
        backbone: (peak_memory("rald", args, backbone), peak_memory("bare", args, backbone))
        for backbone in args.backbones
    }

    lines = [
        "| backbone | measurement | RALD, median (IQR) | backbone alone, median (IQR) "
        "| ratio RALD / backbone, median (IQR) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for backbone, measurement, rald_rates, bare_rates in rows:
        lines.append(
            f"| {backbone} | {measurement} (images/s) | {describe(rald_rates)} | {describe(bare_rates)} | "
            f"{describe(rald_rates / bare_rates, 3)} |"
        )
    lines += [
        "",
        f"Memory of one inference batch and one training step at batch {args.train_batch_size}, each model alone "
        "in a fresh process, in MiB: parameters; tensors saved for the backward pass (exact, through autograd's "
        "saved-tensor hooks); resident set size after building the model and at the peak of the two calls "
        "(includes the allocator's slack, so it varies by tens of MiB between runs):",
        "",
        "| backbone | model | parameters | saved for backward | resident before | resident peak |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for backbone, pair in memory.items():
        for name, measured in zip(("RALD", "backbone alone"), pair, strict=True):
            lines.append(
                f"| {backbone} | {name} | {measured['parameters_mib']:.1f} | {measured['saved_for_backward_mib']:.1f} "
                f"| {measured['before_mib']:.0f} | {measured['peak_mib']:.0f} |"
            )
        ratio = pair[0]["saved_for_backward_mib"] / pair[1]["saved_for_backward_mib"]
        lines.append(f"| {backbone} | ratio RALD / backbone | | {ratio:.3f} | | |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write_docs:
        body = (
            provenance()
            + machine_load(load_at_start)
            + f"{args.image_size} px images, FG-Emotions labels (41 label nodes), reference bank of {args.bank_size} "
            f"images, {args.repeats} paired repeats of at least {args.min_seconds} s per model. Each backbone's "
            "timings run in a fresh process of their own.\n\n" + table
        )
        print(f"Wrote {write_section('throughput', body)}")


if __name__ == "__main__":
    main()
