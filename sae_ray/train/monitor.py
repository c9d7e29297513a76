"""The live quality monitor: a verdict on every member of a stack at each log step. Knows nothing of Ray or MLflow.

The training loop hands `Monitor.check` each member's metrics dict at each log step; a member
whose verdict becomes "stopped" is taken out of the stack (`keep_members`), so it costs no more
compute, and the others train on. The checks (`train.monitor`, `MonitorConfig`; "the warmup" is
`warmup_fraction` of train.total_tokens; "full penalty" is sparsity_scale 1, i.e. after
train.sparsity_warmup_fraction):

  nan    the loss or a weight holds NaN/inf                                  stop, at once
  dense  after the warmup, at full penalty: L0 > max_l0_fraction * d_sae at every
         log step for a warmup's worth of tokens, and no lower at its end than
         at its start (not falling)                                           stop
         L0 > warn_l0_fraction * d_sae, or > max_l0_fraction at the end       warn
  fvu    after the warmup: FVU >= 1 (no better than the batch mean) at every
         log step for a warmup's worth of tokens, and no lower at its end
         than at its start (not falling)                                      stop
         FVU >= 1 at the last log step                                        warn
  dead   after the warmup: dead_fraction > max_dead_fraction                 warn

Why "not falling": an L1-penalised SAE passes through a dense phase; a good one (tests:
L0 0.7 -> 0.08 of d_sae over a run) is above 0.2 * d_sae for half of it, while one whose penalty
is far too weak gets denser. The same for FVU: a transcoder starts well above 1 (its output is a
different activation from its input, so no tied start helps) and may still be above 1, falling
(SmolLM2 layer 15: 1.42 -> 1.02 over 20k tokens), when a warmup's worth has passed. Stops need
evidence over time, so a run whose only log step is its last (short tests) is never stopped for
density or FVU, only flagged.

A stop is final. A "dense" or "dead" warning holds while its condition does: a later log step
below the level (for dense: at full penalty) clears it, and the verdict goes back to "ok" when
no reason is left, so the verdict describes the SAE as it ended (an L1 SAE's dense phase early in
the run is normal, and a target-L0 SAE passes through one while its coefficient climbs). Each
reason is one line naming the check, the figure and the tokens seen, e.g. "dense: L0 0.31·d_sae
at 40,960 tokens (...)"; a warning keeps the figure of the last time its check fired, a stop is
recorded once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from sae_ray.config.sections import MonitorConfig
from sae_ray.sae import SAE
from sae_ray.train.optim import Adam

OK, WARN, STOPPED = "ok", "warn", "stopped"


class Monitor:
    """Verdicts ("ok" | "warn" | "stopped") and reasons for members 0..n_members-1 (original indices).

    cfg: `train.monitor`; d_sae: latents per member; total_tokens: `train.total_tokens` (the
    warmup is `cfg.warmup_fraction` of it). With `cfg.enabled` False every verdict stays "ok".
    """

    def __init__(self, cfg: MonitorConfig, n_members: int, d_sae: int, total_tokens: int):
        self.cfg = cfg
        self.d_sae = d_sae
        self.warmup_tokens = cfg.warmup_fraction * total_tokens
        self.verdicts: list[str] = [OK] * n_members
        """Per original member: "ok", "warn" or "stopped"."""
        self.reasons: list[list[str]] = [[] for _ in range(n_members)]
        """Per original member: why it was flagged or stopped, in the order the checks fired."""
        self._dense_since: list[tuple[int, float] | None] = [None] * n_members  # (tokens, L0 / d_sae) when it became dense
        self._fvu_since: list[tuple[int, float] | None] = [None] * n_members  # (tokens, FVU) when FVU became >= 1

    def check(self, metrics: dict[str, float], bad_weights: Sequence[str] = (), last: bool = False) -> str:
        """Judge one member at a log step; returns its verdict.

        metrics: its dict from the loop: member (original index), tokens, loss, l0, fvu,
        dead_fraction, sparsity_scale. bad_weights: names of its parameters that hold NaN/inf
        (`nonfinite_weights`). last: this is the run's last log step. A stopped member is not
        judged again.
        """
        k = int(metrics["member"])
        if not self.cfg.enabled or self.verdicts[k] == STOPPED:
            return self.verdicts[k]
        cfg, tokens = self.cfg, int(metrics["tokens"])
        at = f"at {tokens:,} tokens"
        if not math.isfinite(metrics["loss"]):
            return self._stop(k, f"nan: loss is {metrics['loss']} {at}")
        if bad_weights:
            return self._stop(k, f"nan: {', '.join(bad_weights)} not finite {at}")
        l0, full = metrics["l0"] / self.d_sae, metrics["sparsity_scale"] >= 1.0
        if tokens < self.warmup_tokens:
            return self.verdicts[k]
        if full and l0 > cfg.max_l0_fraction:
            since = self._dense_since[k] = self._dense_since[k] or (tokens, l0)
            if tokens - since[0] >= self.warmup_tokens and l0 >= since[1]:
                return self._stop(k, f"dense: L0 {l0:.2f}·d_sae {at} (above {cfg.max_l0_fraction:g} and not falling)")
            if last:
                self._warn(k, "", f"dense: L0 {l0:.2f}·d_sae {at}, the end (above {cfg.max_l0_fraction:g})")
        else:
            self._dense_since[k] = None
        if full and l0 > cfg.warn_l0_fraction:
            self._warn(k, "dense", f"dense: L0 {l0:.2f}·d_sae {at} (warn above {cfg.warn_l0_fraction:g})")
        elif full:
            self._clear(k, "dense")
        if metrics["fvu"] >= 1.0:
            since = self._fvu_since[k] = self._fvu_since[k] or (tokens, metrics["fvu"])
            if tokens - since[0] >= self.warmup_tokens and metrics["fvu"] >= since[1]:
                return self._stop(k, f"fvu: {metrics['fvu']:.2f} >= 1 after warmup {at} (not falling)")
            if last:
                self._warn(k, "", f"fvu: {metrics['fvu']:.2f} >= 1 {at}, the end")
        else:
            self._fvu_since[k] = None
        if metrics["dead_fraction"] > cfg.max_dead_fraction:
            self._warn(k, "dead", f"dead: {metrics['dead_fraction']:.2f} of latents dead {at}")
        else:
            self._clear(k, "dead")
        return self.verdicts[k]

    def state_dict(self) -> dict:
        """Plain JSON: what a checkpoint keeps."""
        return {"verdicts": list(self.verdicts), "reasons": [list(r) for r in self.reasons],
                "dense_since": [list(d) if d else None for d in self._dense_since],
                "fvu_since": [list(d) if d else None for d in self._fvu_since]}

    def load_state_dict(self, state: dict) -> None:
        self.verdicts = list(state["verdicts"])
        self.reasons = [list(r) for r in state["reasons"]]
        self._dense_since = [(int(d[0]), float(d[1])) if d else None for d in state["dense_since"]]
        self._fvu_since = [(int(d[0]), float(d[1])) if d else None for d in state["fvu_since"]]

    def _stop(self, k: int, reason: str) -> str:
        self.verdicts[k] = STOPPED
        self.reasons[k].append(reason)
        return STOPPED

    def _clear(self, k: int, kind: str) -> None:
        """Member k no longer shows `kind`: its warning goes, and with no reason left it is "ok" again."""
        self.reasons[k] = [r for r in self.reasons[k] if not r.startswith(kind + ":")]
        if self.verdicts[k] == WARN and not self.reasons[k]:
            self.verdicts[k] = OK

    def _warn(self, k: int, kind: str, reason: str) -> None:
        """Flag member k. A reason of `kind` replaces the one recorded before, so it tells the latest
        figure ("": always added)."""
        same = [i for i, r in enumerate(self.reasons[k]) if kind and r.startswith(kind + ":")]
        if same:
            self.reasons[k][same[0]] = reason
        else:
            self.reasons[k].append(reason)
        self.verdicts[k] = WARN


@torch.no_grad()
def nonfinite_weights(sae: SAE) -> list[list[str]]:
    """Per member of `sae` (one list for a single SAE): names of its parameters holding NaN or inf."""
    n = sae.n_stack or 1
    bad: list[list[str]] = [[] for _ in range(n)]
    for name, p in sae.named_parameters():
        finite = torch.isfinite(p).reshape(n, -1).all(1).tolist()
        for k, ok in enumerate(finite):
            if not ok:
                bad[k].append(name)
    return bad


@torch.no_grad()
def keep_members(sae: SAE, opt: Adam, keep: list[int]) -> tuple[SAE, Adam]:
    """A new stack of the members at positions `keep` of stack `sae` (in that order), and an Adam
    that goes on as `opt` did for them: its moments exp_avg / exp_avg_sq index_select'ed along
    dim 0, its step counts, lr (the kept entries of a per-member list), betas and eps.

    The survivors then train exactly as they would have in the old stack. Neither `sae` nor the
    random number generator is changed (building SAEs draws initial weights: done in a fork).
    `opt`'s gradients are let go.
    """
    opt.zero_grad()
    with torch.random.fork_rng(devices=[]):
        members = sae.unstack()
        new = type(sae).stack([members[i] for i in keep])
    lr = [opt.lr[i] for i in keep] if isinstance(opt.lr, list) else opt.lr
    new_opt = Adam(new.parameters(), lr=lr, betas=opt.betas, eps=opt.eps, n_stack=new.n_stack)
    idx = torch.tensor(keep, dtype=torch.long, device=next(new.parameters()).device)
    state = opt.state_dict()
    new_opt.load_state_dict({"steps": state["steps"],
                             "exp_avg": [m.index_select(0, idx) for m in state["exp_avg"]],
                             "exp_avg_sq": [v.index_select(0, idx) for v in state["exp_avg_sq"]]})
    return new, new_opt
