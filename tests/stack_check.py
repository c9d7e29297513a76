"""Checks that a stack of SAEs behaves as its members alone: the same outputs, gradients, steps."""

from __future__ import annotations

import torch

from sae_ray.sae import SAE


def assert_same_outputs(stack_out, outs) -> None:
    """The stack's SAEOutput equals its members' outputs stacked, aux losses included."""
    for name in ("x_hat", "feature_acts", "loss", "mse"):
        torch.testing.assert_close(getattr(stack_out, name), torch.stack([getattr(o, name) for o in outs]), msg=name)
    assert set(stack_out.aux) == set(outs[0].aux)
    for key in stack_out.aux:
        torch.testing.assert_close(stack_out.aux[key], torch.stack([o.aux[key] for o in outs]), msg=key)


def assert_same_state(stack: SAE, saes: list[SAE], grads: bool = False) -> None:
    """Every parameter (or its gradient) and buffer of the stack equals its members' stacked."""
    for name, t in stack.named_parameters():
        theirs = torch.stack([getattr(s, name).grad if grads else getattr(s, name) for s in saes])
        torch.testing.assert_close(t.grad if grads else t, theirs, msg=name)
    for name, t in saes[0].named_buffers():
        torch.testing.assert_close(getattr(stack, name), torch.stack([getattr(s, name) for s in saes]), msg=name)


def step_both(stack: SAE, saes: list[SAE], stack_out, outs, stack_opt, opts) -> None:
    """One optimizer step of the stack and of each member, checking the gradients and the result
    (tokens_since_fired and BatchTopK's θ included) agree."""
    for s, o in zip(saes, outs):
        s.zero_grad()
        o.loss.backward()
        s.pre_step()
    stack.zero_grad()
    stack_out.loss.sum().backward()
    stack.pre_step()
    assert_same_state(stack, saes, grads=True)
    for s, opt in zip(saes, opts):
        opt.step()
        s.post_step()
    stack_opt.step()
    stack.post_step()
    assert_same_state(stack, saes)
