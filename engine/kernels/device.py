"""Facts about the GPU the kernels size their grids for."""

from __future__ import annotations

import functools

import torch

INTERPRETER_SM_COUNT = 132  # the Triton interpreter on the CPU: an H100/H200's count


def sm_count(device: torch.device | None = None) -> int:
    """Streaming multiprocessors of `device` (the current CUDA device when None)."""
    if not torch.cuda.is_available() or (device is not None and device.type != "cuda"):
        return INTERPRETER_SM_COUNT
    index = torch.cuda.current_device() if device is None or device.index is None else device.index
    return _device_sm_count(index)


@functools.lru_cache(maxsize=None)
def _device_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count
