"""The L0 controller: moves each member's sparsity coefficient so its L0 lands on a target. No Ray.

A target-L0 sweep (`sae.target_l0`) gives TopK, BatchTopK and Matryoshka k = target. The
coefficient architectures (ReLU+L1, Gated: l1_coefficient; JumpReLU: l0_coefficient) have no
knob that is their L0, so the training loop runs this controller on the coefficient λ_k of
each member k, once per optimizer step:

    d_k     = (log L0_k(now) - log L0_k(trend_steps steps ago)) / trend_steps    the trend, per step
    e_k     = clip(clip(log(L0_k / target_k)) + clip((stop - step) * d_k))     clip: to [-1, 1]
    log λ_k = log λ_k + gain * e_k                     while the control span lasts
    span    = [end of the sparsity warmup, stop = (1 - freeze_fraction) of the run)

L0_k is measured on a reservoir (`RowReservoir`, `train.l0_control.reservoir_rows`): a uniform
sample of every row the trial has trained on so far, encoded without gradients every
`measure_every` steps. The batch L0 is no good as the controller's input: the reader mixes a
few shards at a time, and the quickstart's shards differ enough that one SAE's batch L0 swung
±30% from mix to mix, so the controller chased the current mix and the L0 over the whole data
landed 25-30% under target. The reservoir's L0 is the L0 over the data.

The error is that of the L0 the trend predicts for the end of the span: the distance to the
target now plus the move still to come, each capped at a factor e. An L1 SAE's L0 falls on
its own while it learns (the quickstart's ReLU+L1 at a fixed λ = 5: 1360 at the end of the
warmup, 250 at step 175, 104 at step 260 of 293), so the L0 now is a poor guide: a plain
integral controller (error = the distance alone) raised λ all through the dense phase, L0 then
fell through the target on its own, and lowering λ revives latents only slowly (λ halved over
85 steps moved L0 from 92 to 95). With the trend, λ falls while the L0 is on course to pass
its target, even while it is still above it; in the dense phase the two capped terms cancel,
so λ stays. The horizon shrinks to 0 at the freeze, so the controller becomes a plain
integral one where the final value is set. A fixed long horizon with a larger gain oscillated
(gain 0.1, horizon 100: λ swung between 3 and 16 every 20 steps); so did a fixed horizon of
40 at gain 0.03 (see `train.l0_control.trend_steps` for the quickstart's figures).

λ grows while the SAE is predicted denser than its target and shrinks while it is predicted
sparser; the clip keeps one step below a factor e^gain. The SAE answers a change of λ only over
tens of steps, so a larger gain overshoots and oscillates (on the synthetic problem of the
tests 0.05 overshot JumpReLU's L0 by half; 0.03 did not). For the last `freeze_fraction` of the
run λ is frozen: the SAE settles under one fixed objective while the lr decays
(train.lr_decay_fraction), so the saved SAE is an ordinary SAE with coefficient λ, and its
held-out L0 is what that λ gives; its L0 still drifts a few percent down in that stretch.

Why a controller and not Gemma Scope 2's quadratic penalty λ·(L0/target - 1)^2 (JumpReLU's
"l0_target" knob): the quadratic penalty needs the L0 gradient of JumpReLU's straight-through
estimator and does not exist for ReLU+L1 or Gated; the controller works the same way for all
three, and what it leaves behind is the plain objective each architecture's papers train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class L0Controller:
    """Coefficients for members 0..n-1 (positions in the current stack) with targets.

    targets: per member, its target L0 (None: not controlled, its coefficient stays).
    coefficients: per member, the starting λ (> 0). start_step, stop_step: the control span,
    in optimizer steps (0-based, stop exclusive). gain: the step size in log λ. trend_steps: the
    steps over which the trend of log L0 is measured.
    """

    def __init__(self, targets: Sequence[float | None], coefficients: Sequence[float],
                 start_step: int, stop_step: int, gain: float, trend_steps: int = 20):
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
        self.trend_steps = trend_steps
        self.measured: list[float] = []
        """Per member: the L0 the controller acts on (the caller's last measurement; [] before the first)."""
        self.history: list[list[float]] = [[] for _ in self.targets]
        """Per member: log L0 of the last trend_steps steps controlled, oldest first."""

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
                    past = self.history[k]
                    trend = (log_l0 - past[0]) / len(past) if past else 0.0  # d log L0 / step
                    ahead = clip((self.stop_step - step) * trend)  # the move still to come, extrapolated
                    error = clip(clip(log_l0 - math.log(t)) + ahead)
                    self.coefficients[k] *= math.exp(self.gain * error)
                    past.append(log_l0)
                    del past[:-self.trend_steps]
        return list(self.coefficients)

    def keep(self, members: Sequence[int]) -> None:
        """Only the members at these positions go on (the monitor stopped the others)."""
        self.targets = [self.targets[i] for i in members]
        self.coefficients = [self.coefficients[i] for i in members]
        self.history = [self.history[i] for i in members]
        self.measured = [self.measured[i] for i in members] if self.measured else []

    def state_dict(self) -> dict:
        """Plain JSON: what a checkpoint keeps."""
        return {"targets": list(self.targets), "coefficients": list(self.coefficients),
                "history": [list(h) for h in self.history], "measured": list(self.measured)}

    def load_state_dict(self, state: dict) -> None:
        self.targets = list(state["targets"])
        self.coefficients = [float(c) for c in state["coefficients"]]
        self.history = [list(h) for h in state["history"]]
        self.measured = [float(v) for v in state.get("measured", [])]


def clip(x: float) -> float:
    """x clipped to [-1, 1]."""
    return max(-1.0, min(1.0, x))


class RowReservoir:
    """A uniform sample of the rows of a stream: after n rows, each of them is in it with
    probability min(1, capacity / n) (Vitter's algorithm R, a batch at a time; seeded).

    rows: [min(n, capacity), d_in], on the device and in the dtype of the first batch added.
    """

    def __init__(self, capacity: int, seed: int):
        if capacity < 1:
            raise ValueError(f"RowReservoir: capacity {capacity!r}; must be >= 1")
        self.capacity = capacity
        self.seen = 0
        self.store: Tensor | None = None
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def rows(self) -> Tensor:
        """[min(seen, capacity), d_in]: the sample."""
        if self.store is None:
            raise ValueError("RowReservoir: no rows added yet")
        return self.store[: min(self.seen, self.capacity)]

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """x [B, d_in]: the next rows of the stream."""
        if self.store is None:
            self.store = x.new_empty((self.capacity, x.shape[1]))
        index = self.seen + torch.arange(x.shape[0])  # each row's position in the stream
        slot = torch.where(index < self.capacity, index,
                           (torch.rand(x.shape[0], generator=self.generator) * (index + 1)).long())
        take = slot < self.capacity
        self.store[slot[take].to(self.store.device)] = x[take.to(x.device)].to(self.store.dtype)
        self.seen += x.shape[0]

    def state_dict(self) -> tuple[dict, dict[str, Tensor]]:
        """(plain JSON, tensors): what a checkpoint keeps."""
        tensors = {"generator": self.generator.get_state()}
        if self.store is not None:
            tensors["rows"] = self.store
        return {"seen": self.seen, "capacity": self.capacity}, tensors

    def load_state_dict(self, meta: dict, tensors: dict[str, Tensor]) -> None:
        self.seen, self.capacity = int(meta["seen"]), int(meta["capacity"])
        self.generator.set_state(tensors["generator"])
        self.store = tensors["rows"].clone() if "rows" in tensors else None
