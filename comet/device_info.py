"""What a launcher needs to know of the device it runs on."""
from __future__ import annotations

import torch

INTERPRETER_SMS = 4  # the Triton interpreter: a few programs, so persistent loops are exercised


def num_sms(device: torch.device) -> int:
    """The number of SMs of a CUDA device; `INTERPRETER_SMS` elsewhere (kernels on the CPU run
    under the Triton interpreter)."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else INTERPRETER_SMS
