"""Hook points: name them like SAELens / TransformerLens, capture them with
PyTorch hooks, and stop the forward pass as soon as the last one has fired.

Sites of block L (the names are `blocks.{L}.hook_{site}`):

- `resid_pre`: the input of block L (the residual stream before it);
- `resid_post`: the output of block L;
- `attn_out`: what attention writes into the residual stream;
- `mlp_in`: the input of the MLP, i.e. the output of the pre-MLP layer norm (what a transcoder
  reads); named `blocks.{L}.ln2.hook_normalized`, as TransformerLens, SAELens and Gemma Scope's
  transcoders name it (TransformerLens' own `hook_mlp_in` is the residual *before* that norm).
  Captured as the input of the MLP module (BERT: of `intermediate`);
- `mlp_out`: what the MLP writes into the residual stream.

`SITE_ORDER` is where each site comes in a block's forward pass (a transcoder's output must come
after its input).

Layouts: GPT-2 (`transformer.h.L.{attn,mlp}`), GPT-NeoX / Pythia
(`gpt_neox.layers.L.{attention,mlp}`), the Llama family - Llama, Mistral,
Qwen2, Gemma - (`model.layers.L.{self_attn,mlp}`), each for the base model and
its `...ForCausalLM` wrapper. Models with sandwich norms (Gemma 2/3, OLMo 2:
a block with `post_feedforward_layernorm`) normalise the sublayer outputs
before adding them, so there attn_out/mlp_out are the outputs of
`post_attention_layernorm` / `post_feedforward_layernorm`.

BERT (`encoder.layer.L`) is post-LayerNorm: each sublayer computes
`LayerNorm(x + dense(...))`, so there is no clean residual stream. We take
attn_out = output of `attention.output.dense` and mlp_out = output of
`output.dense`: the sublayer's contribution before the residual add and the
LayerNorm, as close as BERT gets to TransformerLens' meaning.
resid_pre/resid_post are the block's input/output, as everywhere.

Any other module can be captured by its `named_modules` path (`module=`).
"""

from __future__ import annotations

import difflib
import inspect
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SITES = ("resid_pre", "resid_post", "mlp_out", "attn_out", "mlp_in")
SITE_ORDER = {"resid_pre": 0, "attn_out": 1, "mlp_in": 2, "mlp_out": 3, "resid_post": 4}
"""Where each site of block L comes in its forward pass (with GPT-NeoX's parallel residual attn_out
and mlp_in are side by side; the order between them matters to nothing here)."""

# Where the list of transformer blocks lives, tried in order.
BLOCK_PATHS = (
    "transformer.h",  # GPT-2 LM head
    "h",  # GPT-2 base
    "gpt_neox.layers",  # GPT-NeoX / Pythia causal LM
    "model.layers",  # Llama, Mistral, Qwen2, Gemma causal LM
    "model.language_model.layers",  # Gemma 3 and other multimodal wrappers
    "language_model.layers",
    "layers",  # base GPT-NeoX / Llama family
    "bert.encoder.layer",  # BERT with a task head
    "encoder.layer",  # BERT base
    "model.decoder.layers",  # OPT
    "decoder.layers",
    "transformer.layers",
    "transformer.blocks",
)
ATTN_NAMES = ("attn", "self_attn", "attention", "self_attention")
MLP_NAMES = ("mlp", "feed_forward", "ffn")

_HOOK_NAME = re.compile(r"^blocks\.(\d+)\.hook_(\w+)$")
_MLP_IN_NAME = re.compile(r"^blocks\.(\d+)\.ln2\.hook_normalized$")


def hook_name(layer: int, site: str) -> str:
    """The SAELens / TransformerLens name of `site` in block `layer`: `blocks.3.hook_resid_post`,
    and `blocks.3.ln2.hook_normalized` for mlp_in. The one place these names are made."""
    return f"blocks.{layer}.ln2.hook_normalized" if site == "mlp_in" else f"blocks.{layer}.hook_{site}"


def parse_hook_name(name: str) -> tuple[int, str] | None:
    """(layer, site) of a name `hook_name` makes; None for anything else (e.g. a module path)."""
    match = _MLP_IN_NAME.match(name)
    if match:
        return int(match.group(1)), "mlp_in"
    match = _HOOK_NAME.match(name)
    if match and match.group(2) in SITES:
        return int(match.group(1)), match.group(2)
    return None


@dataclass(frozen=True)
class ResolvedHook:
    """A hook point bound to a module of one model."""

    name: str
    """SAELens-style name (`blocks.3.hook_resid_post`), or the module path for a raw module."""
    module_path: str
    """`named_modules` path of the hooked module."""
    capture: str
    """"output" (the module's output) or "input" (its hidden-states input)."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return (path, blocks): the model's list of transformer blocks."""
    for path in BLOCK_PATHS:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return path, blocks
    raise ValueError(
        f"cannot find the transformer blocks of {type(model).__name__}: tried {list(BLOCK_PATHS)}; "
        "capture a module by its path with module=... instead"
    )


def _has(block: nn.Module, path: str) -> bool:
    try:
        block.get_submodule(path)
        return True
    except AttributeError:
        return False


def _site_module(block: nn.Module, site: str) -> tuple[str, str] | None:
    """(path relative to the block, "output" | "input"): the module whose output (for mlp_in: whose
    input) is `site` (attn_out, mlp_in or mlp_out); None when the block has none."""
    if _has(block, "intermediate") and _has(block, "output.dense") and _has(block, "attention.output.dense"):
        return {"attn_out": ("attention.output.dense", "output"), "mlp_out": ("output.dense", "output"),
                "mlp_in": ("intermediate", "input")}[site]  # BERT
    sandwich = _has(block, "post_feedforward_layernorm") and _has(block, "post_attention_layernorm")
    if sandwich and site != "mlp_in":
        return {"attn_out": "post_attention_layernorm", "mlp_out": "post_feedforward_layernorm"}[site], "output"
    for name in ATTN_NAMES if site == "attn_out" else MLP_NAMES:
        if _has(block, name):
            return name, "input" if site == "mlp_in" else "output"
    return None


def _block_sites(block: nn.Module) -> list[str]:
    """The sites of SITES that resolve in this block."""
    return [s for s in SITES if s.startswith("resid") or _site_module(block, s) is not None]


def resolve_hook(
    model: nn.Module,
    layer: int | None = None,
    site: str | None = None,
    module: str | None = None,
) -> ResolvedHook:
    """Resolve a hook point: either `layer` + `site` (one of SITES), or
    `module`, a `named_modules` path captured at its output. `module` may also
    be a SAELens-style name such as `blocks.3.hook_resid_post`.
    """
    if module is not None:
        if layer is not None or site is not None:
            raise ValueError(f"resolve_hook: give either module= ({module!r}) or layer=/site=, not both")
        parsed = parse_hook_name(module)
        if parsed:
            return resolve_hook(model, layer=parsed[0], site=parsed[1])
        names = [n for n, _ in model.named_modules() if n]
        if module not in names:
            close = difflib.get_close_matches(module, names, n=5, cutoff=0.5)
            close = close or [n for n in names if module.split(".")[-1] in n][:5] or names[:5]
            raise ValueError(
                f"module {module!r} not found in {type(model).__name__}; close module names: {close}"
            )
        return ResolvedHook(name=module, module_path=module, capture="output")

    if site not in SITES:
        raise ValueError(f"unknown hook site {site!r}; valid sites: {list(SITES)}")
    blocks_path, blocks = find_blocks(model)
    n = len(blocks)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < n:
        raise ValueError(
            f"layer {layer!r} out of range for {type(model).__name__} with {n} blocks "
            f"({blocks_path}); valid layers: 0..{n - 1}"
        )
    block_path = f"{blocks_path}.{layer}"
    name = hook_name(layer, site)
    if site == "resid_pre":
        return ResolvedHook(name=name, module_path=block_path, capture="input")
    if site == "resid_post":
        return ResolvedHook(name=name, module_path=block_path, capture="output")
    found = _site_module(blocks[layer], site)
    if found is None:
        children = [c for c, _ in blocks[layer].named_children()]
        raise ValueError(
            f"cannot find the module for site {site!r} in {block_path} ({type(blocks[layer]).__name__}, "
            f"children {children}); sites that resolve there: {_block_sites(blocks[layer])}; "
            "or capture a module with module=..."
        )
    sub, capture = found
    return ResolvedHook(name=name, module_path=f"{block_path}.{sub}", capture=capture)


def valid_hook_points(model: nn.Module) -> list[str]:
    """Every `hook_name(L, site)` that resolves for this model."""
    _, blocks = find_blocks(model)
    return [hook_name(layer, site) for layer in range(len(blocks)) for site in _block_sites(blocks[layer])]


class _StopForward(Exception):
    """Raised by the last hook to fire, to skip the rest of the forward pass."""


def _first_tensor(value, hook: ResolvedHook) -> Tensor:
    if not isinstance(value, Tensor):
        value = value[0]  # tuples (attention returns (out, weights)) and ModelOutputs
    if not isinstance(value, Tensor):
        raise TypeError(f"hook {hook.name!r}: module {hook.module_path!r} gave {type(value).__name__}, not a tensor")
    return value


def capture_activations(
    model: nn.Module,
    hooks: list[ResolvedHook],
    input_ids: Tensor,
    attention_mask: Tensor,
) -> dict[str, Tensor]:
    """Run `model` on a batch and return the activations at `hooks`.

    input_ids, attention_mask: [B, T]. Returns {hook.name: [B, T, d]} in the
    model's dtype, on its device. The forward pass runs under
    `torch.inference_mode()` and stops as soon as every hook has fired, so
    no compute is spent on later layers (nor on the LM head).
    """
    if not hooks:
        raise ValueError("capture_activations: hooks is empty; give at least one ResolvedHook")
    names = [h.name for h in hooks]
    if len(set(names)) != len(names):
        raise ValueError(f"capture_activations: duplicate hook names in {names}")
    modules = dict(model.named_modules())
    for h in hooks:
        if h.module_path not in modules:
            raise ValueError(f"hook {h.name!r}: module {h.module_path!r} not found in {type(model).__name__}")
        if h.capture not in ("output", "input"):
            raise ValueError(f"hook {h.name!r}: capture {h.capture!r}; expected 'output' or 'input'")

    acts: dict[str, Tensor] = {}
    pending = set(names)

    def save(hook: ResolvedHook, value) -> None:
        acts[hook.name] = _first_tensor(value, hook)
        pending.discard(hook.name)
        if not pending:
            raise _StopForward

    def output_hook(hook: ResolvedHook):
        return lambda mod, args, output: save(hook, output)

    def input_hook(hook: ResolvedHook):
        def fn(mod, args, kwargs):
            if args:
                value = args[0]
            elif "hidden_states" in kwargs:
                value = kwargs["hidden_states"]
            else:
                raise TypeError(
                    f"hook {hook.name!r}: {hook.module_path!r} got no positional input and no "
                    f"hidden_states kwarg (kwargs: {sorted(kwargs)})"
                )
            save(hook, value)

        return fn

    device = next(model.parameters()).device
    handles = []
    try:
        for h in hooks:
            mod = modules[h.module_path]
            if h.capture == "output":
                handles.append(mod.register_forward_hook(output_hook(h)))
            else:
                handles.append(mod.register_forward_pre_hook(input_hook(h), with_kwargs=True))
        # No KV cache: we run one forward pass and throw the state away.
        kwargs = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
        with torch.inference_mode():
            try:
                model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
            except _StopForward:
                pass
    finally:
        for handle in handles:
            handle.remove()
    if pending:
        raise RuntimeError(f"capture_activations: hooks {sorted(pending)} never fired during the forward pass")
    return {name: acts[name] for name in names}
