"""Helpers shared by the benchmark scripts: the data folder, and their sections of docs/benchmarks.md.

Each script writes its own section, between markers that name it, with the command and machine on top.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def require_data_dir(contents: str = "fer2013/") -> Path:
    """Return the folder named by ``RALD_DATA_DIR``, or exit with a message when the variable is unset."""
    data_dir = os.environ.get("RALD_DATA_DIR")
    if not data_dir:
        sys.exit(f"Set RALD_DATA_DIR to the folder that contains {contents}")
    return Path(data_dir)


def machine_description() -> str:
    """Describe the CPU, core count and software versions of this machine in one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    threads = torch.get_num_threads()
    return (
        f"{cpu}, {os.cpu_count()} cores, {device}; Python {platform.python_version()}, torch {torch.__version__}, "
        f"{threads} torch thread{'' if threads == 1 else 's'}"
    )


def command_line() -> str:
    """Return the command that is running, as a user would type it."""
    script = Path(sys.argv[0]).resolve()
    try:
        script = script.relative_to(DOCS.parents[1])
    except ValueError:
        pass
    return " ".join(["python", str(script), *map(shlex.quote, sys.argv[1:])])


def provenance(label: str = "Command") -> str:
    """Return the Markdown lines that name the running command and this machine, for the top of a section."""
    return f"{label}: `{command_line()}`\n\nMachine: {machine_description()}.\n\n"


def write_section(name: str, body: str) -> Path:
    """Replace (or append) the section ``name`` of docs/benchmarks.md with ``body``."""
    start, end = f"<!-- {name}: start -->", f"<!-- {name}: end -->"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOCS.write_text(text)
    return DOCS
