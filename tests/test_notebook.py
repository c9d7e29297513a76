"""The notebook API: `fit_sae` on a tensor, `train_sae` on a tensor, eval mode on return, the
warning when the data runs out before the budget, and fit_sae + save + load."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import sae_ray
from sae_ray import fit_sae
from sae_ray.bench.synthetic import SyntheticActivations, SyntheticConfig, recovery
from sae_ray.config import TrainConfig
from sae_ray.eval.metrics import evaluate_sae
from sae_ray.formats import load_sae_path
from sae_ray.sae import ARCHITECTURES, SAEConfig, create_sae
from sae_ray.train.loop import tensor_batches, train_sae

ALL = ["standard", "topk", "batchtopk", "jumprelu", "gated", "matryoshka"]
SPARSITY = {"k": {"k": 2}, "l1_coefficient": {"l1_coefficient": 1.0}, "l0_coefficient": {"l0_coefficient": 1.0}}
QUIET = {"monitor": {"enabled": False}, "log_every": 10**6}  # tiny runs: no verdicts wanted


def rows(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_importing_sae_ray_stays_light():
    code = "import sys, sae_ray; sae_ray.fit_sae; print(sorted(m for m in ('torch', 'mlflow', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_fit_sae_on_a_tensor_recovers_a_known_dictionary():
    data = SyntheticActivations(SyntheticConfig(d=16, n_features=48, l0=2.0, seed=3))
    x = data.sample(40_000)
    sae = fit_sae(x, "topk", d_sae=96, k=2, epochs=3)  # 120k rows: 469 steps of 256
    assert not sae.training and sae.cfg.d_in == 16 and sae.cfg.d_sae == 96
    recovered, _ = recovery(sae.W_dec, data.dictionary)
    ev = evaluate_sae(sae, data.fresh(4096))
    assert recovered >= 0.8, recovered
    assert ev["fvu"] < 0.3 and ev["l0"] <= 2.0, ev


def test_tensor_batches_shuffle_every_epoch_with_the_seed():
    x = torch.arange(12, dtype=torch.float32)[:, None]
    batches = list(tensor_batches(x, 4, seed=5, epochs=3))
    assert [len(b) for b in batches] == [4] * 9
    epochs = [torch.cat(batches[i:i + 3]).flatten().tolist() for i in (0, 3, 6)]
    assert all(sorted(e) == list(range(12)) for e in epochs)  # each epoch: every row once
    assert len({tuple(e) for e in epochs}) == 3  # in a new order each time
    again = list(tensor_batches(x, 4, seed=5, epochs=3))
    assert all(torch.equal(a, b) for a, b in zip(batches, again))
    other = torch.cat(list(tensor_batches(x, 4, seed=6, epochs=1))).flatten().tolist()
    assert other != epochs[0]
    # the epochs are one stream: 10 rows in batches of 4 run on into the next epoch; the last one is short
    sizes = [len(b) for b in tensor_batches(torch.zeros(10, 1), 4, epochs=2)]
    assert sizes == [4, 4, 4, 4, 4] and sum(sizes) == 20
    sizes = [len(b) for b in tensor_batches(torch.zeros(10, 1), 4, epochs=3)]
    assert sizes == [4] * 7 + [2]


def test_train_sae_takes_a_tensor_and_reads_it_in_batch_size_rows():
    x = rows(1000)
    seen = []
    train = TrainConfig(total_tokens=3000, batch_size=100, lr=1e-3, **QUIET)
    sae = create_sae(SAEConfig("topk", 16, 32, k=2))
    state = train_sae(sae, x, train, on_log=lambda step, m: seen.append(m[0]["tokens"]))
    assert state.step == 30 and state.tokens_seen == 3000 and state.data_ran_out_at is None
    with pytest.raises(ValueError, match=r"batches is a tensor of shape \(1000, 8\).*d_in=16"):
        train_sae(create_sae(SAEConfig("topk", 16, 32, k=2)), rows(1000, d=8), train)
    with pytest.raises(ValueError, match="epochs=2 is for a tensor"):
        train_sae(create_sae(SAEConfig("topk", 16, 32, k=2)), iter([x]), train, epochs=2)
    with pytest.raises(ValueError, match="epochs=0; expected a whole number >= 1"):
        train_sae(create_sae(SAEConfig("topk", 16, 32, k=2)), x, train, epochs=0)


@pytest.mark.parametrize("arch", ALL)
def test_the_trained_sae_comes_back_in_eval_mode(arch):
    x = rows(2048)
    train = TrainConfig(total_tokens=4096, batch_size=256, lr=1e-3, **QUIET)
    cfg = SAEConfig(arch, 16, 64, **SPARSITY[ARCHITECTURES[arch].sparsity_param])
    state = train_sae(create_sae(cfg), x, train)
    assert not state.sae.training
    sae = fit_sae(x, arch, d_sae=64, total_tokens=4096, **SPARSITY[ARCHITECTURES[arch].sparsity_param], **QUIET)
    assert not sae.training
    with torch.no_grad():  # a row's latents do not depend on the rest of its batch (BatchTopK: θ, not top-k*B)
        alone = torch.cat([sae.encode(x[i:i + 1]) for i in range(64)])
        torch.testing.assert_close(alone, sae.encode(x[:64]))


def test_a_stack_comes_back_in_eval_mode_too():
    stack = create_sae([SAEConfig("batchtopk", 16, 64, k=k) for k in (2, 4)])
    state = train_sae(stack, rows(2048), TrainConfig(total_tokens=4096, batch_size=256, **QUIET))
    assert state.sae.n_stack == 2 and not state.sae.training


def test_running_out_of_data_warns_and_is_recorded():
    x = rows(1000)
    train = TrainConfig(total_tokens=5000, batch_size=100, lr=1e-3, **QUIET)
    # a tensor capped at 2 epochs: 2,000 rows of the 5,000 asked for
    with pytest.warns(RuntimeWarning, match=r"ran out at 2,000 of train.total_tokens=5,000 tokens \(step 20 of 50\)"):
        state = train_sae(create_sae(SAEConfig("topk", 16, 32, k=2)), x, train, epochs=2)
    assert state.data_ran_out_at == 2000 and state.tokens_seen == 2000 and not state.sae.training
    # an iterator that ends early
    with pytest.warns(RuntimeWarning, match="ran out at 3,000 of"):
        state = train_sae(create_sae(SAEConfig("topk", 16, 32, k=2)), iter(x.repeat(3, 1).split(100)), train)
    assert state.data_ran_out_at == 3000
    # fit_sae says so too
    with pytest.warns(RuntimeWarning, match="ran out at 1,000 of train.total_tokens=5,000"):
        fit_sae(x, "topk", d_sae=32, k=2, total_tokens=5000, epochs=1, batch_size=100, **QUIET)


def test_no_warning_when_the_budget_is_reached():
    x = rows(1000)
    train = TrainConfig(total_tokens=5000, batch_size=100, lr=1e-3, **QUIET)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # a tensor with no cap: as many epochs as the budget takes
        assert train_sae(create_sae(SAEConfig("topk", 16, 32, k=2)), x, train).data_ran_out_at is None
        # a cap that holds the budget exactly, and an iterator that holds it exactly
        assert train_sae(create_sae(SAEConfig("topk", 16, 32, k=2)), x, train, epochs=5).data_ran_out_at is None
        state = train_sae(create_sae(SAEConfig("topk", 16, 32, k=2)), iter(x.repeat(5, 1).split(100)), train)
        assert state.data_ran_out_at is None and state.tokens_seen == 5000
        fit_sae(x, "topk", d_sae=32, k=2, epochs=2, batch_size=100, **QUIET)  # total_tokens: the 2 epochs


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_fit_sae_saves_what_sae_ray_formats_loads(arch, tmp_path):
    x = rows(2048)
    sparsity = SPARSITY[ARCHITECTURES[arch].sparsity_param]
    sae = fit_sae(x, arch, d_sae=64, total_tokens=4096, save=tmp_path / "sae", **sparsity, **QUIET)
    assert (tmp_path / "sae" / "cfg.json").is_file() and (tmp_path / "sae" / "sae_weights.safetensors").is_file()
    for loaded in (load_sae_path(tmp_path / "sae").eval(), sae_ray.load_sae(str(tmp_path / "sae"))):
        assert type(loaded) is type(sae) and loaded.cfg.d_sae == 64
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode(x[:100]), sae.encode(x[:100]))
            torch.testing.assert_close(loaded(x[:100]).x_hat, sae(x[:100]).x_hat)


def test_fit_sae_names_the_argument_it_cannot_use():
    x = rows(512)
    cases = [
        (dict(architecture="gatted", k=2), r"architecture='gatted'; accepted: .*gated"),
        (dict(architecture="topk"), "needs k .* or target_l0"),
        (dict(architecture="jumprelu", k=3), r"k=3 does not apply to architecture 'jumprelu', whose sparsity is set by l0_coefficient"),
        (dict(architecture="standard", l1_coefficient=1.0, target_l0=8), r"l1_coefficient=1.0 and target_l0=8; give one"),
        (dict(architecture="topk", k=2, extra={"bandwith": 1}), r"extra keys \['bandwith'\] are not knobs of 'topk'"),
        (dict(architecture="topk", k=2, lr=-1.0), "lr"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            fit_sae(x, **kwargs)
    with pytest.raises(ValueError, match=r"x has shape \(512,\)"):
        fit_sae(x[:, 0], "topk", k=2)
    with pytest.raises(ValueError, match="total_tokens=None; an iterator"):
        fit_sae(iter(x.split(64)), "topk", k=2)
    with pytest.raises(ValueError, match=r"first batch is a list; expected tensors of rows"):
        fit_sae(iter([[1.0, 2.0]]), "topk", k=2, total_tokens=64)


def test_fit_sae_takes_an_iterator_and_target_l0():
    x = rows(2048)
    sae = fit_sae(iter(x.split(256)), "topk", d_sae=64, target_l0=3, total_tokens=2048, **QUIET)
    assert sae.cfg.k == 3 and not sae.training
    sae = fit_sae(x, "standard", d_sae=64, target_l0=8, total_tokens=4096, **QUIET)
    assert sae.cfg.l1_coefficient != ARCHITECTURES["standard"].target_start  # the controller moved it
