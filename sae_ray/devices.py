"""Which torch device a config's `device` field means. No Ray."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")
"""What a config's `device` may say; "cuda:N" is accepted too."""


def pick_device(device: str) -> torch.device:
    """'auto' means cuda when this process can see a GPU, else cpu; 'cpu', 'cuda' or 'cuda:N' as given."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
