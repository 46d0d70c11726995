"""The machine a GPU check ran on: GPU, driver, torch, CUDA, cuDNN, attention ops, optional packages."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch
from parallelism.context.kernels import available_cuda_ops

OPTIONAL = ("flash_attn", "deepspeed", "megatron.core", "ray", "mpi4py", "transformers")


def _driver_version() -> str | None:
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None


def _present(module: str) -> bool:
    """Is ``module`` installed? Looked up without importing it (deepspeed/ray imports are slow)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit(root: Path) -> str | None:
    try:
        res = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (res.stdout.strip() or None) if res.returncode == 0 else None


def commit_of(root: Path) -> str | None:
    """The checked-out commit of ``root``; where the tree was copied without its ``.git`` (the GPU machine gets the
    working tree only), ``$DIST_TRAIN_COMMIT`` as the person starting the check gave it, marked as given."""
    commit = _git_commit(root)
    if commit is None and os.environ.get("DIST_TRAIN_COMMIT"):
        commit = f"{os.environ['DIST_TRAIN_COMMIT']} (from $DIST_TRAIN_COMMIT: no .git here)"
    return commit


def environment() -> dict:
    """Everything a reader needs to reproduce or compare a report."""
    env = {
        "host": socket.gethostname(), "platform": platform.platform(), "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(), "load_average": list(os.getloadavg()),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(), "gpus": [], "driver": None,
        "packages": {m: _present(m) for m in OPTIONAL},
        "versions": {n: _version(n) for n in ("numpy", "pyyaml", "safetensors", "xxhash", "pytest", "flash-attn")},
        "commit": commit_of(Path(__file__).resolve().parents[2]),
    }
    if torch.cuda.is_available():
        env["driver"] = _driver_version()
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            env["gpus"].append({"name": p.name, "capability": f"{p.major}.{p.minor}",
                                "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count})
        env["attention_ops"] = list(available_cuda_ops(torch.device("cuda", 0)))
        env["flash_sdp_available"] = torch.backends.cuda.is_flash_attention_available()
    return env
