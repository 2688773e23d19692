"""Fixtures for the serving tests: a tiny chat Llama (byte tokenizer, ChatML template) with a
library of three LoRA adapters that change its output, and an engine over both."""

from __future__ import annotations

import pytest
import torch

from serving_helpers import ADAPTERS, BASE, byte_tokenizer, save_random_lora, tiny_chat_llama
from splice.library import AdapterLibrary
from splice.serving import Engine, ServeConfig


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model's ops are microseconds: a second intra-op thread on a busy machine costs
    far more than it gives (30x slower measured at load 14 on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def library(tmp_path, tokenizer) -> AdapterLibrary:
    """A library bound to the tiny model, holding adapters a, b, c (and folder d, not added)."""
    model = tiny_chat_llama(tokenizer)
    library = AdapterLibrary(tmp_path / "library")
    for seed, name in enumerate(ADAPTERS + ("d",)):
        folder = save_random_lora(model, tmp_path / "folders" / name, seed=seed + 1)
        if name != "d":
            library.add(name, folder, model=model)
    return library


@pytest.fixture
def make_engine(library, tokenizer):
    """make_engine(**ServeConfig fields) -> a started engine over a fresh tiny model."""
    engines = []

    def make(start: bool = True, **limits) -> Engine:
        limits = {"max_batch": 4, **limits}
        engine = Engine(tiny_chat_llama(tokenizer), tokenizer, library, ServeConfig(**limits),
                        base_name=BASE)
        engines.append(engine)
        return engine.start() if start else engine

    yield make
    for engine in engines:
        engine.close()
