"""The one place where a device name such as "auto" becomes a torch.device.

    resolve_device("auto")   # cuda when a CUDA GPU is visible, else cpu
    resolve_device("cuda:1") # as named (cuda_missing says whether it can run here)

Callers add their own user-facing error for a CUDA device with no GPU: training's run.device
(train.engine.use_cuda, ConfigError), evaluation's --device (evaluate.common.pick_device, EvalError).
"""
from __future__ import annotations

import os

import torch


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """"auto" or "" -> cuda when torch sees a CUDA GPU, else cpu; any other name -> torch.device(name)."""
    if str(name) in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cuda_missing(device: torch.device) -> bool:
    """True when `device` is a CUDA device and no CUDA GPU is visible."""
    return device.type == "cuda" and not torch.cuda.is_available()


def computes_in_bf16(dtype: str, device_type: str) -> bool:
    """run.dtype on a device type: bfloat16, or auto on CUDA (bf16 autocast over fp32 parameters)."""
    return dtype == "bfloat16" or (dtype == "auto" and device_type == "cuda")


def prefer_expandable_segments() -> None:
    """Let PyTorch's CUDA allocator grow segments in place (PYTORCH_CUDA_ALLOC_CONF
    expandable_segments:True) unless the user set the variable: long sequences allocate blocks of
    many sizes, and fragmentation can otherwise cost gigabytes near the memory limit. Takes effect
    only before the first CUDA allocation of the process."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
