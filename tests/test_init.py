"""`sae-ray init`: a commented, valid starting config from a model's config alone, and the
training-length rule of `sae_ray.presets` that `sae-ray validate` warns with."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from sae_ray import presets
from sae_ray.cli import main
from sae_ray.config import load_config
from tiny_models import KINDS

QUICKSTART = Path(__file__).parent.parent / "jobs" / "configs" / "quickstart.yaml"


def init_text(capsys, *argv: str) -> str:
    """The config `sae-ray init ARGV` prints (exit code 0)."""
    capsys.readouterr()
    assert main(["init", *argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def init_error(capsys, *argv: str) -> str:
    """The one line `sae-ray init ARGV` prints on stderr for a user mistake (exit code 2, no traceback)."""
    capsys.readouterr()
    assert main(["init", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sae-ray init: "), captured.err
    return lines[0]


def value_lines(text: str) -> list[str]:
    """The lines of a YAML text that set a value (not blank, not a comment, not a section header)."""
    return [line for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#") and not re.fullmatch(r"\w+:", line.strip())]


@pytest.mark.parametrize("kind", KINDS)
def test_init_writes_a_valid_commented_config_for_every_family(kind, tiny_model_factory, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's workdir (runs/...) lands here
    model = tiny_model_factory(kind)
    text = init_text(capsys, model, "--budget-tokens", "1000000")
    # every value line says where its value comes from
    for line in value_lines(text):
        assert " # " in line, f"no comment: {line!r}"
    path = tmp_path / "my-sweep.yaml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.model.name == model
    assert [(h.layer, h.site) for h in cfg.hooks] == [(2, "resid_post")]  # the middle of 4 blocks
    assert cfg.sae.architectures == ["topk", "batchtopk"] and cfg.sae.expansion_factor == [8]
    assert cfg.sae.target_l0 == [4, 8]  # d_in 32: top = 2^n nearest 32/4
    assert cfg.train.total_tokens == 1_000_000 and cfg.train.batch_size == 256  # 3,907 steps
    assert cfg.train.lr == presets.learning_rate(8 * 32, 3907) == presets.LR_MAX
    # the real `sae-ray validate`, with the data (the builtin corpus) and the buffer checked; no warning
    capsys.readouterr()
    assert main(["validate", str(path)]) == 0
    captured = capsys.readouterr()
    assert "4 SAEs in 4 trials" in captured.out  # 2 architectures x 2 target L0s, one SAE per trial on CPU
    assert "warning" not in captured.err


def test_every_number_has_its_comment(tiny_model_factory, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    text = init_text(capsys, tiny_model_factory("llama"), "--layers", "0,3", "--sites", "resid_pre,attn_out",
                     "--budget-tokens", "20000000", "--gpus", "2")
    numbers = [line for line in value_lines(text) if re.search(r":\s*\[?[-0-9.]", line.split(" # ")[0])]
    assert len(numbers) >= 20  # dtype-free numbers: shards, batch, lr, GPUs, ...
    for line in numbers:
        value, _, comment = line.partition(" # ")
        assert comment.strip(), f"a number without a comment: {line!r}"


def test_layers_sites_and_gpus_reach_the_output(tiny_model_factory, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    text = init_text(capsys, tiny_model_factory("gpt2"), "--layers", "1,3", "--sites", "resid_pre,mlp_out",
                     "--budget-tokens", "20000000", "--gpus", "2", "--architectures", "topk")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    cfg = load_config(path)  # not `validate`: this machine has no GPU to schedule them on
    assert [(h.layer, h.site) for h in cfg.hooks] == [(1, "resid_pre"), (1, "mlp_out"), (3, "resid_pre"), (3, "mlp_out")]
    assert "blocks.3.hook_mlp_out: d_in 32" in text
    assert cfg.producers.count == 2 and cfg.producers.num_gpus == 0.5
    # 4 hooks x 1 architecture x 1 width, each ladder one stack: 4 trials share half of 2 GPUs
    assert cfg.resources.gpus_per_trial == 0.25 and "4 trial(s) share half of 2 GPU(s)" in text
    assert cfg.train.batch_size == 4096 and cfg.train.total_tokens == 20_000_000  # 4,883 steps
    assert cfg.buffer.n_tokens >= 20_000_000 / (1 - cfg.buffer.eval_fraction)  # one epoch


def test_init_reads_no_weights(tiny_model_factory, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    bare = tmp_path / "config-only"
    shutil.copytree(tiny_model_factory("gpt_neox"), bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert not list(bare.glob("*.safetensors"))
    assert "GPTNeoXForCausalLM: 4 layers, d_model 32" in init_text(capsys, str(bare))


def test_bad_input_is_one_line_naming_the_thing(tiny_model_factory, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = tiny_model_factory("gpt2")
    missing = str(tmp_path / "no-such-model")
    line = init_error(capsys, missing)
    assert "MODEL" in line and missing in line and "does not exist" in line
    (tmp_path / "empty").mkdir()
    line = init_error(capsys, str(tmp_path / "empty"))
    assert "MODEL" in line and "empty" in line and "could not read its config" in line
    line = init_error(capsys, "no-such-org/no-such-model")  # a hub id: looked up in the local cache only
    assert "'no-such-org/no-such-model'" in line and "cache" in line
    line = init_error(capsys, model, "--layers", "1,9")
    assert "--layers: value 9" in line and "4 layers (0..3)" in line
    line = init_error(capsys, model, "--layers", "one")
    assert "--layers: value 'one'" in line
    line = init_error(capsys, model, "--sites", "resid_post,resid_middle")
    assert "--sites: value 'resid_middle'" in line and "'resid_pre', 'resid_post', 'mlp_out', 'attn_out'" in line
    assert "--budget-tokens: value 0" in init_error(capsys, model, "--budget-tokens", "0")
    line = init_error(capsys, model, "--architectures", "topk,tpok")
    assert "--architectures: value 'tpok'" in line and "batchtopk" in line


def test_validate_warns_when_an_sae_gets_too_few_steps(tiny_model_factory, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = {"model": {"name": tiny_model_factory("gpt2")}, "data": {"path": "builtin:python-docs"},
            "hooks": [{"layer": 1, "site": "resid_post"}], "sae": {"expansion_factor": [8], "k": [4]},
            "buffer": {"eval_fraction": 0.5, "n_tokens": 20000}}

    def validate(train: dict) -> str:
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({**base, "train": {**train, "eval_rows": 1024}}))
        capsys.readouterr()
        assert main(["validate", str(path), "--static"]) == 0  # a warning fails nothing
        return capsys.readouterr().err

    # the case: 2M tokens in batches of 4096 (489 steps)
    err = validate({"total_tokens": 2_000_000, "batch_size": 4096})
    warning = [line for line in err.splitlines() if line.startswith("warning: train.batch_size")]
    assert len(warning) == 1, err
    assert "value 4,096" in warning[0] and "train.total_tokens 2,000,000" in warning[0] and "489 optimizer steps" in warning[0]
    assert "lower train.batch_size to 512 (3,907 steps)" in warning[0] and "raise train.total_tokens to 8,388,608" in warning[0]
    # already at the smallest batch the rule picks: only more tokens help
    err = validate({"total_tokens": 100_000, "batch_size": 256})
    assert "raise train.total_tokens to 524,288" in err and "lower train.batch_size" not in err
    # enough steps: no warning
    assert "warning" not in validate({"total_tokens": 1_000_000, "batch_size": 256})


def test_the_rule():
    assert presets.batch_size_for(2_000_000) == 512  # the synthetic problem: 3,907 steps
    assert presets.learning_rate(2048, 3907) == 1.6e-3
    assert presets.batch_size_for(100_000) == presets.MIN_BATCH
    assert presets.batch_size_for(10**10) == presets.MAX_BATCH == 4096
    assert presets.learning_rate(2**14, 10**6) == 2e-4  # long runs: sparsify's width rule as it is
    assert presets.learning_rate(2**8, 100) == presets.LR_MAX
    for tokens in (10**6, 3 * 10**6, 10**8):  # at least MIN_STEPS whenever the budget allows
        assert presets.optimizer_steps(tokens, presets.batch_size_for(tokens)) >= presets.MIN_STEPS
    assert presets.gpu_shares(0, 4) == (0.0, 0.0)
    assert presets.gpu_shares(1, 1) == (0.5, 0.5) and presets.gpu_shares(1, 3) == (0.5, 0.125)


def test_buffer_numbers_follow_the_disk_and_the_held_out_rows():
    row = 384 * 4 + 16
    roomy = presets.buffer_numbers(300_000, row, free_bytes=10**12, eval_rows=8192)
    assert roomy == {"n_tokens": 344_064, "shard_rows": 16_384, "chunk_rows": 4096, "eval_fraction": 0.1,
                     "eval_rows": 8192}
    tight = presets.buffer_numbers(300_000, row, free_bytes=2 * 100_000 * row, eval_rows=8192)
    assert tight["n_tokens"] <= 100_000 and tight["eval_fraction"] == 0.2  # rows reused over epochs
    tiny = presets.buffer_numbers(10_000, row, free_bytes=10**12, eval_rows=8192)
    assert tiny["eval_fraction"] == 0.5 and tiny["eval_rows"] < 8192  # lowered to what the share holds
    assert tiny["shard_rows"] % tiny["chunk_rows"] == 0


# What `init` writes for the quickstart's model, layer, site, budget and architectures that
# jobs/configs/quickstart.yaml sets otherwise: (quickstart, init). The rule gives the batch, the lr
# and the dead-latent window from the budget; one epoch of rows where the quickstart reuses 150k.
QUICKSTART_DIFFERENCES = {
    "train.batch_size": (1024, 256),
    "train.lr": (0.0004, 0.0024),
    "train.dead_tokens": (100_000, 30_000),
    "buffer.n_tokens": (150_000, 344_064),
    "data.batch_size": (32, 16),
}


def test_the_quickstart_could_have_been_written_by_init(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    quick = load_config(QUICKSTART)
    text = init_text(capsys, quick.model.name, "--layers", "3", "--sites", "resid_post",
                     "--budget-tokens", str(quick.train.total_tokens), "--architectures", "standard,topk")
    (tmp_path / "init.yaml").write_text(text)
    made = load_config(tmp_path / "init.yaml")
    keys = ["model.name", "model.dtype", "data.context_size", "data.batch_size", "buffer.n_tokens", "buffer.shard_rows",
            "buffer.chunk_rows", "buffer.dtype", "buffer.eval_fraction", "producers.count", "producers.num_cpus",
            "producers.num_gpus", "sae.architectures", "sae.expansion_factor", "sae.target_l0", "train.total_tokens",
            "train.batch_size", "train.lr", "train.eval_rows", "train.dead_tokens", "resources.cpus_per_trial",
            "resources.gpus_per_trial"]

    def value(cfg, key):
        section, field = key.split(".")
        return getattr(getattr(cfg, section), field)

    assert [(h.layer, h.site) for h in made.hooks] == [(h.layer, h.site) for h in quick.hooks]
    differences = {k: (value(quick, k), value(made, k)) for k in keys if value(quick, k) != value(made, k)}
    assert differences == QUICKSTART_DIFFERENCES
