"""Shared pytest fixtures: tiny offline models and sample texts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import ray

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import KINDS, make_tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray of 2 CPUs for one test module (`address="local"`: never a cluster found nearby)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory):
    """`tiny_model_factory(kind) -> path`: a tiny saved model + tokenizer for
    kind in "gpt2", "gpt_neox", "llama", "bert"; built once per session and kind."""
    cache: dict[str, str] = {}

    def factory(kind: str) -> str:
        if kind not in cache:
            cache[kind] = make_tiny_model(kind, tmp_path_factory.mktemp(f"tiny_{kind}"))
        return cache[kind]

    return factory


@pytest.fixture(params=KINDS)
def tiny_model_dir(request, tiny_model_factory) -> str:
    """Path of a tiny saved model; parametrised over every kind (override
    with `@pytest.mark.parametrize("tiny_model_dir", ["gpt2"], indirect=True)`)."""
    return tiny_model_factory(request.param)


@pytest.fixture(scope="session")
def sample_texts() -> list[str]:
    """A few dozen varied English sentences and paragraphs."""
    return list(SAMPLE_TEXTS)


SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "It was the best of times, it was the worst of times.",
    "Sparse autoencoders decompose activations into a small number of active features.",
    "On Monday the market opened higher, then fell sharply after the report on inflation.",
    "She said: \"Bring the blue umbrella, the forecast says rain after four o'clock.\"",
    "Water boils at 100 degrees Celsius at sea level, and at lower temperatures on mountains.",
    "The committee will meet again on 14 March 2025 to review the budget.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "A small bakery on the corner sells bread, croissants and a very good apple pie.",
    "def add(a, b):\n    return a + b",
    "The train to Edinburgh was delayed by forty minutes because of a signal failure.",
    "Elephants can recognise themselves in a mirror, a sign of self-awareness.",
    "Please remember to lock the door and switch off the lights when you leave.",
    "The novel follows three generations of a family living by the sea.\n\n"
    "Each chapter is told by a different narrator, and the reader slowly learns what happened "
    "on the night of the storm.",
    "Prices: apples 2.50, pears 3.10, cherries 7.99 per kilogram.",
    "In 1969, astronauts walked on the Moon for the first time.",
    "Why do cats purr? Scientists still argue about the exact mechanism.",
    "The function returns None when the input list is empty.",
    "Heavy snow closed the mountain pass for three days last winter.",
    "Our results show that wider dictionaries find more specific features.",
    "He plays the violin every evening, mostly Bach and sometimes Brahms.",
    "The library is open from nine to five, except on public holidays.",
    "Tokyo, Paris and New York are among the most visited cities in the world.",
    "To be, or not to be: that is the question.",
    "The recipe needs two eggs, a cup of flour, some milk and a pinch of salt.",
    "Quantum computers use qubits, which can be in a superposition of states.",
    "After the match, the players thanked the fans who had travelled so far.",
    "The river flooded the lower town, but nobody was hurt.",
    "Version 2.1 fixes a bug where the settings page would not save changes.",
    "Birds migrate south in autumn, following routes learned over thousands of years.",
    "I think, therefore I am.",
    "The old lighthouse has guided ships into the harbour for more than a century.",
    "Dear Sir or Madam, I am writing to ask about the apartment advertised last week.",
    "Gradient descent takes small steps downhill on the loss surface.",
    "The children built a sandcastle with towers, a moat and a little flag.",
    "Ok.",
]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny matmuls with several OpenMP threads crawl when other processes share the 2 cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_sessionfinish(session, exitstatus):
    """Stop a Ray that a test left running (a sweep run without the fixture) while pytest still
    runs, not in the interpreter's teardown, where Ray's own exit hook has crashed the process
    once after every test had passed."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
