"""Facts about the CUDA device that launch settings depend on, queried once per device (both
kernel backends use them; importing this module does not initialize CUDA)."""

from __future__ import annotations

import functools

import torch


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of CUDA ``device``."""
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
