"""Trainer checkpoints without Ray: a loop resumed from a checkpoint file ends exactly where the
uninterrupted loop ends (weights, Adam, monitor, L0 controller, stopped members)."""

from __future__ import annotations

import json

import pytest
import torch

from sae_ray.config import TrainConfig
from sae_ray.sae import ARCHITECTURES, SAEConfig, create_sae
from sae_ray.train.checkpoint import load_checkpoint, save_checkpoint
from sae_ray.train.loop import train_sae
from sparse_rows import sparse_data

D_IN, D_SAE, B = 32, 64, 128


def batches(start: int = 0):
    """A fixed stream: batch i is the same tensor for every reader (what a BufferReader
    resumed from its state gives)."""
    data = sparse_data(B * 120, seed=3, d_in=D_IN)
    for i in range(start, 120):
        yield data[i * B:(i + 1) * B]


def configs(arch: str, n: int) -> list[SAEConfig]:
    param = ARCHITECTURES[arch].sparsity_param
    value = 4 if param == "k" else ARCHITECTURES[arch].target_start
    return [SAEConfig(arch, D_IN, D_SAE, **{param: value}) for _ in range(n)]


def run(arch, train, targets, lrs, tmp_path=None, resume=None, start=0):
    torch.manual_seed(0)
    sae = create_sae(configs(arch, len(lrs)))
    saved = []

    def on_checkpoint(meta, tensors):
        if tmp_path is not None and not saved:
            save_checkpoint(tmp_path / "ckpt", {**meta, "extra": {"batches": meta["step"]}}, tensors)
        saved.append(meta["tokens_seen"])

    state = train_sae(sae, batches(start), train, lrs=lrs, targets=targets, on_checkpoint=on_checkpoint, resume=resume)
    return state, saved


@pytest.mark.parametrize("arch, targets, lrs", [
    ("standard", [8.0, 16.0], [3e-3, 3e-3]),  # the L0 controller's state
    ("topk", None, [3e-3, 1e9]),              # member 1 blows up: stopped by the monitor before the checkpoint
    ("jumprelu", [8.0], [3e-3]),              # a single SAE
])
def test_a_resumed_loop_ends_where_the_uninterrupted_one_ends(tmp_path, arch, targets, lrs):
    train = TrainConfig(total_tokens=B * 100, batch_size=B, lr=3e-3, log_every=10, checkpoint_every=B * 40,
                        dead_tokens=B * 20, monitor={"enabled": arch == "topk"})  # toy SAEs: fvu >= 1 early
    whole, saved = run(arch, train, targets, lrs, tmp_path)
    assert saved == [B * 40, B * 80]  # every checkpoint_every tokens, not at the end
    meta, tensors = load_checkpoint(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "state.json").read_text())["tokens_seen"] == B * 40
    resumed, _ = run(arch, train, targets, lrs, resume=(meta, tensors), start=meta["extra"]["batches"])

    assert resumed.tokens_seen == whole.tokens_seen == B * 100 and resumed.step == whole.step
    assert resumed.members == whole.members and resumed.verdicts == whole.verdicts
    assert resumed.member_tokens == whole.member_tokens
    if targets:  # the controller's coefficients
        assert resumed.coefficients == pytest.approx(whole.coefficients)
    for name, value in whole.sae.state_dict().items():
        torch.testing.assert_close(resumed.sae.state_dict()[name], value, msg=name)
    torch.testing.assert_close(resumed.sae.tokens_since_fired, whole.sae.tokens_since_fired)
    if arch == "topk":
        assert whole.verdicts[1] == "stopped" and whole.members == [0]


def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path):
    with pytest.raises(ValueError, match="state.json is missing"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, {"step": 1}, {"w": torch.zeros(2)})
    (tmp_path / "state.json").write_text(json.dumps({"version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        load_checkpoint(tmp_path)
