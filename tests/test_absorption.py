"""First-letter absorption (sae_ray.eval.absorption): exact scores on hand-made latents, a
synthetic hierarchy with hand-built SAEs whose absorption is known, and a tiny causal LM end to end."""

from __future__ import annotations

import math

import pytest
import torch

from sae_ray.activations.model import load_model
from sae_ray.eval.absorption import (
    AbsorptionConfig,
    absorption_scores,
    alpha_words,
    first_letter,
    first_letter_absorption,
    first_letter_prompt,
    fit_logistic,
    letter_activations,
    lm_absorption,
    select_main_latents,
    split_rows,
    train_letter_probe,
    _prompt_ids,
)
from sae_ray.sae import SAEConfig, create_sae


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread is as fast, and on a busy machine two threads spin against each
    other (the synthetic fixture took 30x longer with two under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# -- step 4 on numbers worked out by hand -------------------------------------


def test_scores_by_hand():
    """d_in 3, probe direction e0. Latent 0 is the main latent (decoder e0); latent 1 an
    absorber (decoder (e0 + e1)/sqrt2, cos 0.71); latent 2 points away from the probe (e1)."""
    W_dec = torch.tensor([[1.0, 0, 0], [1.0, 1.0, 0], [0, 1.0, 0]])
    W_dec[1] /= math.sqrt(2)
    u = torch.tensor([1.0, 0, 0]).expand(5, 3)
    main = torch.tensor([True, False, False]).expand(5, 3)
    x = torch.tensor([[2.0, 0, 0]] * 5)  # a = 2 on every row
    r2 = math.sqrt(2)
    f = torch.tensor([
        [2.0, 0, 0],        # main carries it all: no absorption
        [0, 2 * r2, 0],     # main silent, absorber projects 2 = a: full, fraction 1
        [1.0, r2, 0],       # main 1, absorber 1: partial, fraction 1/2, not full
        [0, 0.5 * r2, 3.0],  # absorber projects 0.5 < 0.4 a: neither
        [0.5, 1.5 * r2, 0],  # main 0.5, absorber 1.5: fraction 0.75
    ])
    fraction, full = absorption_scores(f, x, u, W_dec, main)
    torch.testing.assert_close(fraction, torch.tensor([0.0, 1.0, 0.5, 0.0, 0.75]))
    assert full.tolist() == [False, True, False, False, False]

    # the absorber's share is capped at what the main latent leaves: min(T, a - M) / (that + M)
    fraction, _ = absorption_scores(torch.tensor([[1.0, 4 * r2, 0]]), x[:1], u[:1], W_dec, main[:1])
    assert fraction.item() == pytest.approx(0.5)
    # decoder rows of norm 2 project twice as much per unit of activation: M = 1 and T = 1 here
    # (SAEBench's f * cos would see M = T = 0.5 < 0.4 a and call it no absorption)
    fraction, full = absorption_scores(torch.tensor([[0.5, r2 / 2, 0]]), x[:1], u[:1], W_dec * 2, main[:1])
    assert fraction.item() == pytest.approx(0.5) and not full.item()
    # a latent below the cosine threshold of the fraction (0.1) is no absorber; full absorption
    # asks only 0.025 of the top latent
    tilted = torch.tensor([[1.0, 0, 0], [0.05, 1.0, 0], [0, 1.0, 0]])
    fraction, full = absorption_scores(torch.tensor([[0.0, 40.0, 0]]), x[:1], u[:1], tilted, main[:1])
    assert fraction.item() == 0.0 and full.item()
    # the probe says no (a <= 0): nothing is absorbed
    fraction, full = absorption_scores(f[1:2], -x[:1], u[:1], W_dec, main[:1])
    assert fraction.item() == 0.0 and not full.item()


@pytest.mark.filterwarnings("ignore")  # sklearn's line search, this close to the optimum
def test_fit_logistic_is_sklearns_balanced_logistic_regression():
    sklearn = pytest.importorskip("sklearn.linear_model")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 3, generator=gen) * torch.tensor([1.0, 3.0, 0.2])
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.5 * torch.randn(300, generator=gen)) > 1.2  # unbalanced
    w, b = fit_logistic(x, y)
    # SAEBench's lbfgs stops near the optimum; sklearn's Newton solver finds it exactly, as ours does
    ref = sklearn.LogisticRegression(class_weight="balanced", solver="newton-cg", tol=1e-10).fit(x.numpy(), y.numpy())
    torch.testing.assert_close(w, torch.tensor(ref.coef_[0], dtype=torch.float32), atol=1e-4, rtol=1e-4)
    assert b == pytest.approx(ref.intercept_[0], abs=1e-4)


# -- a synthetic hierarchy with a known answer -----------------------------------

K, SHARE, SCALE = 20, 0.3, 10.0
"""Children per letter; share of a letter's words that carry a child; magnitude of features."""


def hierarchy(n_per_letter: int = 300, d: int = 560, seed: int = 0):
    """Words as x = m_p * parent[letter] + [child] m_c * child[letter, j] + noise: orthonormal
    directions, one parent per letter (the first-letter feature) and K children that fire only with
    it, one at most per word, on SHARE of the words. Returns x [N, d], labels [N], has_child [N],
    which child [N], parent [26, d], child [26, K, d]."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 26 * (K + 1), generator=gen))
    parent, child = q.T[:26], q.T[26:].reshape(26, K, d)
    labels = torch.arange(26).repeat_interleave(n_per_letter)
    n = len(labels)
    which = torch.randint(K, (n,), generator=gen)
    has = torch.rand(n, generator=gen) < SHARE
    m_p = SCALE * (1 + 0.5 * torch.rand(n, generator=gen))
    m_c = SCALE * (1 + 0.5 * torch.rand(n, generator=gen)) * has
    x = m_p[:, None] * parent[labels] + m_c[:, None] * child[labels, which]
    x = x + 0.01 * SCALE * torch.randn(n, d, generator=gen)
    return x, labels, has, which, parent, child


def child_latent(letter, j):
    return 26 + letter * K + j


def hand_sae(parent, child, absorbing: bool):
    """A JumpReLU SAE with one latent per true feature (parent l: latent l; child (l, j):
    `child_latent(l, j)`). Clean: each latent reads and writes its own direction. Absorbing: a
    child's latent reads child + parent, fires only with its child and writes (child + parent)/sqrt2;
    the parent's latent is pushed below its threshold whenever a child of its letter fires."""
    d = parent.shape[1]
    sae = create_sae(SAEConfig("jumprelu", d_in=d, d_sae=26 * (K + 1), l0_coefficient=1.0))
    enc = torch.cat([parent, child.reshape(-1, d)])  # [d_sae, d] read directions
    dec = enc.clone()
    theta = torch.full((26 * (K + 1),), 0.5 * SCALE)
    if absorbing:
        both = child + parent[:, None]  # [26, K, d]
        enc[:26] = parent - 2 * child.sum(1)
        enc[26:] = both.reshape(-1, d)
        dec[26:] = both.reshape(-1, d) / math.sqrt(2)
        theta[26:] = 1.75 * SCALE  # parent alone gives m_p <= 1.5 s, parent + child >= 2 s
    with torch.no_grad():
        sae.W_enc.copy_(enc.T)
        sae.W_dec.copy_(dec)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        sae.log_threshold.copy_(theta.log())
    return sae


@pytest.fixture(scope="module")
def synthetic():
    x, labels, has, which, parent, child = hierarchy()
    cfg = AbsorptionConfig(probe_batch_size=256)  # SAEBench's 64 takes 4x the steps to the same probe
    train = split_rows(len(x), cfg.train_fraction, cfg.seed)
    probe = train_letter_probe(x[train], labels[train], cfg)
    clean = first_letter_absorption(hand_sae(parent, child, False), x, labels, train, probe, cfg)
    absorbing = first_letter_absorption(hand_sae(parent, child, True), x, labels, train, probe, cfg)
    return dict(x=x, labels=labels, has=has, which=which, parent=parent, child=child, train=train,
                probe=probe, cfg=cfg, clean=clean, absorbing=absorbing)


def test_probe_finds_the_parent_direction(synthetic):
    w = synthetic["probe"].weight
    along = torch.nn.functional.normalize(w, dim=-1) @ synthetic["parent"].T  # [26 probes, 26 parents]
    assert (along.argmax(-1) == torch.arange(26)).all() and along.diagonal().min() > 0.2
    for r in synthetic["clean"].letters:
        assert r.probe_f1 > 0.95, r.first_letter


def test_clean_sae_absorbs_nothing(synthetic):
    result = synthetic["clean"]
    assert result.n_letters == 26
    for letter, r in enumerate(result.letters):
        assert r.main_latents == [letter]  # the parent's latent alone has F1 1
        assert r.sparse_f1[0] == 1.0
        assert r.num_probe_true_positives > 40 and r.counted
        assert set(r.absorption_fraction) == {0.0} and not any(r.is_full_absorption)
    assert result.mean_absorption_fraction_score == 0.0
    assert result.mean_full_absorption_score == 0.0
    assert result.mean_num_split_features == 1.0
    assert set(result.summary()) >= {"absorption/mean_absorption_fraction_score", "absorption/mean_full_absorption_score"}


def test_children_absorb_the_parent_on_their_share(synthetic):
    result, has, which = synthetic["absorbing"], synthetic["has"], synthetic["which"]
    assert result.n_letters == 26
    for letter, r in enumerate(result.letters):
        assert r.main_latents[0] == letter  # the parent's latent is still the main one
        # alone it finds exactly the words without a child: precision 1, recall r
        test = (synthetic["labels"] == letter) & ~synthetic["train"]
        recall = 1 - has[test].float().mean().item()
        assert r.sparse_f1[0] == pytest.approx(2 * recall / (1 + recall))
        rows = torch.tensor(r.rows)
        assert (synthetic["labels"][rows] == letter).all() and not synthetic["train"][rows].any()
        # a word is absorbed exactly when it has a child whose latent is not a main latent
        latent = child_latent(letter, which[rows])
        expected = has[rows] & ~torch.isin(latent, torch.tensor(r.main_latents))
        assert r.is_full_absorption == expected.tolist(), r.first_letter
        assert r.absorption_fraction == expected.float().tolist(), r.first_letter
        assert r.full_absorption_rate == pytest.approx(expected.float().mean().item())
    # k-sparse probing takes a few children as split features; most stay absorbing
    assert result.mean_num_split_features < 2
    assert result.mean_full_absorption_score == pytest.approx(SHARE, abs=0.06)
    assert result.mean_absorption_fraction_score == pytest.approx(result.mean_full_absorption_score)
    assert result.std_dev_full_absorption_score > 0


def test_too_few_letters_gives_nan_and_same_seed_same_figures(synthetic):
    x, labels, train = synthetic["x"], synthetic["labels"], synthetic["train"]
    keep = labels < 5
    cfg = AbsorptionConfig(probe_epochs=5)
    sae = hand_sae(synthetic["parent"], synthetic["child"], True)
    one = first_letter_absorption(sae, x[keep], labels[keep], train[keep], cfg=cfg)
    two = first_letter_absorption(sae, x[keep], labels[keep], train[keep], cfg=cfg)
    assert one == two  # the probes train from zero with a seeded shuffle
    assert one.n_letters == 5 and math.isnan(one.mean_full_absorption_score)  # fewer than 20
    assert [r.first_letter for r in one.letters if r.counted] == list("abcde")
    assert all(r.main_latents == [] and r.num_probe_true_positives == 0 for r in one.letters[5:])
    low = first_letter_absorption(sae, x[keep], labels[keep], train[keep], cfg=AbsorptionConfig(probe_epochs=5, min_letters=5))
    assert 0.1 < low.mean_full_absorption_score < 0.5


def test_main_latents_follow_the_f1_jump(synthetic):
    """A jump threshold of 1 stops at k = 1; a negative one never stops before max_k."""
    x, labels, train = synthetic["x"], synthetic["labels"], synthetic["train"]
    sae = hand_sae(synthetic["parent"], synthetic["child"], True)
    args = (sae, x[train], labels[train], x[~train], labels[~train])
    mains, f1s = select_main_latents(*args, AbsorptionConfig(f1_jump=1.0, sparse_epochs=10))
    assert [len(m) for m in mains] == [1] * 26 and [len(f) for f in f1s] == [2] * 26
    mains, f1s = select_main_latents(*args, AbsorptionConfig(f1_jump=-1.0, max_k=4, sparse_epochs=10))
    assert [len(m) for m in mains] == [4] * 26 and [len(f) for f in f1s] == [4] * 26


def test_rejects_a_stack_and_bad_labels(synthetic):
    sae = hand_sae(synthetic["parent"], synthetic["child"], False)
    x, labels = synthetic["x"][:50], synthetic["labels"][:50]
    with pytest.raises(ValueError, match="stack"):
        first_letter_absorption(type(sae).stack([sae, sae]), x, labels)
    with pytest.raises(ValueError, match="0..25"):
        first_letter_absorption(sae, x, labels + 26)
    with pytest.raises(ValueError, match=r"x \[N, 560\]"):
        first_letter_absorption(sae, x[:, :10], labels)


# -- a tiny causal LM end to end ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_factory):
    return load_model(tiny_model_factory("llama"))


def test_alpha_words_and_prompts(tiny_llama):
    _, tok = tiny_llama
    words = alpha_words(tok)
    assert len(words) > 50 and " the" in words
    assert all(w.lstrip(" ").isascii() and w.lstrip(" ").isalpha() and w.count(" ") <= 1 for w in words)
    assert not any("[" in w for w in words)
    assert all(len(w.strip()) >= 3 for w in alpha_words(tok, min_length=3))
    assert first_letter(" The") == first_letter("t") == 19

    head, prompt = first_letter_prompt(" the", [" cat", "Dog"])
    assert prompt == "\n cat has the first letter: C\nDog has the first letter: D\n the has the first letter:"
    assert head == prompt[: -len(" has the first letter:")]
    encoded = _prompt_ids(tok, [" the", " zqxj"], [head, head.replace(" the", " zqxj")],
                          [prompt, prompt.replace("\n the", "\n zqxj")], bos=tok.bos_token_id)
    ids, pos = encoded[0]
    assert ids[0] == tok.bos_token_id and tok.decode([ids[pos]]) == " the"
    assert tok.decode(ids[pos + 1:]) == " has the first letter:"
    assert encoded[1] is None  # not one token: skipped


def test_letter_activations_are_the_words_and_padding_does_not_matter(tiny_llama):
    model, tok = tiny_llama
    hook = "blocks.1.hook_resid_post"
    cfg = AbsorptionConfig(n_icl=3, llm_batch_size=16)
    data = letter_activations(model, tok, hook, cfg)
    n = len(data.words)
    assert data.x.shape == (n, 32) and data.x.dtype == torch.float32 and torch.isfinite(data.x).all()
    assert sorted(data.words + data.skipped) == alpha_words(tok)
    assert data.labels.tolist() == [first_letter(w) for w in data.words]
    assert abs(data.train.float().mean().item() - 0.8) < 0.05
    alone = letter_activations(model, tok, hook, AbsorptionConfig(n_icl=3, llm_batch_size=1))  # no padding
    assert alone.words == data.words
    torch.testing.assert_close(alone.x, data.x, atol=1e-5, rtol=1e-5)


def test_lm_absorption_end_to_end(tiny_llama):
    model, tok = tiny_llama
    torch.manual_seed(0)
    sae = create_sae(SAEConfig("topk", d_in=32, d_sae=64, k=4, hook_name="blocks.1.hook_resid_post"))
    cfg = AbsorptionConfig(n_icl=3, probe_epochs=5, sparse_epochs=5, min_letters=1, min_probe_f1=0.0)
    result = lm_absorption(sae, model, tok, cfg=cfg)
    # the same as its steps one by one, with the probe passed in
    data = letter_activations(model, tok, "blocks.1.hook_resid_post", cfg)
    probe = train_letter_probe(data.x[data.train], data.labels[data.train], cfg)
    assert first_letter_absorption(sae, data.x, data.labels, data.train, probe, cfg) == result
    logits = data.x @ probe.weight.T + probe.bias
    assert [r.first_letter for r in result.letters] == list("abcdefghijklmnopqrstuvwxyz")
    assert result.n_letters == sum(r.counted for r in result.letters) >= 1
    for r in result.letters:
        assert all(0 <= i < 64 for i in r.main_latents) and len(r.main_latents) <= cfg.max_k
        assert len(r.rows) == len(r.absorption_fraction) == len(r.is_full_absorption) == r.num_probe_true_positives
        assert all(0.0 <= v <= 1.0 for v in r.absorption_fraction)
        assert r.num_full_absorption == sum(r.is_full_absorption)
        letter = ord(r.first_letter) - ord("a")
        found = (data.labels == letter) & ~data.train & (logits[:, letter] > 0)  # the probe's true positives
        assert r.rows == torch.nonzero(found)[:, 0].tolist()
        if r.counted:
            assert 0 <= r.mean_absorption_fraction <= 1 and 0 <= r.full_absorption_rate <= 1
    summary = result.summary()
    assert 0 <= summary["absorption/mean_absorption_fraction_score"] <= 1
    assert 0 <= summary["absorption/mean_full_absorption_score"] <= 1
    assert summary["absorption/mean_num_split_features"] >= 1
    with pytest.raises(ValueError, match="hook_name"):
        lm_absorption(create_sae(SAEConfig("topk", d_in=32, d_sae=64, k=4)), model, tok, cfg=cfg)
