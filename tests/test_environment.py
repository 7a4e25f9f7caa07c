"""In CI the reference packages must import: the comparison tests use `pytest.importorskip`, and a
broken install would otherwise turn them into silent skips."""

import importlib
import os

import pytest


@pytest.mark.skipif(os.environ.get("CI", "").lower() not in ("1", "true"), reason="only enforced in CI")
@pytest.mark.parametrize("name", ["torch", "transformers", "peft", "nbclient", "gguf", "tokenizers"])
def test_reference_packages_import_in_ci(name):
    importlib.import_module(name)
