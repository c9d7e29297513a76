"""LM-level evaluation (sae_ray.eval.lm) on tiny models: the spliced forward, the figures against
a hand computation, the held-out contexts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sae_ray.activations.hooks import resolve_hook
from sae_ray.activations.model import load_model
from sae_ray.buffer.split import held_out
from sae_ray.eval.lm import activation_mean, evaluate_lm, held_out_contexts, metrics_for, splice
from sae_ray.sae import SAEConfig, create_sae
from tests.tiny_models import CORPUS, make_tiny_model

DOCS = [f"{CORPUS[i % len(CORPUS)]} Document number {i} ends here." for i in range(400)]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model, tok = load_model(make_tiny_model("llama", tmp_path_factory.mktemp("llama")))
    return model, tok


def identity_sae(d: int):
    """A ReLU SAE whose reconstruction is exactly its input: latents relu(x) and relu(-x)."""
    sae = create_sae(SAEConfig(architecture="standard", d_in=d, d_sae=2 * d, l1_coefficient=1.0))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def random_sae(d: int, d_sae: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    return create_sae(SAEConfig(architecture="topk", d_in=d, d_sae=d_sae, k=4))


def test_held_out_contexts_hold_only_held_out_documents(llama):
    _, tok = llama
    ctx = held_out_contexts(tok, DOCS, 0.2, 32, n_tokens=300)
    docs = ctx.doc_index[ctx.keep].numpy()
    assert ctx.n_tokens >= 300
    assert len(docs) and held_out(docs, 0.2).all()  # every spliced token is of a held-out document
    # and they are the held-out documents in order, from the first
    first = [i for i in range(len(DOCS)) if held_out(np.array([i]), 0.2)[0]]
    assert np.unique(docs).tolist() == first[: len(np.unique(docs))]
    with pytest.raises(ValueError, match="no held-out document"):
        held_out_contexts(tok, [], 0.2, 32, n_tokens=10)


def test_identity_reconstruction_leaves_the_model_unchanged(llama):
    model, tok = llama
    hook = resolve_hook(model, 2, "resid_post")
    ctx = held_out_contexts(tok, DOCS, 0.2, 32, n_tokens=200)
    ids, mask = ctx.input_ids[:4], ctx.attention_mask[:4]
    clean = model(input_ids=ids, attention_mask=mask).logits
    with splice(model, hook, lambda x: x.clone()):
        same = model(input_ids=ids, attention_mask=mask).logits
    with splice(model, hook, torch.zeros_like):
        ablated = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(clean, same)
    assert not torch.allclose(clean, ablated)  # the splice reaches the output

    mean = activation_mean(model, hook, ctx)
    ref, (row,) = evaluate_lm(model, hook, ctx, [identity_sae(mean.shape[0])], mean)
    assert row["ce_loss_with_sae"] == pytest.approx(ref["ce_loss_without_sae"], abs=1e-5)
    assert row["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)
    assert row["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert row["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    assert row["explained_variance"] == pytest.approx(1.0, abs=1e-5)
    assert row["cossim"] == pytest.approx(1.0, abs=1e-5) and row["l2_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert set(metrics_for("causal")) <= set(row)


def test_lm_figures_equal_a_hand_computation(llama):
    model, tok = llama
    hook = resolve_hook(model, 1, "resid_post")
    ctx = held_out_contexts(tok, DOCS, 0.2, 32, n_tokens=400)
    mean = activation_mean(model, hook, ctx)
    sae = random_sae(mean.shape[0]).eval()
    ref, (row,) = evaluate_lm(model, hook, ctx, [sae], mean, batch_size=3)

    # by hand, all contexts in one batch: labels -100 where the next token is not kept
    ids, mask, keep = ctx.input_ids, ctx.attention_mask, ctx.keep
    labels = ids.clone()
    labels[~keep] = -100
    block = model.get_submodule(hook.module_path)

    def logits_with(fn):
        handle = block.register_forward_hook(lambda m, a, out: fn(out if torch.is_tensor(out) else out[0]))
        try:
            return model(input_ids=ids, attention_mask=mask).logits
        finally:
            handle.remove()

    def ce(logits):
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)).item()

    def with_sae(h):
        h = h.clone()
        h[keep] = sae.decode(sae.encode(h[keep]))
        return h

    def zero(h):
        h = h.clone()
        h[keep] = 0
        return h

    clean = model(input_ids=ids, attention_mask=mask).logits
    l_sae, l_zero = logits_with(with_sae), logits_with(zero)
    ce_clean, ce_sae, ce_zero = ce(clean), ce(l_sae), ce(l_zero)
    assert ref["ce_loss_without_sae"] == pytest.approx(ce_clean, rel=1e-4)
    assert row["ce_loss_with_sae"] == pytest.approx(ce_sae, rel=1e-4)
    assert row["ce_loss_with_ablation"] == pytest.approx(ce_zero, rel=1e-4)
    assert row["ce_loss_score"] == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_clean), rel=1e-3)
    assert row["delta_lm_loss"] == pytest.approx(ce_sae - ce_clean, rel=1e-3, abs=1e-6)
    target = keep[:, 1:]
    p, q = F.log_softmax(clean[:, :-1], -1), F.log_softmax(l_sae[:, :-1], -1)
    kl = (p.exp() * (p - q)).sum(-1)[target].mean().item()
    assert row["kl_div_with_sae"] == pytest.approx(kl, rel=1e-3)
    assert row["kl_div_with_sae"] > 0

    x = model.get_submodule(hook.module_path)  # reconstruction figures from the captured rows
    from sae_ray.activations.hooks import capture_activations

    rows = capture_activations(model, [hook], ids, mask)[hook.name][keep]
    f = sae.encode(rows)
    x_hat = sae.decode(f)
    assert row["l0"] == pytest.approx((f != 0).sum(-1).float().mean().item(), rel=1e-5)
    ev = 1 - (rows - x_hat).var(0, unbiased=False).sum() / rows.var(0, unbiased=False).sum()
    assert row["explained_variance"] == pytest.approx(ev.item(), rel=1e-4)
    assert row["relative_reconstruction_bias"] == pytest.approx(
        (x_hat.pow(2).sum(-1).mean() / (rows * x_hat).sum(-1).mean()).item(), rel=1e-4)
    assert row["cossim"] == pytest.approx(F.cosine_similarity(x_hat, rows, dim=-1).mean().item(), rel=1e-4)
    freq = (f != 0).float().mean(0)
    assert torch.allclose(row["frequencies"], freq, atol=1e-6)
    assert row["dead_fraction"] == pytest.approx((freq == 0).float().mean().item())
    del x


def test_encoder_gets_embedding_figures(tmp_path):
    model, tok = load_model(make_tiny_model("bert", tmp_path / "bert"))
    hook = resolve_hook(model, 1, "resid_post")
    ctx = held_out_contexts(tok, DOCS, 0.2, 32, n_tokens=200)
    mean = activation_mean(model, hook, ctx)
    ref, (same, other) = evaluate_lm(model, hook, ctx, [identity_sae(mean.shape[0]), random_sae(mean.shape[0])], mean)
    assert "ce_loss_score" not in same and set(metrics_for("encoder")) <= set(same)
    assert same["embedding_cossim_with_sae"] == pytest.approx(1.0, abs=1e-5)
    assert same["embedding_score"] == pytest.approx(1.0, abs=1e-4)
    assert other["embedding_cossim_with_sae"] < 1 - 1e-4


def test_masked_lm_gets_the_masked_token_loss(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from sae_ray.eval.lm import _masked_positions, model_kind
    from tests.tiny_models import make_tokenizer

    tok = make_tokenizer(tmp_path / "mlm", style="bert")
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
                    ).save_pretrained(tmp_path / "mlm")
    model, tok = load_model(str(tmp_path / "mlm"))
    assert model_kind(model) == "masked"
    hook = resolve_hook(model, 0, "resid_post")
    ctx = held_out_contexts(tok, DOCS, 0.2, 32, n_tokens=200)
    mean = activation_mean(model, hook, ctx)
    sae = random_sae(mean.shape[0]).eval()
    ref, (same, row) = evaluate_lm(model, hook, ctx, [identity_sae(mean.shape[0]), sae], mean, batch_size=100,
                                   mask_token_id=tok.mask_token_id)
    assert same["ce_loss_with_sae"] == pytest.approx(ref["ce_loss_without_sae"], abs=1e-5)
    assert same["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)
    # by hand (one batch: the masked positions are those of seed 0)
    masked = _masked_positions(ctx.keep, 0)
    assert masked.sum() == ref["scored_tokens"] and (masked.sum(1) >= 1).all()
    ids = ctx.input_ids.masked_fill(masked, tok.mask_token_id)
    keep = ctx.keep & ~masked
    clean = model(input_ids=ids, attention_mask=ctx.attention_mask).logits
    assert ref["ce_loss_without_sae"] == pytest.approx(F.cross_entropy(clean[masked], ctx.input_ids[masked]).item(), rel=1e-4)
    block = model.get_submodule(hook.module_path)

    def with_sae(m, a, out):
        h = (out if torch.is_tensor(out) else out[0]).clone()
        h[keep] = sae.decode(sae.encode(h[keep]))
        return h if torch.is_tensor(out) else (h, *out[1:])

    handle = block.register_forward_hook(with_sae)
    try:
        spliced = model(input_ids=ids, attention_mask=ctx.attention_mask).logits
    finally:
        handle.remove()
    assert row["ce_loss_with_sae"] == pytest.approx(F.cross_entropy(spliced[masked], ctx.input_ids[masked]).item(), rel=1e-4)
    with pytest.raises(ValueError, match="mask_token_id"):
        evaluate_lm(model, hook, ctx, [sae], mean)
