"""The training loop: one SAE or a stack of K, batches from any iterator. Knows nothing of Ray or MLflow.

Callers pass `on_log(step, metrics)` to forward metrics wherever they go (Tune, MLflow,
a notebook's print); `metrics` holds one dict per member still training (a list of one for a
single SAE), each naming its member by its original index under "member". The quality monitor
(`train.monitor`, `sae_ray.train.monitor`) may stop members; the others train on.

`batches` may also be a tensor [N, d_in] (a notebook's activations): `tensor_batches` shuffles it
per epoch and cuts it into `train.batch_size` rows. The trained SAE comes back in eval mode.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sae_ray.config import TrainConfig
from sae_ray.eval.metrics import dead_fraction, fvu, l0
from sae_ray.sae import SAE, SAEOutput
from sae_ray.train.init import MEDIAN_ROWS, expected_norm_scale, first_rows, init_b_dec
from sae_ray.train.monitor import STOPPED, Monitor, keep_members, nonfinite_weights
from sae_ray.train.optim import Adam, clip_grad_norm_, lr_factor, sparsity_factor
from sae_ray.train.target import L0Controller, RowReservoir


@dataclass
class TrainState:
    """Where training ended. Lists "per member" have one entry per member of the SAE passed in,
    by its original index (one entry for a single SAE), stopped members included."""

    step: int = 0
    """Optimizer steps taken."""
    tokens_seen: int = 0
    """Rows the loop has trained on (what the longest-trained member saw)."""
    seconds: float = 0.0
    """Wall time spent in the loop (including waiting for batches)."""
    dead_fraction: list[float] = field(default_factory=list)
    """Per member: fraction of latents that had not fired for `train.dead_tokens` tokens when
    training ended (for a stopped member: when it was stopped)."""
    input_scale: float = 1.0
    """s: the SAE trained on x*s; s is folded into the returned SAE, which takes raw x."""
    output_scale: float = 1.0
    """s_out: a transcoder trained against targets x_out*s_out (folded in too, so it returns raw
    output-space activations); s itself for an SAE, whose target is its input."""
    verdicts: list[str] = field(default_factory=list)
    """Per member: the monitor's verdict, "ok", "warn" or "stopped"."""
    reasons: list[list[str]] = field(default_factory=list)
    """Per member: why it was flagged or stopped, e.g. "dense: L0 0.31·d_sae at 40,960 tokens"."""
    member_tokens: list[int] = field(default_factory=list)
    """Per member: rows it was trained on (tokens_seen, or fewer for a stopped member)."""
    sae: SAE | None = None
    """The trained SAE, taking raw x: the SAE passed in when no member was stopped; else a new
    stack of the survivors (a stack of 1 if one is left), or None when every member was stopped."""
    members: list[int] = field(default_factory=list)
    """The original index of each member of `sae`, in order ([0] for a single SAE; [] for None)."""
    coefficients: list[float | None] = field(default_factory=list)
    """Per member: its sparsity coefficient at the end (the L0 controller's last λ for a
    target-L0 member of a coefficient architecture); None for the k architectures."""
    data_ran_out_at: int | None = None
    """Tokens seen when `batches` ended before `train.total_tokens` (a warning said so: the lr
    and sparsity schedules had been laid out for the whole budget, so the run stopped short of
    their end); None when the budget was reached (or the monitor stopped every member)."""


def train_sae(
    sae: SAE,
    batches: Iterator[Tensor],
    train: TrainConfig,
    on_log: Callable[[int, list[dict[str, float]]], None] | None = None,
    lrs: list[float] | None = None,
    targets: list[float | None] | None = None,
    on_checkpoint: Callable[[dict[str, Any], dict[str, Tensor]], None] | None = None,
    resume: tuple[dict[str, Any], dict[str, Tensor]] | None = None,
    epochs: int | None = None,
) -> TrainState:
    """Train `sae` (one SAE, or a stack of K sharing each batch) until `train.total_tokens` rows
    have been seen; one optimizer step per batch. Returns a TrainState; the trained SAE is
    `state.sae` (`sae` itself, trained in place, unless the monitor stopped a member).

    batches: yields float tensors x [B, d_in], on any device (moved to the SAE's); or a tensor
    x [N, d_in], read as `tensor_batches(x, train.batch_size, train.seed, epochs)`: a fresh
    permutation of the rows every epoch, the epochs one stream cut into batches of
    train.batch_size rows, for as many epochs as train.total_tokens takes (at most `epochs`).
    epochs: tensor input only; None: as many as the budget takes.
    A transcoder (`sae.cfg.d_out` set) needs pairs instead: `batches` yields tuples (x_in [B, d_in],
    x_out [B, d_out]), the activation it reads and the one it reconstructs, row for row.
    lrs: a learning rate per stack member (default: train.lr for each).
    targets: a target L0 per stack member (None: none). For a coefficient architecture
    (ReLU+L1, Gated, JumpReLU) the L0 controller (`train.l0_control`, `sae_ray.train.target`)
    then moves each targeted member's coefficient after every step of the control span from
    its value in the member's config; the k architectures take k = target in their config and
    ignore this.
    on_checkpoint(state, tensors): called every `train.checkpoint_every` tokens (not at the end)
    with the loop's whole state, as `sae_ray.train.checkpoint.save_checkpoint` takes it.
    resume: such a (state, tensors) pair; `sae` must then be built from the same configs as the
    SAE that was checkpointed, and `batches` must yield what the checkpointed loop would have read
    next (a BufferReader given the reader's state of that moment). The init batches are not read
    again; the run goes on at the checkpoint's step and ends at `train.total_tokens` as before.

    Before the first step, the first `train.init_batches` batches give the input scale
    s = sqrt(d_in / E||x||^2) ("expected_norm"; 1 with "none") and b_dec (`train.b_dec_init`,
    the same for every member); they are then trained on like the rest. The SAE trains on x*s,
    and at the end s is folded into its weights (`sae.fold_input_scale`), so the returned SAE
    takes raw activations. A transcoder: s from x_in; s_out = sqrt(d_out / E||x_out||^2) and
    b_dec from x_out (b_dec is output-space); it trains on x_in*s against x_out*s_out, and both
    are folded (`sae.fold_input_scale(s, s_out)`), so it returns raw output-space activations.
    Schedules count steps of a run of ceil(total_tokens / B) steps, B the first batch's rows
    (see `optim.lr_factor`, `optim.sparsity_factor`). If `batches` ends before total_tokens,
    the run ends there: a RuntimeWarning says so and `state.data_ran_out_at`
    records the tokens seen (the schedules were laid out for the whole budget, so the lr never
    decayed as planned).

    `sae.dead_tokens` is set to `train.dead_tokens`: the latents the dead-latent losses (AuxK,
    JumpReLU's pre-activation loss) treat as dead are the ones counted in dead_fraction.

    Each step: scale the batch (x*s, and a transcoder's x_out*s_out); set the lr and
    `sae.sparsity_scale`; forward (`sae(x)`, a transcoder's `sae(x_in, x_out)`; bf16 autocast
    per `train.autocast`); backward of the summed member losses (members are independent, so
    each gets its own gradient); `sae.pre_step()`; clip to `train.grad_clip_norm` (per member); Adam step
    (betas: `train.adam_betas`, else `sae.adam_betas`); `sae.post_step()`; with targets, the batch
    joins the controller's reservoir (a uniform sample of the rows trained on), and in the control
    span the L0 controller sets the targeted members' coefficients from the reservoir's L0,
    measured every `l0_control.measure_every` steps. `pre_step` runs before
    clipping: it removes the gradient component that a decoder-norm constraint would undo, so
    the clipped norm is the norm of the update that is actually applied (as dictionary_learning
    and SAELens order them).

    Every `train.log_every` steps and at the end (a log step): the metrics of each member; the
    monitor (`train.monitor`, `sae_ray.train.monitor.Monitor`) judges each member from them and
    from its weights (NaN/inf); on_log(step, metrics); then the members it stopped are taken out:
    the stack is rebuilt from the survivors, and Adam goes on with their moments and step counts
    (`monitor.keep_members`), so the survivors train exactly as before and the stopped ones cost
    nothing more. Training ends when no member is left (a single SAE that is stopped ends it).

    on_log(step, metrics): `metrics` is a list with one dict per member still training, in the
    order of the current stack; each dict's "member" is that member's original index (its
    position in the SAE passed in, 0 for a single SAE; key by it, not by list position). The log
    step that stops a member still carries its dict (the figures that stopped it); later ones do
    not. Each dict has member, loss, mse (summed squared error per row, in the units of x*s;
    a transcoder's: against x_out*s_out), fvu (of the batch, against the target; scale-free),
    l0, dead_fraction (latents silent for `train.dead_tokens` tokens, from `sae.tokens_since_fired`), `<name>_loss` for each aux term (units of x*s), lr,
    sparsity_scale, tokens, tokens_per_s, and coefficient (the sparsity coefficient now) for a
    coefficient architecture.

    At the end: sparsity_scale back to 1, s (a transcoder's s_out too) folded into the weights,
    the SAE in eval mode (`sae.eval()`: BatchTopK and Matryoshka then encode each row with their
    threshold θ, not with a top-k over the batch; every architecture stops counting firings),
    and, if the batches ended before total_tokens, the RuntimeWarning and `state.data_ran_out_at`.
    """
    device = next(sae.parameters()).device
    n_stack = sae.n_stack
    n = n_stack or 1
    lrs = [float(train.lr)] * n if lrs is None else [float(v) for v in lrs]
    if len(lrs) != n:
        raise ValueError(f"lrs: {len(lrs)} learning rates for {n} SAE(s); give one per stack member")
    betas = train.adam_betas or sae.adam_betas
    bf16 = train.autocast == "bf16" or (train.autocast == "auto" and device.type == "cuda")
    monitor = Monitor(train.monitor, n, sae.cfg.d_sae, train.total_tokens)
    members = list(range(n))  # the original index of each member of the stack being trained
    coefficient_arch = sae.sparsity_param != "k"
    targets = [None] * n if targets is None or not coefficient_arch else list(targets)
    if len(targets) != n:
        raise ValueError(f"targets: {len(targets)} target L0s for {n} SAE(s); give one per stack member")

    state = TrainState(dead_fraction=[0.0] * n, member_tokens=[0] * n)
    start = time.perf_counter()
    batches = _batch_source(batches, train, epochs, sae.cfg.d_in)
    if resume is None:
        first = _take(batches, train.init_batches, train.total_tokens)
        inputs, outputs = _unzip(first, sae)  # outputs: what it reconstructs (the inputs, for an SAE)
        expected = train.normalize_activations == "expected_norm"
        scale = expected_norm_scale(inputs) if expected else 1.0
        scale_out = scale if outputs is inputs else (expected_norm_scale(outputs) if expected else 1.0)
        init_b_dec(sae, first_rows(outputs, MEDIAN_ROWS).to(device).float() * scale_out, train.b_dec_init)
        total_steps = math.ceil(train.total_tokens / inputs[0].shape[0])
    else:
        first, (meta, tensors) = [], resume
        scale, total_steps, members = meta["input_scale"], meta["total_steps"], list(meta["members"])
        scale_out = meta.get("output_scale", scale)
        if members != list(range(n)):  # the monitor had stopped some: rebuild the survivors' stack
            with torch.random.fork_rng(devices=[]):
                sae = type(sae).stack([sae.unstack()[i] for i in members])
            lrs, targets = [lrs[i] for i in members], [targets[i] for i in members]
    state.input_scale, state.output_scale = scale, scale_out
    prior_seconds = 0.0 if resume is None else float(meta["seconds"])
    control = L0Controller(targets, [getattr(c, sae.sparsity_param) if coefficient_arch else 1.0 for c in sae.cfgs],
                           start_step=round(train.sparsity_warmup_fraction * total_steps),
                           stop_step=total_steps - round(train.l0_control.freeze_fraction * total_steps),
                           gain=train.l0_control.gain, trend_steps=train.l0_control.trend_steps)
    reservoir = RowReservoir(train.l0_control.reservoir_rows, seed=train.seed) \
        if any(t is not None for t in targets) else None  # what the controller measures L0 on
    n_stack, same_lr = sae.n_stack, len(set(lrs)) == 1
    opt = Adam(sae.parameters(), lr=lrs[0] if same_lr else lrs, betas=betas, n_stack=n_stack)
    if resume is not None:
        _restore(meta, tensors, sae, opt, state, monitor, control, reservoir)
        if coefficient_arch:
            sae.set_coefficients([state.coefficients[k] for k in members])
    every = train.checkpoint_every or math.ceil(train.total_tokens / 5)

    sae.train()
    sae.dead_tokens = train.dead_tokens
    last_tokens, last_time = 0, start
    watch = on_log is not None or train.monitor.enabled  # metrics are computed only at log steps
    done = False
    for batch in _replay(first, batches):
        x, y = _split(batch, sae)  # y: a transcoder's target; None for an SAE (its target is x)
        x = x.to(device, non_blocking=True).float()
        if scale != 1.0:
            x = x * scale
        if y is not None:
            y = y.to(device, non_blocking=True).float()
            if scale_out != 1.0:
                y = y * scale_out
        lr_now = lr_factor(state.step, total_steps, train)
        opt.lr = lrs[0] * lr_now if same_lr else [lr * lr_now for lr in lrs]
        sae.sparsity_scale = sparsity_factor(state.step, total_steps, train)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = sae(x, y)
        opt.zero_grad()
        out.loss.sum().backward()
        sae.pre_step()
        if train.grad_clip_norm > 0:
            clip_grad_norm_(opt.params, train.grad_clip_norm, n_stack)
        opt.step()
        sae.post_step()
        if reservoir is not None:
            reservoir.add(x)
        if control.active(state.step):
            if not control.measured or state.step % train.l0_control.measure_every == 0:
                control.measured = _l0_of(sae, reservoir.rows)
            sae.set_coefficients(control.update(state.step, control.measured))
        state.step += 1
        state.tokens_seen += x.shape[0]
        done = state.tokens_seen >= train.total_tokens
        if watch and (state.step % train.log_every == 0 or done):
            now = time.perf_counter()
            per_s = (state.tokens_seen - last_tokens) / max(now - last_time, 1e-9)
            extra = {"sparsity_scale": sae.sparsity_scale, "tokens": float(state.tokens_seen), "tokens_per_s": per_s}
            metrics = _metrics(sae, out, x if y is None else y, [lr * lr_now for lr in lrs], extra, members)
            if coefficient_arch:
                for m, c in zip(metrics, sae.cfgs):
                    m["coefficient"] = getattr(c, sae.sparsity_param)
            bad = nonfinite_weights(sae) if train.monitor.enabled else [[]] * len(members)
            stop = [i for i, m in enumerate(metrics) if monitor.check(m, bad[i], last=done) == STOPPED]
            if on_log is not None:
                on_log(state.step, metrics)
            last_tokens, last_time = state.tokens_seen, now
            for i in stop:
                state.member_tokens[members[i]] = state.tokens_seen
                state.dead_fraction[members[i]] = metrics[i]["dead_fraction"]
            if stop:
                state.coefficients = _coefficients(sae, members, state.coefficients, n)
            keep = [i for i in range(len(members)) if i not in stop]
            if not keep:
                sae, members = None, []
                break
            if stop:
                sae, opt = keep_members(sae, opt, keep)
                control.keep(keep)
                members, lrs = [members[i] for i in keep], [lrs[i] for i in keep]
                n_stack, same_lr = sae.n_stack, len(set(lrs)) == 1
        if on_checkpoint is not None and not done and state.step >= train.init_batches \
                and state.tokens_seen // every > (state.tokens_seen - x.shape[0]) // every:
            state.coefficients = _coefficients(sae, members, state.coefficients, n)
            state.seconds = prior_seconds + time.perf_counter() - start
            on_checkpoint(*_checkpoint(sae, opt, state, monitor, control, reservoir, members, total_steps))
        if done:
            break

    if sae is not None:
        sae.sparsity_scale = 1.0
        if scale != 1.0 or scale_out != 1.0:
            sae.fold_input_scale(scale, scale_out)
        dead = dead_fraction(sae.tokens_since_fired, sae.dead_tokens).reshape(-1).tolist()
        for k, d in zip(members, dead):
            state.dead_fraction[k], state.member_tokens[k] = d, state.tokens_seen
    if sae is not None:
        state.coefficients = _coefficients(sae, members, state.coefficients, n)
        sae.eval()
        if not done:  # the batches ended before the budget
            state.data_ran_out_at = state.tokens_seen
            warnings.warn(
                f"train_sae: the data ran out at {state.tokens_seen:,} of train.total_tokens="
                f"{train.total_tokens:,} tokens (step {state.step:,} of {total_steps:,}); the lr and "
                "sparsity schedules were laid out for the whole budget, so the lr never finished its "
                "decay. Give more data (for a tensor: more epochs) or a smaller total_tokens.",
                RuntimeWarning, stacklevel=2)
    state.seconds = prior_seconds + time.perf_counter() - start
    state.sae, state.members = sae, members
    state.verdicts, state.reasons = monitor.verdicts, monitor.reasons
    return state


def _checkpoint(sae: SAE, opt: Adam, state: TrainState, monitor: Monitor, control: L0Controller,
                reservoir: RowReservoir | None, members: list[int], total_steps: int) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The loop's whole state: (plain JSON, tensors) for `sae_ray.train.checkpoint`."""
    meta = {"step": state.step, "tokens_seen": state.tokens_seen, "total_steps": total_steps,
            "input_scale": state.input_scale, "output_scale": state.output_scale, "members": list(members), "member_tokens": list(state.member_tokens),
            "dead_fraction": list(state.dead_fraction), "coefficients": list(state.coefficients),
            "seconds": state.seconds, "opt_steps": list(opt.steps),
            "monitor": monitor.state_dict(), "control": control.state_dict()}
    tensors = {f"sae.{k}": v for k, v in sae.state_dict().items()}
    tensors["sae.tokens_since_fired"] = sae.tokens_since_fired
    for i, (m, v) in enumerate(zip(opt.exp_avg, opt.exp_avg_sq)):
        tensors[f"opt.exp_avg.{i}"], tensors[f"opt.exp_avg_sq.{i}"] = m, v
    if reservoir is not None:
        meta["reservoir"], more = reservoir.state_dict()
        tensors.update({f"reservoir.{k}": v for k, v in more.items()})
    return meta, tensors


@torch.no_grad()
def _restore(meta: dict[str, Any], tensors: dict[str, Tensor], sae: SAE, opt: Adam, state: TrainState,
             monitor: Monitor, control: L0Controller, reservoir: RowReservoir | None) -> None:
    """Inverse of `_checkpoint`, into a loop whose `sae` already holds the checkpointed members."""
    device = next(sae.parameters()).device
    sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.") and k != "sae.tokens_since_fired"})
    sae.tokens_since_fired.copy_(tensors["sae.tokens_since_fired"])
    n = len(opt.params)
    opt.load_state_dict({"steps": meta["opt_steps"],
                         "exp_avg": [tensors[f"opt.exp_avg.{i}"].to(device) for i in range(n)],
                         "exp_avg_sq": [tensors[f"opt.exp_avg_sq.{i}"].to(device) for i in range(n)]})
    state.step, state.tokens_seen = meta["step"], meta["tokens_seen"]
    state.member_tokens, state.dead_fraction = list(meta["member_tokens"]), list(meta["dead_fraction"])
    state.coefficients = list(meta["coefficients"])
    monitor.load_state_dict(meta["monitor"])
    control.load_state_dict(meta["control"])
    if reservoir is not None and "reservoir" in meta:
        reservoir.load_state_dict(meta["reservoir"], {k[10:]: v for k, v in tensors.items() if k.startswith("reservoir.")})


@torch.no_grad()
def _l0_of(sae: SAE, x: Tensor, chunk: int = 1024) -> list[float]:
    """x [N, d_in] (scaled) -> per member of `sae`, the mean number of active latents per row."""
    total = None
    for part in x.split(chunk):
        count = (sae.encode(part) > 0).sum(dim=(-2, -1)).reshape(-1).double()
        total = count if total is None else total + count
    return (total / len(x)).tolist()


def _coefficients(sae: SAE, members: list[int], known: list[float | None], n: int) -> list[float | None]:
    """Per original member: its sparsity coefficient in `sae` (members: their original indices),
    else what `known` had (None for the k architectures)."""
    out = list(known) or [None] * n
    if sae.sparsity_param != "k":
        for k, c in zip(members, sae.cfgs):
            out[k] = getattr(c, sae.sparsity_param)
    return out


def tensor_batches(x: Tensor, batch_size: int, seed: int = 0, epochs: int | None = None) -> Iterator[Tensor]:
    """x [N, d_in] -> batches [batch_size, d_in] of its rows: each epoch a fresh permutation
    (a torch.Generator seeded with `seed`), the epochs one stream cut into batches, so a batch
    may hold the end of one epoch and the start of the next. Endless with epochs None; else the
    stream ends after `epochs` passes (its last batch may be smaller)."""
    gen = torch.Generator().manual_seed(seed)
    carry = torch.empty(0, dtype=torch.long)
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.cat([carry, torch.randperm(len(x), generator=gen)])
        epoch += 1
        last = epochs is not None and epoch == epochs
        whole = len(order) if last else len(order) - len(order) % batch_size
        for start in range(0, whole, batch_size):
            yield x[order[start:start + batch_size].to(x.device)]
        carry = order[whole:]


def _batch_source(batches: Iterator[Tensor] | Tensor, train: TrainConfig, epochs: int | None,
                  d_in: int) -> Iterator[Tensor]:
    """`batches` as an iterator: a tensor [N, d_in] through `tensor_batches`, anything else as is."""
    if not isinstance(batches, Tensor):
        if epochs is not None:
            raise ValueError(f"train_sae: epochs={epochs!r} is for a tensor of rows; `batches` is an iterator "
                             "(it ends when it ends): pass the tensor itself, or epochs=None")
        return iter(batches)
    if batches.dim() != 2 or batches.shape[0] == 0 or batches.shape[1] != d_in:
        raise ValueError(f"train_sae: batches is a tensor of shape {tuple(batches.shape)}; expected rows "
                         f"[N >= 1, d_in={d_in}] (the SAE's d_in)")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1):
        raise ValueError(f"train_sae: epochs={epochs!r}; expected a whole number >= 1, or None (as many as "
                         "train.total_tokens takes)")
    return tensor_batches(batches, train.batch_size, train.seed, epochs)


def _take(batches: Iterator[Tensor], n: int, max_rows: int) -> list[Tensor]:
    """Up to n batches, fewer if they already hold max_rows rows."""
    out, rows = [], 0
    for x in batches:
        out.append(x)
        rows += (x[0] if isinstance(x, (tuple, list)) else x).shape[0]
        if len(out) >= n or rows >= max_rows:
            break
    if not out:
        raise ValueError("train_sae: `batches` yielded no batch")
    return out


def _split(batch: Tensor | tuple[Tensor, Tensor], sae: SAE) -> tuple[Tensor, Tensor | None]:
    """One batch as (x [B, d_in], target [B, d_out] or None): a transcoder's batches are pairs
    (x_in, x_out); an SAE's are tensors x, its own target (None). ValueError naming what is wrong."""
    cfg = sae.cfg
    pair = isinstance(batch, (tuple, list))
    if not pair and cfg.is_transcoder:
        raise ValueError(
            f"train_sae: a transcoder (SAEConfig.d_out={cfg.d_out}) trains on pairs (x_in [B, d_in], "
            f"x_out [B, d_out]); `batches` yielded a {type(batch).__name__}"
            + (f" of shape {list(batch.shape)}" if isinstance(batch, Tensor) else ""))
    if pair and not cfg.is_transcoder:
        raise ValueError(
            f"train_sae: `batches` yielded a {type(batch).__name__} of {len(batch)}, but this SAE "
            "(SAEConfig.d_out None) reconstructs its input: it takes tensors x [B, d_in]; pairs "
            "(x_in, x_out) are for a transcoder (set SAEConfig.d_out)")
    if pair and (len(batch) != 2 or not all(isinstance(t, Tensor) for t in batch)):
        raise ValueError(f"train_sae: a transcoder's batch is a pair of tensors (x_in, x_out); got a "
                         f"{type(batch).__name__} of {len(batch)}: {[type(t).__name__ for t in batch]}")
    x, y = batch if pair else (batch, None)
    if x.dim() != 2 or x.shape[1] != cfg.d_in:
        raise ValueError(f"train_sae: a batch's x has shape {list(x.shape)}; expected [B, d_in={cfg.d_in}]")
    if y is not None and (y.dim() != 2 or y.shape[1] != cfg.d_out or y.shape[0] != x.shape[0]):
        raise ValueError(f"train_sae: a batch's x_out has shape {list(y.shape)}; expected "
                         f"[B={x.shape[0]}, d_out={cfg.d_out}], one row per row of x_in")
    return x, y


def _unzip(first: list, sae: SAE) -> tuple[list[Tensor], list[Tensor]]:
    """The init batches as (inputs, outputs): the x_in and x_out of a transcoder's pairs; for an SAE
    the same list twice (its target is its input)."""
    pairs = [_split(b, sae) for b in first]
    inputs = [x for x, _ in pairs]
    return (inputs, inputs) if not sae.cfg.is_transcoder else (inputs, [y for _, y in pairs])


def _replay(first: list[Tensor], rest: Iterator[Tensor]) -> Iterator[Tensor]:
    """The batches already read, then the rest; each read batch is let go once yielded."""
    first.reverse()
    while first:
        yield first.pop()
    yield from rest


@torch.no_grad()
def _metrics(sae: SAE, out: SAEOutput, x: Tensor, lrs: list[float], extra: dict[str, float],
             members: list[int]) -> list[dict[str, float]]:
    """One dict per member, "member" its original index. x [B, d_out]: the target, scaled (x itself
    for an SAE); out.x_hat [B, d_out] or [K, B, d_out]."""
    named = {"loss": out.loss, "mse": out.mse, "fvu": fvu(x, out.x_hat), "l0": l0(out.feature_acts),
             "dead_fraction": dead_fraction(sae.tokens_since_fired, sae.dead_tokens)}
    named.update({f"{k}_loss": v for k, v in out.aux.items()})
    n = len(lrs)
    rows = torch.stack([torch.as_tensor(v, device=x.device).float().reshape(n) for v in named.values()]).T.tolist()
    return [{"member": k, **dict(zip(named, row)), "lr": lr, **extra} for k, row, lr in zip(members, rows, lrs)]

