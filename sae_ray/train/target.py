"""The L0 controller: moves each member's sparsity coefficient so its L0 lands on a target. No Ray.

A target-L0 sweep (`sae.target_l0`) gives TopK, BatchTopK and Matryoshka k = target. The
coefficient architectures (ReLU+L1, Gated: l1_coefficient; JumpReLU: l0_coefficient) have no
knob that is their L0, so the training loop runs this controller on the coefficient λ_k of
each member k, once per optimizer step:

    e_k     = clip(log(L0_k / target_k), -1, 1)        L0_k: mean active latents per row of the batch
    log λ_k = log λ_k + gain * e_k                     while the control span lasts, unless L0_k is
                                                       already on its way: it moved toward the target
                                                       by more than `patience_change` over the last
                                                       `patience_steps` steps
    span    = [end of the sparsity warmup, (1 - freeze_fraction) of the run)

That is an integral controller in log space: λ grows while the SAE is denser than its target
and shrinks while it is sparser; the clip keeps one step below a factor e^gain, so the early
dense phase does not blow λ up. The SAE answers a change of λ only over tens of steps, so a
larger gain overshoots and oscillates (on the synthetic problem of the tests 0.1 did for
ReLU+L1, 0.05 for JumpReLU, whose thresholds move slowly; 0.03 did not). While the SAE learns, a fixed λ gives a falling L0, which an integral controller follows
with a small lag: the final L0 tends to sit a few percent under its target. For the last `freeze_fraction` of the run λ is frozen: the SAE
settles under one fixed objective while the lr decays (train.lr_decay_fraction), so the saved
SAE is an ordinary SAE with coefficient λ, and its held-out L0 is what that λ gives.

Why a controller and not Gemma Scope 2's quadratic penalty λ·(L0/target - 1)^2 (JumpReLU's
"l0_target" knob): the quadratic penalty needs the L0 gradient of JumpReLU's straight-through
estimator and does not exist for ReLU+L1 or Gated; the controller works the same way for all
three, and what it leaves behind is the plain objective each architecture's papers train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


class L0Controller:
    """Coefficients for members 0..n-1 (positions in the current stack) with targets.

    targets: per member, its target L0 (None: not controlled, its coefficient stays).
    coefficients: per member, the starting λ (> 0). start_step, stop_step: the control span,
    in optimizer steps (0-based, stop exclusive). gain: the step size in log λ.
    """

    def __init__(self, targets: Sequence[float | None], coefficients: Sequence[float],
                 start_step: int, stop_step: int, gain: float, patience_steps: int = 10,
                 patience_change: float = 0.05):
        if len(targets) != len(coefficients):
            raise ValueError(f"L0Controller: {len(targets)} targets for {len(coefficients)} coefficients")
        for t, c in zip(targets, coefficients):
            if t is not None and not t > 0:
                raise ValueError(f"L0Controller: target L0 {t!r}; must be > 0")
            if t is not None and not c > 0:
                raise ValueError(f"L0Controller: starting coefficient {c!r}; must be > 0 to be scaled")
        self.targets = list(targets)
        self.coefficients = [float(c) for c in coefficients]
        """Per member: its λ now."""
        self.start_step, self.stop_step, self.gain = start_step, stop_step, gain
        self.patience_steps, self.patience_change = patience_steps, patience_change
        self.history: list[list[float]] = [[] for _ in self.targets]
        """Per member: log L0 of the last patience_steps steps controlled, oldest first."""

    def active(self, step: int) -> bool:
        """Whether step `step` (0-based) is inside the control span."""
        return self.start_step <= step < self.stop_step and any(t is not None for t in self.targets)

    def update(self, step: int, l0: Sequence[float]) -> list[float]:
        """After step `step` with per-member batch L0 `l0`: the new coefficients (unchanged
        outside the span and for members without a target)."""
        if self.active(step):
            for k, (t, v) in enumerate(zip(self.targets, l0)):
                if t is not None:
                    log_l0 = math.log(max(v, 1e-3))
                    error = max(-1.0, min(1.0, log_l0 - math.log(t)))
                    past = self.history[k]
                    moving = (log_l0 - past[0]) * (1 if error < 0 else -1) if len(past) >= self.patience_steps else 0.0
                    if moving <= self.patience_change:  # not already on its way to the target
                        self.coefficients[k] *= math.exp(self.gain * error)
                    past.append(log_l0)
                    del past[:-self.patience_steps]
        return list(self.coefficients)

    def keep(self, members: Sequence[int]) -> None:
        """Only the members at these positions go on (the monitor stopped the others)."""
        self.targets = [self.targets[i] for i in members]
        self.coefficients = [self.coefficients[i] for i in members]
        self.history = [self.history[i] for i in members]

    def state_dict(self) -> dict:
        """Plain JSON: what a checkpoint keeps."""
        return {"targets": list(self.targets), "coefficients": list(self.coefficients),
                "history": [list(h) for h in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.targets = list(state["targets"])
        self.coefficients = [float(c) for c in state["coefficients"]]
        self.history = [list(h) for h in state["history"]]
