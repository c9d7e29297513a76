"""The sweep plan: which SAEs a sweep trains, how they are grouped and named. No Ray.

    SweepConfig x hooks ──expand_trials──▶ [Trial]   one SAE each: architecture, width,
                                                      its sparsity value or target L0,
                                                      hook, d_in
                        ──pack_stacks────▶ [Stack]   trials of one architecture, width
                                                      and hook, trained together
    Trial.sae_config(cfg) ─────────────▶ SAEConfig  the one builder of an SAE's config
    summary_row(trial, final) ─────────▶ dict       one line of the sweep's summary

A transcoder sweep (`sae.transcoder`) is the same grid on one pair of hook points: each Trial reads
`hook` and reconstructs `hook_out` (d_out wide); its name says so
('topk-transcoder-d64-k4@blocks.1.ln2.hook_normalized->blocks.1.hook_mlp_out'), stacks group by
both hooks, and it is registered under its input hook with the output hook in its tags.

`preflight` builds the plan once (it knows each hook's d_in); the driver hands every
`Stack` to Ray Tune as `Stack.to_dict()`, and the trial rebuilds it with
`Stack.from_dict`. Nothing downstream re-derives what the plan knows.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from sae_ray.config import RunConfig, SweepConfig
from sae_ray.config.sections import AUTO_MAX_STACK
from sae_ray.sae import ARCHITECTURES, SAEConfig
from sae_ray.sae.config import SPARSITY_PARAMS

_SHORT = {"k": "k", "l1_coefficient": "l1_", "l0_coefficient": "l0_"}

SUMMARY_COLUMNS = ["sae", "architecture", "d_sae", "target_l0", "k", "l1_coefficient", "l0_coefficient", "l0", "fvu",
                   "dead_fraction", "ce_loss_score", "kl_div_score", "embedding_score", "tokens_seen", "train_tokens_per_s",
                   "verdict", "version"]
"""The columns of the printed summary table (`summary_row` has a few more)."""


@dataclass(frozen=True)
class Trial:
    """One SAE of the sweep."""

    architecture: str
    """A key of `sae_ray.sae.ARCHITECTURES`."""
    d_sae: int
    """Latents."""
    expansion_factor: float
    """d_sae / d_in."""
    sparsity_param: str
    """Which knob sets its sparsity: "k", "l1_coefficient" or "l0_coefficient"."""
    sparsity: float
    """That knob's value (an int for k); for a target-L0 trial of a coefficient architecture,
    the coefficient training starts from (`SAE.target_start`; the L0 controller moves it)."""
    hook: str
    """Hook point name, e.g. "blocks.3.hook_resid_post"."""
    hook_layer: int
    """Block index of the hook (-1 for a raw module path)."""
    d_in: int
    """Width of the activations at the hook."""
    target_l0: int | None = None
    """The L0 this SAE aims at (`sae.target_l0`; k = target for the k architectures), None for a
    trial whose sparsity knob is set directly."""
    hook_out: str | None = None
    """A transcoder's output hook point (what it reconstructs); None for an SAE."""
    hook_layer_out: int = -1
    """Block index of hook_out (-1 for a raw module path or an SAE)."""
    d_out: int | None = None
    """Width of the activations at hook_out; None for an SAE."""
    skip: bool = False
    """A transcoder with a skip connection (`sae.transcoder.skip`)."""

    @property
    def kind(self) -> str:
        """"sae", "transcoder" or "skip_transcoder"."""
        return "sae" if self.hook_out is None else "skip_transcoder" if self.skip else "transcoder"

    @property
    def where(self) -> str:
        """The hook, or 'input->output' for a transcoder."""
        return self.hook if self.hook_out is None else f"{self.hook}->{self.hook_out}"

    @property
    def name(self) -> str:
        """e.g. 'topk-d3072-k32@blocks.3.hook_resid_post', or for a transcoder
        'topk-transcoder-d3072-k32@blocks.3.ln2.hook_normalized->blocks.3.hook_mlp_out'."""
        return f"{self.prefix}-d{self.d_sae}-{self.sparsity_label}@{self.where}"

    @property
    def prefix(self) -> str:
        """The architecture, with the kind for a transcoder: 'topk', 'topk-transcoder', 'topk-skip_transcoder'."""
        return self.architecture if self.hook_out is None else f"{self.architecture}-{self.kind}"

    @property
    def sparsity_label(self) -> str:
        """e.g. 'k32' or 'l1_5'; 'L0_32' for a target-L0 trial."""
        if self.target_l0 is not None:
            return f"L0_{self.target_l0}"
        value = self.sparsity if self.sparsity_param == "k" else f"{self.sparsity:g}"
        return f"{_SHORT[self.sparsity_param]}{value}"

    def sparsity_values(self) -> dict[str, float]:
        """{k | l1_coefficient | l0_coefficient: value}: the one knob this trial sets (its start
        value for a target-L0 trial of a coefficient architecture)."""
        return {self.sparsity_param: self.sparsity}

    def get(self, param: str) -> float | None:
        """The value of sparsity knob `param`, None when this trial does not set it."""
        return self.sparsity if param == self.sparsity_param else None

    @property
    def k(self) -> int | None:
        return self.get("k")

    @property
    def l1_coefficient(self) -> float | None:
        return self.get("l1_coefficient")

    @property
    def l0_coefficient(self) -> float | None:
        return self.get("l0_coefficient")

    def sae_config(self, cfg: RunConfig) -> SAEConfig:
        """The SAEConfig of this trial: shape, sparsity, provenance and its `sae.extra` knobs."""
        return SAEConfig(
            architecture=self.architecture, d_in=self.d_in, d_sae=self.d_sae, **self.sparsity_values(),
            model_name=cfg.model.name, hook_name=self.hook, hook_layer=self.hook_layer,
            d_out=self.d_out, skip=self.skip, hook_name_out=self.hook_out or "", hook_layer_out=self.hook_layer_out,
            context_size=cfg.data.context_size, dataset_path=cfg.data.path,
            extra=dict(cfg.sae.extra.get(self.architecture, {})),
        )

    def tags(self) -> dict[str, Any]:
        """What identifies this SAE among the others: for registry version tags and summaries."""
        target = {} if self.target_l0 is None else {"target_l0": self.target_l0}
        transcoder = {} if self.hook_out is None else {"kind": self.kind, "hook_out": self.hook_out, "d_out": self.d_out}
        return {"architecture": self.architecture, "d_sae": self.d_sae, "d_in": self.d_in,
                "expansion_factor": self.expansion_factor, "hook": self.hook, **transcoder, **target,
                **self.sparsity_values()}


@dataclass(frozen=True)
class Stack:
    """Trials of one architecture, width and hook, trained together in one Tune trial."""

    trials: tuple[Trial, ...]

    @property
    def name(self) -> str:
        """e.g. 'topk-d3072-k16,k48@blocks.3.hook_resid_post' (a single trial's own name for one)."""
        first = self.trials[0]
        if len(self.trials) == 1:
            return first.name
        return f"{first.prefix}-d{first.d_sae}-{','.join(t.sparsity_label for t in self.trials)}@{first.where}"

    @property
    def hook(self) -> str:
        """The hook point it reads (a transcoder's input)."""
        return self.trials[0].hook

    @property
    def hook_out(self) -> str | None:
        """A transcoder stack's output hook point; None for SAEs."""
        return self.trials[0].hook_out

    @property
    def reader_hooks(self) -> str | tuple[str, str]:
        """What its BufferReader reads: the hook, or (input, output) for transcoders (pairs of rows)."""
        return self.hook if self.hook_out is None else (self.hook, self.hook_out)

    def sae_configs(self, cfg: RunConfig) -> list[SAEConfig]:
        return [t.sae_config(cfg) for t in self.trials]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: how a stack travels into Ray Tune's param space."""
        return {"trials": [asdict(t) for t in self.trials]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stack:
        return cls(tuple(Trial(**t) for t in d["trials"]))

    @property
    def reader_id(self) -> str:
        """The id this stack's trial reads a bounded window under, known before the trial starts
        (so the coordinator can wait for it), e.g. 'trial-topk-d64-k4_blocks.1.hook_resid_post-3f2a9c1b0d'.
        The name with what a reader id cannot hold replaced by '_', cut to 150 characters, and a
        hash of the whole name, so two stacks never share one (`buffer.layout.check_reader_id`)."""
        import hashlib
        import re

        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)[:150]
        return f"trial-{safe}-{hashlib.sha1(self.name.encode()).hexdigest()[:10]}"


def expand_trials(sweep: SweepConfig, hooks: dict[str, int], hook_layers: dict[str, int] | None = None,
                  transcoder: tuple[str, str] | None = None) -> list[Trial]:
    """The grid: for each hook, architecture, width and that architecture's sparsity values, one Trial.

    hooks: {hook name: d_in}; hook_layers: {hook name: block index} (default -1).
    transcoder: (input hook, output hook), both in `hooks`: the grid is trained once, as transcoders
    from the input to the output (`sae.transcoder`), and not on every hook.
    Widths come from `sae.expansion_factor` (d_sae = factor x d_in) or `sae.d_sae`. An
    architecture whose own knob list (k, l1_coefficient or l0_coefficient) is not given takes
    `sae.target_l0` as its axis: k = target, or its `target_start` coefficient and the target.
    """
    trials = []
    layers = hook_layers or {}
    pairs = [(h, None) for h in hooks] if transcoder is None else [transcoder]
    for hook, hook_out in pairs:
        d_in = hooks[hook]
        out = {} if hook_out is None else {"hook_out": hook_out, "hook_layer_out": layers.get(hook_out, -1),
                                           "d_out": hooks[hook_out], "skip": bool(sweep.transcoder and sweep.transcoder.skip)}
        widths = ([(ef * d_in, ef) for ef in sweep.expansion_factor] if sweep.expansion_factor
                  else [(d, d / d_in) for d in sweep.d_sae or []])
        for arch in sweep.architectures:
            cls = ARCHITECTURES[arch]
            param = cls.sparsity_param
            own = getattr(sweep, param)
            axis = [(v, None) for v in own or []] if own or not sweep.target_l0 else \
                [(t if param == "k" else cls.target_start, t) for t in sweep.target_l0]
            for d_sae, ef in widths:
                for value, target in axis:
                    trials.append(Trial(arch, int(d_sae), ef, param, value, hook, layers.get(hook, -1), d_in, target,
                                        **out))
    return trials


def stack_limit(cfg: RunConfig) -> int:
    """The most SAEs one trial trains together: sae.max_stack if it is set, else this rule.

    GPU trials (resources.gpus_per_trial > 0): AUTO_MAX_STACK; one launch trains the whole stack.
    CPU trials: 1. There the matmuls already run at the core's peak, and a stack of K trains no
    faster than its K members one after another (`sae-ray bench train`: 0.7-1.0x for TopK, with
    its [K, B, d_sae] temporaries), while separate trials spread over the cores and fill each one
    as it frees up. Except, on CPU too, stacks of up to AUTO_MAX_STACK:
      - with a bounded window (buffer.max_gb): a trial that has not started holds every shard of
        the window, so all trials must run at once, and stacks keep them few;
      - with a search or a scheduler (sweep.search not 'grid', sweep.scheduler 'asha'): trials
        are drawn and ranked as stacks (a stack's mean over its L0 ladder; its SAEs share a draw)."""
    if cfg.sae.max_stack is not None:
        return cfg.sae.max_stack
    searched = cfg.sweep.search != "grid" or cfg.sweep.scheduler != "fifo"
    if cfg.resources.gpus_per_trial > 0 or cfg.buffer.max_gb is not None or searched:
        return AUTO_MAX_STACK
    return 1


def pack_stacks(trials: list[Trial], max_stack: int) -> list[Stack]:
    """Group trials that share architecture, width and hook (a transcoder's: both hooks and skip) into
    stacks of at most `max_stack`, in grid order."""
    groups: dict[tuple, list[Trial]] = {}
    for t in trials:
        groups.setdefault((t.architecture, t.d_sae, t.hook, t.hook_out, t.skip), []).append(t)
    return [Stack(tuple(g[i: i + max_stack])) for g in groups.values() for i in range(0, len(g), max_stack)]


def trial_problems(cfg: RunConfig, trials: list[Trial]) -> list[str]:
    """Once d_in is known: every k below its d_sae, and every trial's SAEConfig (with its
    `sae.extra` knobs) accepted by its architecture. One line per distinct problem."""
    problems = []
    for t in trials:
        if t.target_l0 is not None and t.target_l0 >= t.d_sae:
            problems.append(f"sae.target_l0: value {t.target_l0}: must be < d_sae ({t.d_sae} = expansion_factor x d_in "
                            f"{t.d_in}) for {t.architecture}")
            continue
        if t.k is not None and t.k >= t.d_sae:
            problems.append(f"sae.k: value {t.k}: must be < d_sae ({t.d_sae} = expansion_factor x d_in {t.d_in}) "
                            f"for {t.architecture}")
            continue
        try:
            ARCHITECTURES[t.architecture].check_config(t.sae_config(cfg))
        except ValueError as e:
            problems.append(f"sae.extra.{t.architecture}: value {cfg.sae.extra.get(t.architecture, {})!r}: {e}")
    return sorted(set(problems))


def summary_row(trial: Trial, final: dict[str, Any]) -> dict[str, Any]:
    """One row of the sweep summary: the trial's identity, its final (held-out) figures, the
    monitor's verdict (l0 and fvu are None for an SAE the monitor stopped) and the Ray node it
    trained on."""
    coefficient = final.get("coefficient")  # where the L0 controller left it
    knobs = {p: coefficient if p == trial.sparsity_param and coefficient is not None else trial.get(p)
             for p in SPARSITY_PARAMS}
    return {
        "sae": trial.name, "architecture": trial.architecture, "d_sae": trial.d_sae,
        "target_l0": trial.target_l0, **knobs, "hook": trial.hook, "hook_out": trial.hook_out,
        "l0": final["l0"], "fvu": final["fvu"], "dead_fraction": final["dead_fraction"],
        "tokens_seen": final["tokens_seen"], "train_tokens_per_s": final["train_tokens_per_s"],
        "verdict": final["verdict"], "reasons": final["reasons"],
        "version": final["registered_version"], "mlflow_run_id": final["mlflow_run_id"],
        "node_id": final.get("node_id", ""),
    }


def sort_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Summary rows by architecture, width, then target L0 and sparsity."""
    return sorted(rows, key=lambda r: (r["architecture"], r["d_sae"], r.get("target_l0") or 0,
                                       *(r[p] or 0 for p in SPARSITY_PARAMS)))
