"""Fixtures for the lab tests (the models and the library are built in lab_helpers)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from lab_helpers import ARTIFACTS, TRAIN, char_tokenizer, make_library, tiny_base
from splice.lab.app import create_app


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer()


@pytest.fixture(scope="session")
def library_dir(tmp_path_factory, tokenizer) -> Path:
    root = tmp_path_factory.mktemp("lab-library")
    make_library(root / "library", tiny_base(len(tokenizer)), root)
    return root / "library"


@pytest.fixture
def lab_model(tokenizer) -> LlamaForCausalLM:
    return tiny_base(len(tokenizer))


@pytest.fixture
def app(lab_model, tokenizer, library_dir):
    return create_app(lab_model, tokenizer, library_dir, model_name="tiny-llama",
                      train_settings=TRAIN)


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where browser tests keep their screenshots (tests/artifacts/lab, or $SPLICE_ARTIFACTS/lab)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
