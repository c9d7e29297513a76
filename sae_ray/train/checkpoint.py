"""Trainer checkpoints, saved and loaded in one place: one directory of safetensors and JSON. No Ray, no pickle.

    <dir>/state.json           everything that is not a tensor: the loop's position (step, tokens,
                               the members still training, the input scale, Adam's step counts),
                               the monitor's and the L0 controller's state, and whatever the caller
                               adds under "extra" (a trial: its MLflow run ids, the reader's position)
    <dir>/tensors.safetensors  "sae.<name>": the SAE's weights and buffers (tokens_since_fired
                               included); "opt.exp_avg.<i>", "opt.exp_avg_sq.<i>": Adam's moments

The training loop builds the two halves (`train_sae(..., on_checkpoint=...)`) and takes them
back (`train_sae(..., resume=...)`); a loop resumed from a checkpoint goes on exactly as the
uninterrupted one would have, given the batches it would have read next.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor

CHECKPOINT_VERSION = 1
STATE_FILE = "state.json"
TENSORS_FILE = "tensors.safetensors"


def save_checkpoint(path: str | os.PathLike, state: dict, tensors: dict[str, Tensor]) -> None:
    """Write `state` (plain JSON) and `tensors` into directory `path` (created if needed)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path / TENSORS_FILE))
    (path / STATE_FILE).write_text(json.dumps({"version": CHECKPOINT_VERSION, **state}))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(state, tensors) as `save_checkpoint` wrote them; ValueError naming the file if it is not one."""
    path = Path(path)
    state_file, tensors_file = path / STATE_FILE, path / TENSORS_FILE
    for f in (state_file, tensors_file):
        if not f.is_file():
            raise ValueError(f"checkpoint {path}: {f.name} is missing; not a sae-ray checkpoint")
    state = json.loads(state_file.read_text())
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {state_file}: version {state.get('version')!r}; this sae-ray reads "
                         f"version {CHECKPOINT_VERSION}")
    return state, load_file(str(tensors_file))
