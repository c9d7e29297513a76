"""Training speed: how close a training step comes to this machine's matmul speed, what the
sparse decoder of the k-sparse architectures gains over the dense one, and what a stack of K
SAEs gains over K separate ones. Everything is measured in one run.

FLOPs of one training step of one SAE, x [B, n], n = d_in, m = d_sae, counted as the five
dense matmuls of the dense step (each 2*B*n*m FLOPs, 10*B*n*m in all):

    forward    pre   = (x - b_dec) @ W_enc           [B, n] @ [n, m]
               x_hat = f @ W_dec                     [B, m] @ [m, n]
    backward   dW_dec = f^T @ dx_hat                 [m, B] @ [B, n]
               df     = dx_hat @ W_dec^T             [B, n] @ [n, m]
               dW_enc = (x - b_dec)^T @ dpre         [n, B] @ [B, m]

(b_dec's gradient through the encoder input is a vector product, `SAE.centred_encode`.)
Elementwise work (activation, loss, Adam, decoder renorm) is not counted: it is the
overhead the fraction shows. Architectures with more matmuls than these (e.g. gated's
auxiliary reconstruction) do more work than counted, so their fraction is a lower bound.
The sparse decoder (`sae_ray.sae.sparse`) replaces the three decoder matmuls by sums over
the k active latents of each row; its step is compared with the dense step in tokens/s.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator

import torch
from torch import Tensor


def sync(device: torch.device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_matmuls(batch: int, d_in: int, d_sae: int) -> list[tuple[str, tuple[int, int], tuple[int, int], bool, bool]]:
    """The five matmuls of a dense training step: (name, a_shape, b_shape, a_transposed, b_transposed).
    a_shape/b_shape are the stored tensors; transposed means the step multiplies by a
    transposed view (a.T / b.T), as autograd does."""
    B, n, m = batch, d_in, d_sae
    return [
        ("enc fwd  (x-b_dec) @ W_enc", (B, n), (n, m), False, False),
        ("dec fwd  f @ W_dec", (B, m), (m, n), False, False),
        ("dec bwd  f^T @ dx_hat", (B, m), (B, n), True, False),
        ("dec bwd  dx_hat @ W_dec^T", (B, n), (m, n), False, True),
        ("enc bwd  (x-b_dec)^T @ dpre", (B, n), (B, m), True, False),
    ]


def step_flops(batch: int, d_in: int, d_sae: int) -> float:
    """FLOPs of one SAE's training step, counted as its five dense matmuls: 10 * B * d_in * d_sae."""
    return 10.0 * batch * d_in * d_sae


def time_matmuls(batch: int, d_in: int, d_sae: int, dtype: torch.dtype, device: torch.device,
                 repeats: int = 5, warmup: int = 2) -> list[tuple[str, float, float]]:
    """Each of the step's five matmuls on its own with `torch.mm` (warmed up, median of
    `repeats`): a list of (name, seconds, FLOP/s)."""
    out = []
    for name, a_shape, b_shape, a_t, b_t in step_matmuls(batch, d_in, d_sae):
        a = torch.randn(a_shape, dtype=dtype, device=device)
        b = torch.randn(b_shape, dtype=dtype, device=device)
        a, b = (a.T if a_t else a), (b.T if b_t else b)
        flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        times = []
        for i in range(warmup + repeats):
            sync(device)
            t = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t)
        seconds = statistics.median(times)
        out.append((name, seconds, flops / seconds))
        del a, b
    return out


def sparsity_setting(architecture: str) -> dict:
    """A typical sparsity value for the architecture's sparsity parameter (speed barely depends on it)."""
    from sae_ray.sae import ARCHITECTURES

    param = ARCHITECTURES[architecture].sparsity_param
    return {param: 32 if param == "k" else 1.0}


def time_training(sae, x: Tensor, steps: int, warmup: int) -> float:
    """Seconds per step of `train_sae` on the fixed batch x [B, d_in], measured between the
    loop's requests for the batch after step `warmup` and the end of step `warmup + steps`.
    The loop runs with TrainConfig's defaults; logging is off (on_log=None)."""
    from sae_ray.config import TrainConfig
    from sae_ray.train.loop import train_sae

    device = x.device
    marks: list[float] = []

    def batches() -> Iterator[Tensor]:
        while True:
            sync(device)
            marks.append(time.perf_counter())  # mark i: steps 1..i-1 are done
            yield x

    train = TrainConfig(total_tokens=(warmup + steps) * x.shape[0], batch_size=x.shape[0],
                        init_batches=1, log_every=10**9, device=str(device))
    train_sae(sae, batches(), train)
    sync(device)
    end = time.perf_counter()
    return (end - marks[warmup]) / steps


def side_by_side(first, second, rounds: int) -> tuple[list[float], list[float]]:
    """Time two measurements (functions returning seconds) `rounds` times, alternating which goes
    first: on CPU a side measured right after the other can be 10-20% slower (the allocator's
    state), so one round alone can favour either side. Returns (first's, second's) seconds."""
    a, b = [], []
    for r in range(max(1, rounds)):
        if r % 2 == 0:
            a.append(first())
            b.append(second())
        else:
            b.append(second())
            a.append(first())
    return a, b


def run_speed(d_in: int = 768, d_sae: int = 6144, batch: int = 4096,
              architectures: list[str] | None = None, steps: int = 2, warmup: int = 1,
              stack: int = 8, repeats: int = 5, device: str = "auto", seed: int = 0, rounds: int = 3,
              keep_memory: bool = True, decoder_d_sae: list[int] | None = None, log=print) -> dict:
    """The four measurements, printed as they come (through `log`) and returned:
    {"threads", "device", "matmul_flops", "matmuls": [(name, s, flop/s)],
     "single": {arch: {"tokens_per_s", "flops", "fraction"}}            (the dense step),
     "decoder": [{"architecture", "d_sae", "sparse_tokens_per_s", "dense_tokens_per_s", "ratio",
                  "round_ratios"}]                                       (k-sparse architectures),
     "stack": {"architecture", "k", "stack_tokens_per_s", "separate_tokens_per_s", "ratio", "round_ratios"} or None}.
    The decoder part times each k-sparse architecture of `architectures` at each d_sae of
    `decoder_d_sae` (default [d_sae]; [] skips it). The stack part uses the first architecture
    (with its default decoder); stack=0 skips it. Both run `rounds` rounds, each timing both
    sides on fresh SAEs, and report medians.
    keep_memory: on CPU, keep freed memory in this process for reuse, as a sweep's trials do
    (`TrainConfig.keep_freed_memory`, `sae_ray.train.memory`); it is process-wide and for good."""
    from sae_ray.devices import pick_device
    from sae_ray.sae import ARCHITECTURES, SAE, SAEConfig, create_sae
    from sae_ray.train.memory import keep_freed_memory

    log = log or (lambda s: None)
    warmup = max(1, warmup)
    dev = pick_device(device)
    # the step computes in bf16 under autocast on CUDA (TrainConfig.autocast "auto"), fp32 on CPU
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    architectures = architectures or ["topk", "standard"]
    unknown = [a for a in architectures if a not in ARCHITECTURES]
    if unknown:
        raise ValueError(f"architectures: unknown {unknown}; accepted: {', '.join(sorted(ARCHITECTURES))}")
    torch.manual_seed(seed)
    kept = dev.type == "cpu" and keep_memory and keep_freed_memory()
    result: dict = {"threads": torch.get_num_threads(), "device": str(dev), "keep_freed_memory": kept}
    log(f"device {dev}, torch threads {torch.get_num_threads()}, d_in {d_in}, d_sae {d_sae}, batch {batch}, "
        f"{warmup} warmup + {steps} timed step(s), freed memory "
        f"{'kept for reuse' if kept else 'handed back to the kernel'}")

    # 1. matmul speed of the step's own shapes
    mms = time_matmuls(batch, d_in, d_sae, dtype, dev, repeats=repeats)
    mm_seconds = sum(s for _, s, _ in mms)
    peak = step_flops(batch, d_in, d_sae) / mm_seconds
    result["matmuls"], result["matmul_flops"] = mms, peak
    log(f"\n1. matmul FLOP/s, torch.mm {str(dtype).removeprefix('torch.')}, median of {repeats}:")
    for name, s, fl in mms:
        log(f"   {name:<30} {fl / 1e9:8.1f} GFLOP/s")
    log(f"   all five (the step's matmuls alone): {peak / 1e9:.1f} GFLOP/s = {mm_seconds * 1e3:.1f} ms per step")

    # 2. a full training step of one SAE
    x = torch.randn(batch, d_in, device=dev)
    result["single"] = {}
    log("\n2. training step of one SAE, dense decoder (train_sae: forward, backward, pre_step, clip, Adam, "
        "post_step):")
    for arch in architectures:
        sae = create_sae(SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, **sparsity_setting(arch))).to(dev)
        sae.sparse_decoding = False
        seconds = time_training(sae, x, steps, warmup)
        flops = step_flops(batch, d_in, d_sae) / seconds
        result["single"][arch] = {"tokens_per_s": batch / seconds, "flops": flops, "fraction": flops / peak}
        log(f"   {arch:<10} {batch / seconds:10,.0f} tokens/s  {seconds * 1e3:8.1f} ms/step  "
            f"{flops / 1e9:7.1f} GFLOP/s = {flops / peak:.2f} x matmul FLOP/s")
        del sae

    # 3. the sparse decoder against the dense one, for the k-sparse architectures
    result["decoder"] = []
    sizes = [d_sae] if decoder_d_sae is None else decoder_d_sae
    k_sparse = [a for a in architectures if ARCHITECTURES[a].sparse_activation is not SAE.sparse_activation]
    if not sizes or not k_sparse:
        log("\n3. sparse decoder: skipped (" + ("--decoder-d-sae ''" if not sizes else
                                               "no k-sparse architecture in --architectures") + ")")
    else:
        log(f"\n3. sparse decoder against the dense one (k {sparsity_setting(k_sparse[0])['k']}), one SAE, "
            f"{rounds} round(s):")
    for arch in k_sparse if sizes else []:
        for m in sizes:
            cfg = SAEConfig(architecture=arch, d_in=d_in, d_sae=m, **sparsity_setting(arch))

            def timed(sparse: bool) -> float:
                sae = create_sae(cfg).to(dev)
                sae.sparse_decoding = sparse
                seconds = time_training(sae, x, steps, warmup)
                del sae
                return seconds

            sparse_s, dense_s = side_by_side(lambda: timed(True), lambda: timed(False), rounds)
            ratios = [d / sp for sp, d in zip(sparse_s, dense_s)]
            row = {"architecture": arch, "d_sae": m, "sparse_tokens_per_s": batch / statistics.median(sparse_s),
                   "dense_tokens_per_s": batch / statistics.median(dense_s), "ratio": statistics.median(ratios),
                   "round_ratios": ratios}
            result["decoder"].append(row)
            log(f"   {arch:<10} d_sae {m:>6}: sparse {row['sparse_tokens_per_s']:9,.0f} tokens/s, dense "
                f"{row['dense_tokens_per_s']:9,.0f} tokens/s: {row['ratio']:.2f}x (median of the rounds' ratios; "
                f"range {min(ratios):.2f}-{max(ratios):.2f})")

    # 4. a stack of K against K separate SAEs
    result["stack"] = None
    arch = architectures[0]
    if stack < 1:
        log("\n4. stack: skipped (--stack 0)")
        return result
    cfgs = [SAEConfig(architecture=arch, d_in=d_in, d_sae=d_sae, **sparsity_setting(arch)) for _ in range(stack)]
    log(f"\n4. {arch}: a stack of {stack} against {stack} separate SAEs on the same batch "
        f"(tokens/s each SAE trains at when all {stack} train), {rounds} round(s):")

    def time_separate() -> float:
        seconds = 0.0
        for cfg in cfgs:
            sae = create_sae(cfg).to(dev)
            seconds += time_training(sae, x, steps, warmup)
            del sae
        return seconds

    def time_stack() -> float:
        stacked = create_sae(cfgs).to(dev)
        seconds = time_training(stacked, x, steps, warmup)
        del stacked
        return seconds

    separate_s, stack_s = side_by_side(time_separate, time_stack, rounds)
    for r, (a, b) in enumerate(zip(separate_s, stack_s)):
        log(f"   round {r + 1} ({'separate first' if r % 2 == 0 else 'stack first'}): separate "
            f"{a * 1e3:8.1f} ms, stack {b * 1e3:8.1f} ms per step of all {stack}: {a / b:.2f}x")
    separate, stacked_s = statistics.median(separate_s), statistics.median(stack_s)
    ratios = [a / b for a, b in zip(separate_s, stack_s)]
    flops = stack * step_flops(batch, d_in, d_sae)
    result["stack"] = {"architecture": arch, "k": stack, "stack_tokens_per_s": batch / stacked_s,
                       "separate_tokens_per_s": batch / separate, "ratio": statistics.median(ratios),
                       "round_ratios": ratios}
    log(f"   separate  {batch / separate:10,.0f} tokens/s per SAE  {separate * 1e3:8.1f} ms per step of all {stack}  "
        f"{flops / separate / peak:.2f} x matmul FLOP/s  (median of rounds)")
    log(f"   stack     {batch / stacked_s:10,.0f} tokens/s per SAE  {stacked_s * 1e3:8.1f} ms per step of all {stack}  "
        f"{flops / stacked_s / peak:.2f} x matmul FLOP/s  (median of rounds)")
    log(f"   stack / separate: {statistics.median(ratios):.2f}x tokens/s per SAE (median of the rounds' ratios; "
        f"range {min(ratios):.2f}-{max(ratios):.2f})")
    return result
