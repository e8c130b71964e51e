"""What the numbers were measured on: machine, accelerator, library versions, command line."""

from __future__ import annotations

import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

LIBRARIES = ("faspx", "torch", "transformers", "onnxruntime", "onnxruntime-gpu", "onnx", "vllm", "numpy",
             "psutil")


def cpu_model() -> str:
    """The CPU's marketing name (from /proc/cpuinfo on Linux)."""
    info = Path("/proc/cpuinfo")
    if info.exists():
        for line in info.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    """Installed versions (None for a library that is not installed), read without importing them."""
    found = {}
    for name in LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def command_line() -> str:
    """The command as typed: ``faspx bench ...`` for the CLI, else the Python command line."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name == "faspx":
        argv[0] = "faspx"
    return " ".join(argv)


def environment(device: torch.device) -> dict:
    import psutil

    env = {
        "command": command_line(), "cwd": os.getcwd(),
        "python": platform.python_version(), "platform": platform.platform(),
        "cpu": cpu_model(), "cpu_cores_logical": os.cpu_count(), "cpu_cores_physical": psutil.cpu_count(logical=False),
        "torch_threads": torch.get_num_threads(), "memory_bytes": psutil.virtual_memory().total,
        "device": str(device), "gpu": None, "cuda": torch.version.cuda,
        "versions": versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory)
    try:
        import onnxruntime

        env["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        env["onnxruntime_providers"] = []
    return env
