"""`sae-ray bench buffer` runs end to end on a tiny model and prints its three ratios."""

from sae_ray.bench.buffer import run_buffer_bench


def test_buffer_bench_prints_three_ratios(tmp_path, tiny_model_factory, capsys):
    out = run_buffer_bench(tiny_model_factory("gpt2"), rows=512, shard_rows=128, layer=1, context_size=16,
                           batch_size=4, train_steps=2, train_batch=64, expansion=2, workdir=str(tmp_path))
    printed = capsys.readouterr().out
    for line in ("1. producer", "2. trainer", "3. reads", "compression ratio"):
        assert line in printed
    assert out["producer"]["ratio"] > 0 and out["trainer"]["ratio"] > 0 and out["read"]["ratio"] > 0
    assert set(out["compression"]) == {"zstd", "lz4", "none"}
    assert abs(out["compression"]["none"] - 1.0) < 0.1  # no codec: on disk ~ uncompressed (plus index, checksums)
