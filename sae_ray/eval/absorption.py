"""First-letter feature absorption (SAEBench's "absorption_first_letter"). Pure torch.

Absorption (Chanin et al. 2024, "A is for Absorption"): a general feature ("starts with S")
has a latent of its own, but on some inputs a more specific latent ("short") fires instead and
carries the general direction in its decoder row, so the general latent stays silent where the
feature is plainly present. The steps, as SAEBench runs them (defaults in `AbsorptionConfig`):

1. Words: the tokens of the vocabulary that are ASCII letters only (after one leading space,
   "Ġ" or "▁"); the label is the first letter, 0..25. The words are split 80/20 into train
   and test. Each word is put at the end of an in-context prompt of 10 other words of its split,
      "\\n{w1} has the first letter: W\\n...\\n{w10} has the first letter: W\\n{word} has the first letter:"
   and x [d_in] is the activation at the SAE's hook at the word's token (SAEBench: position -6).
2. Probe: a 26-way one-vs-rest logistic regression on x (BCE with pos_weight = negatives /
   positives per letter; Adam lr 1e-2 decaying exponentially to 1e-5 over 50 epochs, batch 64,
   weight decay 1e-4) on the train words. Its F1 on the test words (logit > 0) says whether
   the model represents a letter at all.
3. Main latents per letter, by k-sparse probing: the same one-vs-rest probe on the SAE's latents
   with an L1 penalty 0.01 * mean_letters sum|w| (batch 4096, weight decay 1e-6); for k = 1..10
   the top-k latents by (signed) weight get a logistic regression of their own (L2, C = 1,
   balanced classes); its test F1 is taken. k grows while each step raises F1 by more than 0.03
   (feature splitting); the main latents are the top-k at the last k that did.
4. Per test word w of letter l that the probe finds (logit_l > 0: the true positives), with u
   the unit probe direction of l, f the latents, a = x . u and proj_i = f_i * (W_dec[i] . u):
   - absorption fraction: M = sum of proj over main latents; T = sum of the (at most 3)
     largest proj among the other latents with cos(W_dec[i], u) >= 0.1 and proj_i > 0.
     0 if M >= a or T < 0.4 a; else 1 if M <= 0; else A / (A + M), A = min(T, a - M).
   - full absorption: every main latent below 1e-8, the latent of largest proj has
     cos >= 0.025 with u, a > 0, and its proj >= 0.4 a.
5. Per letter: mean_absorption_fraction and full_absorption_rate (means over its true
   positives) and the number of main latents. Overall, over the letters whose probe F1 is
   above 0.6 (SAEBench gives no figure when fewer than 20 letters are: NaN here): the mean
   and sample standard deviation of each, SAEBench's `mean_absorption_fraction_score`,
   `mean_full_absorption_score`, `mean_num_split_features` and `std_dev_*`. 0 is no absorption.

Where this differs from SAEBench, and why:
- proj_i uses W_dec[i] . u, where SAEBench uses f_i * cos(W_dec[i], u). They agree for unit-norm
  decoder rows; ours are not unit norm once the training loop folds the input scale into the
  weights, and the projection of what the latent writes is what the criterion compares with a.
- Step 4 reuses the test words' activations from step 1; SAEBench runs them again in a fresh
  prompt with 10 ICL words drawn from the whole vocabulary. Only the random ICL words differ.
- The word's position is found by tokenizing the prompt up to it (not a fixed -6), and a word
  the prompt does not keep as exactly one token is skipped. Words are deduplicated by text.
- The probes start at zero (not nn.Linear's random init) and shuffle with a seeded generator;
  the k-sparse logistic regressions solve sklearn's objective by Newton's method (no sklearn);
  k stops at the first k that fails the jump (SAEBench fits all 10, then reads the same prefix).
- The probes and the latents are computed in float32 on the SAE's device (the k-sparse
  regressions in float64 on CPU); SAEBench keeps the letter probe in bfloat16 on a GPU.

Use: `first_letter_absorption(sae, x, labels)` on activations you already have, or
`lm_absorption(sae, model, tokenizer)` for a causal LM. To score many SAEs of one hook, take
`letter_activations` once and `train_letter_probe` once and pass both to each call.
"""

from __future__ import annotations

import math
import statistics
import string
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # sae_ray.sae imports sae_ray.eval: no import of it here at run time
    from sae_ray.sae.base import SAE

LETTERS = string.ascii_lowercase
EPS = 1e-8
"""A main latent below this has not fired (full absorption)."""


@dataclass
class AbsorptionConfig:
    """Settings of the metric; the defaults are SAEBench's."""

    train_fraction: float = 0.8
    """Share of the words the probes train on; the rest are the test words."""
    probe_epochs: int = 50
    """Epochs of the letter probe on x."""
    probe_batch_size: int = 64
    """Rows per step of the letter probe."""
    probe_lr: float = 1e-2
    """Adam lr of both probes, decayed exponentially per epoch to `end_lr`."""
    end_lr: float = 1e-5
    """Last lr of both probes."""
    probe_weight_decay: float = 1e-4
    """Adam weight decay of the letter probe."""
    sparse_l1: float = 0.01
    """L1 weight of the probe on latents (times the mean over letters of sum |w|)."""
    sparse_epochs: int = 50
    """Epochs of the probe on latents."""
    sparse_batch_size: int = 4096
    """Rows per step of the probe on latents."""
    sparse_weight_decay: float = 1e-6
    """Adam weight decay of the probe on latents."""
    max_k: int = 10
    """Most main latents per letter."""
    f1_jump: float = 0.03
    """One more main latent only if it raises the k-sparse probe's F1 by more than this."""
    full_cos: float = 0.025
    """Full absorption: least cosine of the top projecting latent with the probe."""
    fraction_cos: float = 0.1
    """Absorption fraction: least cosine of a latent with the probe to count as an absorber."""
    proportion: float = 0.4
    """Absorbers must carry at least this share of a = x . u (both figures)."""
    max_absorbers: int = 3
    """Absorption fraction: at most this many absorbing latents per word."""
    min_probe_f1: float = 0.6
    """A letter counts in the overall figures if its probe's test F1 is above this."""
    min_letters: int = 20
    """Fewer counting letters than this: the overall figures are NaN."""
    template: str = "{word} has the first letter:"
    """Prompt line of a word; the ICL lines add " W" (its first letter, upper case)."""
    n_icl: int = 10
    """ICL words (from the same split) before the word."""
    min_length: int = 1
    """Least letters in a word (after its leading space)."""
    prepend_bos: bool = True
    """Put the tokenizer's BOS token first (TransformerLens does, as SAEBench runs it)."""
    llm_batch_size: int = 32
    """Prompts per forward pass."""
    encode_batch_size: int = 4096
    """Rows per SAE encode."""
    max_dense_latents: int = 2**28
    """Keep the train words' latents in memory for the probe on latents when n_train * d_sae is
    at most this; else encode each batch again in every epoch (as SAEBench does by default)."""
    seed: int = 42
    """Seed of the split, the ICL words and the probes' shuffling."""


class LetterProbe(NamedTuple):
    """26 one-vs-rest logistic regressions: logits = x @ weight.T + bias."""

    weight: Tensor
    """[26, d_in]"""
    bias: Tensor
    """[26]"""


@dataclass
class LetterAbsorption:
    """The figures of one letter (SAEBench's result detail, plus what they came from)."""

    first_letter: str
    probe_f1: float
    """F1 of the letter probe on the test words."""
    main_latents: list[int]
    sparse_f1: list[float]
    """Test F1 of the k-sparse probe for k = 1, 2, ... up to the first k that failed the jump."""
    num_probe_true_positives: int
    mean_absorption_fraction: float
    """NaN when the letter has no true positive."""
    full_absorption_rate: float
    num_full_absorption: int
    counted: bool
    """In the overall figures: probe F1 > min_probe_f1 and at least one true positive."""
    rows: list[int] = field(default_factory=list)
    """Index into x of each true positive."""
    absorption_fraction: list[float] = field(default_factory=list)
    """Per true positive."""
    is_full_absorption: list[bool] = field(default_factory=list)
    """Per true positive."""

    @property
    def num_split_features(self) -> int:
        return len(self.main_latents)


@dataclass
class AbsorptionResult:
    """SAEBench's figures (NaN when fewer than `min_letters` letters count) and the letters'."""

    mean_absorption_fraction_score: float
    mean_full_absorption_score: float
    mean_num_split_features: float
    std_dev_absorption_fraction_score: float
    std_dev_full_absorption_score: float
    std_dev_num_split_features: float
    n_letters: int
    """Letters that count."""
    letters: list[LetterAbsorption]

    def summary(self, prefix: str = "absorption/") -> dict[str, float]:
        """The overall figures as {prefix + name: value}, for MLflow or Tune."""
        names = ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
                 "std_dev_absorption_fraction_score", "std_dev_full_absorption_score",
                 "std_dev_num_split_features", "n_letters")
        return {prefix + n: float(getattr(self, n)) for n in names}


# -- the core: activations and labels in, figures out ------------------------


def split_rows(n: int, train_fraction: float = 0.8, seed: int = 42) -> Tensor:
    """[n] bool: a random int(n * train_fraction) rows are True (train)."""
    order = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    train = torch.zeros(n, dtype=torch.bool)
    train[order[: int(n * train_fraction)]] = True
    return train


def _train_one_vs_rest(features, labels: Tensor, dim: int, epochs: int, batch_size: int,
                       weight_decay: float, l1: float, cfg: AbsorptionConfig, device) -> tuple[Tensor, Tensor]:
    """26 logistic regressions at once. features(idx [B]) -> [B, dim] float32 on `device`;
    labels [N] in 0..25. Returns (W [26, dim], b [26])."""
    n = len(labels)
    target = F.one_hot(labels.to(device), 26).float()  # [N, 26]
    positives = target.sum(0)
    pos_weight = (n - positives) / positives.clamp_min(1)
    W = torch.zeros(26, dim, device=device, requires_grad=True)
    b = torch.zeros(26, device=device, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=cfg.probe_lr, weight_decay=weight_decay)
    decay = torch.optim.lr_scheduler.ExponentialLR(opt, (cfg.end_lr / cfg.probe_lr) ** (1 / epochs))
    gen = torch.Generator().manual_seed(cfg.seed)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen).split(batch_size):
            idx = idx.to(device)
            loss = F.binary_cross_entropy_with_logits(features(idx) @ W.T + b, target[idx], pos_weight=pos_weight)
            if l1:
                loss = loss + l1 * W.abs().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        decay.step()
    return W.detach(), b.detach()


def train_letter_probe(x: Tensor, labels: Tensor, cfg: AbsorptionConfig | None = None) -> LetterProbe:
    """The letter probe (step 2) on x [N, d_in] (any device: it trains there) and labels [N]."""
    cfg = cfg or AbsorptionConfig()
    x = x.float()
    W, b = _train_one_vs_rest(lambda idx: x[idx], labels, x.shape[1], cfg.probe_epochs, cfg.probe_batch_size,
                              cfg.probe_weight_decay, 0.0, cfg, x.device)
    return LetterProbe(W, b)


def f1_score(pred: Tensor, truth: Tensor) -> float:
    """pred, truth [N] bool -> F1 of the True class (0 when it has no true positive)."""
    tp = (pred & truth).sum().item()
    return 2 * tp / (pred.sum().item() + truth.sum().item()) if tp else 0.0


def fit_logistic(x: Tensor, y: Tensor, C: float = 1.0, iters: int = 100) -> tuple[Tensor, float]:
    """x [N, k], y [N] bool (both classes present) -> (w [k] float32, b): the minimum of
    0.5 ||w||^2 + C sum_i s_i logloss_i, s_i = N / (2 N_{y_i}), i.e. sklearn's
    LogisticRegression(C=C, class_weight="balanced"), by Newton's method in float64."""
    t = y.double()
    n, n_pos = len(t), t.sum()
    s = C * torch.where(y, n / (2 * n_pos), n / (2 * (n - n_pos)))
    A = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64, device=x.device)], 1)  # [N, k+1]
    reg = torch.ones(A.shape[1], dtype=torch.float64, device=x.device)
    reg[-1] = 0  # the intercept is not penalised
    theta = torch.zeros_like(reg)

    def objective(th: Tensor) -> Tensor:
        z = A @ th
        return (s * (F.softplus(z) - t * z)).sum() + 0.5 * (reg * th * th).sum()

    value = objective(theta)
    for _ in range(iters):
        p = torch.sigmoid(A @ theta)
        grad = A.T @ (s * (p - t)) + reg * theta
        hess = (A * (s * p * (1 - p)).unsqueeze(1)).T @ A + torch.diag(reg + 1e-10)
        step, rate = torch.linalg.solve(hess, grad), 1.0
        while rate > 1e-6 and objective(theta - rate * step) > value:
            rate /= 2
        theta = theta - rate * step
        value = objective(theta)
        if (rate * step).abs().max() < 1e-9:
            break
    return theta[:-1].float(), float(theta[-1])


@torch.no_grad()
def _encode(sae: SAE, x: Tensor, batch_size: int, cols: Tensor | None = None) -> Tensor:
    """x [N, d_in] -> latents [N, d_sae] (or [N, len(cols)]) float32 on the SAE's device."""
    device, dtype = sae.W_enc.device, sae.W_enc.dtype
    out = []
    for xb in x.split(batch_size):
        f = sae.encode(xb.to(device, dtype)).float()
        out.append(f if cols is None else f[:, cols])
    return torch.cat(out)


def select_main_latents(sae: SAE, x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor,
                        cfg: AbsorptionConfig | None = None) -> tuple[list[list[int]], list[list[float]]]:
    """Step 3. x_train [N, d_in], y_train [N], x_test [M, d_in], y_test [M] ->
    (main latents of each of the 26 letters, test F1 of its k-sparse probes for k = 1, 2, ...).
    A letter missing from either split gets no main latent and no F1."""
    cfg = cfg or AbsorptionConfig()
    d_sae, device = sae.cfg.d_sae, sae.W_enc.device
    x_train, y_train, y_test = x_train.to(device), y_train.to(device), y_test.to(device)
    if len(x_train) * d_sae <= cfg.max_dense_latents:
        f_train = _encode(sae, x_train, cfg.encode_batch_size)
        features = lambda idx: f_train[idx]  # noqa: E731
    else:
        features = lambda idx: _encode(sae, x_train[idx], cfg.encode_batch_size)  # noqa: E731
    W, _ = _train_one_vs_rest(features, y_train, d_sae, cfg.sparse_epochs, cfg.sparse_batch_size,
                              cfg.sparse_weight_decay, cfg.sparse_l1, cfg, device)
    top = W.topk(min(cfg.max_k, d_sae), dim=-1).indices  # [26, max_k], largest weight first
    cols = top.unique()  # sorted
    local = torch.searchsorted(cols, top)  # where each top latent sits in cols
    # the small fits run on CPU: a few hundred tiny Newton solves would mostly wait on a GPU
    ftr = _encode(sae, x_train, cfg.encode_batch_size, cols).cpu()  # [N, n_cols]
    fte = _encode(sae, x_test, cfg.encode_batch_size, cols).cpu()  # [M, n_cols]
    top, local, y_train, y_test = top.cpu(), local.cpu(), y_train.cpu(), y_test.cpu()
    mains: list[list[int]] = []
    f1s: list[list[float]] = []
    for letter in range(26):
        main, scores, best = [], [], -math.inf
        y, truth = y_train == letter, y_test == letter
        if y.any() and not y.all() and truth.any():
            for k in range(1, top.shape[1] + 1):
                w, b = fit_logistic(ftr[:, local[letter, :k]], y)
                scores.append(f1_score(fte[:, local[letter, :k]] @ w + b > 0, truth))
                if scores[-1] <= best + cfg.f1_jump:
                    break
                best, main = scores[-1], top[letter, :k].tolist()
        mains.append(main)
        f1s.append(scores)
    return mains, f1s


def absorption_scores(f: Tensor, x: Tensor, direction: Tensor, W_dec: Tensor, main: Tensor,
                      cfg: AbsorptionConfig | None = None) -> tuple[Tensor, Tensor]:
    """Step 4 for n words. f [n, d_sae] latents, x [n, d_in] activations, direction [n, d_in]
    unit probe direction of each word's letter, W_dec [d_sae, d_in], main [n, d_sae] bool (the
    letter's main latents) -> (absorption fraction [n] in [0, 1], full absorption [n] bool)."""
    cfg = cfg or AbsorptionConfig()
    f, x, direction, W_dec = f.float(), x.float(), direction.float(), W_dec.float()
    a = (x * direction).sum(-1)  # [n]
    along = direction @ W_dec.T  # [n, d_sae]: W_dec[i] . u
    cos = along / W_dec.norm(dim=-1).clamp_min(1e-12)
    proj = f * along  # [n, d_sae]
    zero = torch.zeros((), device=f.device)

    main_proj = proj.where(main, zero).sum(-1)
    absorbers = ~main & (cos >= cfg.fraction_cos) & (proj > 0)
    k = min(cfg.max_absorbers, proj.shape[1])
    absorbed = proj.where(absorbers, zero).topk(k, dim=-1).values.sum(-1)  # T: non-absorbers are 0
    carried = torch.minimum(absorbed, a - main_proj)
    partial = (carried / (carried + main_proj)).clamp(0, 1)
    fraction = torch.where(main_proj <= 0, torch.ones_like(a), partial)
    none = (a <= 0) | (main_proj >= a) | (absorbed < cfg.proportion * a)
    fraction = torch.where(none, torch.zeros_like(a), fraction)

    top_proj, top = proj.max(-1)
    silent = ((f < EPS) | ~main).all(-1)
    full = silent & (cos.gather(1, top[:, None])[:, 0] >= cfg.full_cos) & (a > 0) & (top_proj >= cfg.proportion * a)
    return fraction, full


def _mean_sd(values: list[float]) -> tuple[float, float]:
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else math.nan


@torch.no_grad()
def first_letter_absorption(sae: SAE, x: Tensor, labels: Tensor, train: Tensor | None = None,
                            probe: LetterProbe | None = None,
                            cfg: AbsorptionConfig | None = None) -> AbsorptionResult:
    """Steps 2-5 for one SAE (not a stack: score `sae.unstack()` member by member).

    x [N, d_in]: activations at the SAE's hook, one row per word; labels [N]: first letter
    0..25; train [N] bool: the train words (default `split_rows(N, cfg.train_fraction,
    cfg.seed)`); probe: the letter probe (default: trained here on the train rows)."""
    cfg = cfg or AbsorptionConfig()
    if sae.n_stack is not None:
        raise ValueError(f"first_letter_absorption: sae is a stack of {sae.n_stack}; pass its members (sae.unstack())")
    if x.ndim != 2 or x.shape[1] != sae.cfg.d_in or labels.shape != (x.shape[0],):
        raise ValueError(f"first_letter_absorption: x {tuple(x.shape)}, labels {tuple(labels.shape)}; "
                         f"expected x [N, {sae.cfg.d_in}] and labels [N]")
    labels = labels.long().cpu()
    if labels.numel() and (labels.min() < 0 or labels.max() > 25):
        raise ValueError("first_letter_absorption: labels must be first letters 0..25")
    train = split_rows(len(x), cfg.train_fraction, cfg.seed) if train is None else train.bool().cpu()
    if train.shape != labels.shape:
        raise ValueError(f"first_letter_absorption: train {tuple(train.shape)}; expected [N] = {tuple(labels.shape)}")
    was_training = sae.training
    sae.eval()
    try:
        device = sae.W_enc.device
        x_train, y_train = x[train].to(device).float(), labels[train]
        test_rows = torch.nonzero(~train)[:, 0]
        x_test, y_test = x[test_rows].float(), labels[test_rows]
        if probe is None:
            with torch.enable_grad():
                probe = train_letter_probe(x_train, y_train, cfg)
        weight, bias = probe.weight.to(device).float(), probe.bias.to(device).float()
        logits = (x_test.to(device) @ weight.T + bias).cpu()  # [M, 26]
        with torch.enable_grad():
            mains, sparse_f1 = select_main_latents(sae, x_train, y_train, x_test, y_test, cfg)

        # true positives of the probe, scored in batches
        hit = logits.gather(1, y_test[:, None])[:, 0] > 0
        rows = torch.nonzero(hit)[:, 0]
        units = weight / weight.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [26, d_in]
        main_mask = torch.zeros(26, sae.cfg.d_sae, dtype=torch.bool, device=device)
        for letter, main in enumerate(mains):
            main_mask[letter, main] = True
        fraction, full = [], []
        for idx in rows.split(cfg.encode_batch_size):
            xb, yb = x_test[idx].to(device), y_test[idx].to(device)
            fb, ub = _encode(sae, xb, cfg.encode_batch_size), units[yb]
            fr, fu = absorption_scores(fb, xb, ub, sae.W_dec, main_mask[yb], cfg)
            fraction.append(fr.cpu())
            full.append(fu.cpu())
        fraction = torch.cat(fraction) if fraction else torch.zeros(0)
        full = torch.cat(full) if full else torch.zeros(0, dtype=torch.bool)
    finally:
        sae.train(was_training)

    letters = []
    tp_letter = y_test[rows]
    for letter in range(26):
        truth, mine = y_test == letter, tp_letter == letter
        probe_f1 = f1_score(logits[:, letter] > 0, truth)
        n_tp = int(mine.sum())
        fr, fu = fraction[mine], full[mine]
        letters.append(LetterAbsorption(
            first_letter=LETTERS[letter], probe_f1=probe_f1, main_latents=mains[letter],
            sparse_f1=sparse_f1[letter], num_probe_true_positives=n_tp,
            mean_absorption_fraction=fr.mean().item() if n_tp else math.nan,
            full_absorption_rate=fu.float().mean().item() if n_tp else math.nan,
            num_full_absorption=int(fu.sum()), counted=probe_f1 > cfg.min_probe_f1 and n_tp > 0 and bool(mains[letter]),
            rows=test_rows[rows[mine]].tolist(), absorption_fraction=fr.tolist(), is_full_absorption=fu.tolist(),
        ))
    counted = [r for r in letters if r.counted]
    enough = len(counted) >= cfg.min_letters and len(counted) > 0
    means = [_mean_sd([getattr(r, n) for r in counted]) if enough else (math.nan, math.nan)
             for n in ("mean_absorption_fraction", "full_absorption_rate", "num_split_features")]
    return AbsorptionResult(
        mean_absorption_fraction_score=means[0][0], mean_full_absorption_score=means[1][0],
        mean_num_split_features=means[2][0], std_dev_absorption_fraction_score=means[0][1],
        std_dev_full_absorption_score=means[1][1], std_dev_num_split_features=means[2][1],
        n_letters=len(counted), letters=letters,
    )


# -- the adapter: a Hugging Face causal LM and its tokenizer ------------------


@dataclass
class LetterActivations:
    """The words of a tokenizer and their activations at one hook (step 1)."""

    x: Tensor
    """[N, d_in] float32 on CPU: the activation at each word's token."""
    labels: Tensor
    """[N] long: first letter, 0..25."""
    train: Tensor
    """[N] bool: the word is in the train split (its ICL words came from that split)."""
    words: list[str]
    skipped: list[str]
    """Words the prompt did not keep as one token of their own."""


def alpha_words(tokenizer, min_length: int = 1) -> list[str]:
    """The tokens of `tokenizer` that read as ASCII letters only, after at most one leading
    space (SentencePiece's "▁" counts as one), at least `min_length` letters; as text, sorted."""
    words = set()
    for token in tokenizer.get_vocab():
        text = tokenizer.convert_tokens_to_string([token])
        if token.startswith("▁") and not text.startswith(" "):
            text = " " + text  # tokenizers that drop the space of a lone "▁" token (Mistral)
        body = text[1:] if text.startswith(" ") else text
        if len(body) >= min_length and all(c in string.ascii_letters for c in body):
            words.add(text)
    return sorted(words)


def first_letter(word: str) -> int:
    """Label of a word: its first ASCII letter (any case) as 0..25."""
    for c in word:
        if c in string.ascii_letters:
            return LETTERS.index(c.lower())
    raise ValueError(f"first_letter: {word!r} has no ASCII letter")


def first_letter_prompt(word: str, examples: list[str], template: str = AbsorptionConfig.template) -> tuple[str, str]:
    """(text up to and including the word, the whole prompt): a newline, then one line per
    example with its answer (" W"), then the word's line without the answer."""
    before, after = template.split("{word}")
    lines = [template.format(word=e) + " " + LETTERS[first_letter(e)].upper() for e in examples]
    head = "\n" + "".join(line + "\n" for line in lines) + before + word
    return head, head + after


def _prompt_ids(tokenizer, words: list[str], heads: list[str], prompts: list[str],
                bos: int | None) -> list[tuple[list[int], int] | None]:
    """Token ids of each prompt and the position of its word, or None where the tokenizer
    does not keep the word as one token of its own."""
    def ids(texts):
        return tokenizer(texts, add_special_tokens=False)["input_ids"]

    out = []
    for word, pre, head, full in zip(words, ids([h[: len(h) - len(w)] for h, w in zip(heads, words)]),
                                     ids(heads), ids(prompts)):
        if len(head) != len(pre) + 1 or head[:-1] != pre or full[: len(head)] != head:
            out.append(None)
            continue
        start = [] if bos is None else [bos]
        out.append((start + full, len(start) + len(head) - 1))
    return out


@torch.no_grad()
def letter_activations(model, tokenizer, hook: str, cfg: AbsorptionConfig | None = None,
                       words: list[str] | None = None) -> LetterActivations:
    """Step 1: split `words` (default `alpha_words(tokenizer, cfg.min_length)`), prompt each
    with `cfg.n_icl` words of its split and take the activation at `hook` (a
    `blocks.{L}.hook_{site}` name or a module path) at its token. Prompts are right-padded in
    batches of `cfg.llm_batch_size`; a causal model's activations at real tokens do not see the padding."""
    from sae_ray.activations.hooks import capture_activations, resolve_hook  # transformers: only here

    cfg = cfg or AbsorptionConfig()
    words = alpha_words(tokenizer, cfg.min_length) if words is None else list(dict.fromkeys(words))
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(len(words))
    n_train = int(len(words) * cfg.train_fraction)
    splits = [[words[i] for i in order[:n_train]], [words[i] for i in order[n_train:]]]
    items = []  # (word, is_train, head, prompt)
    for is_train, pool in zip((True, False), splits):
        for i, word in enumerate(pool):
            picks = rng.choice(len(pool) - 1, size=min(cfg.n_icl, len(pool) - 1), replace=False)
            examples = [pool[j + (j >= i)] for j in picks]  # every word of the pool but this one
            items.append((word, is_train, *first_letter_prompt(word, examples, cfg.template)))
    bos = tokenizer.bos_token_id if cfg.prepend_bos else None
    pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    target = resolve_hook(model, module=hook)

    xs, kept, skipped = [], [], []
    for start in range(0, len(items), cfg.llm_batch_size):
        batch = items[start: start + cfg.llm_batch_size]
        encoded = _prompt_ids(tokenizer, [b[0] for b in batch], [b[2] for b in batch], [b[3] for b in batch], bos)
        good = [(item, e) for item, e in zip(batch, encoded) if e is not None]
        skipped += [item[0] for item, e in zip(batch, encoded) if e is None]
        if not good:
            continue
        width = max(len(e[0]) for _, e in good)
        input_ids = torch.full((len(good), width), pad, dtype=torch.long)
        mask = torch.zeros(len(good), width, dtype=torch.long)
        for row, (_, (ids, _)) in enumerate(good):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        acts = capture_activations(model, [target], input_ids, mask)[target.name]  # [B, T, d]
        positions = torch.tensor([e[1] for _, e in good], device=acts.device)
        xs.append(acts[torch.arange(len(good), device=acts.device), positions].float().cpu())
        kept += [item for item, _ in good]
    d = xs[0].shape[1] if xs else 0
    return LetterActivations(
        x=torch.cat(xs) if xs else torch.zeros(0, d),
        labels=torch.tensor([first_letter(w) for w, *_ in kept], dtype=torch.long),
        train=torch.tensor([t for _, t, *_ in kept], dtype=torch.bool),
        words=[w for w, *_ in kept], skipped=skipped,
    )


def lm_absorption(sae: SAE, model, tokenizer, hook: str | None = None,
                  cfg: AbsorptionConfig | None = None) -> AbsorptionResult:
    """Steps 1-5 for one SAE on a causal LM, at `hook` (default `sae.cfg.hook_name`)."""
    cfg = cfg or AbsorptionConfig()
    hook = hook or sae.cfg.hook_name
    if not hook:
        raise ValueError("lm_absorption: the SAE's cfg.hook_name is empty; pass hook='blocks.L.hook_resid_post'")
    data = letter_activations(model, tokenizer, hook, cfg)
    return first_letter_absorption(sae, data.x, data.labels, data.train, cfg=cfg)
