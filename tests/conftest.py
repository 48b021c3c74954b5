"""Shared test setup: tiny models run fastest on one thread (and the suite shares 2 cores)."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

import pytest  # noqa: E402

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def smollm2_path():
    """The converted SmolLM2-135M-Instruct folder in emlab's cache (``./run test`` makes it during setup)."""
    from emlab.packaged import PackagedModelError, packaged_model_path

    try:
        return packaged_model_path(SMOLLM2)
    except PackagedModelError as e:
        pytest.fail(f"SmolLM2 is not available: {e} (run `./run setup` once with the package index reachable)")


@pytest.fixture(scope="session")
def smollm2(smollm2_path):
    """SmolLM2-135M-Instruct (fp32, CPU) and its tokenizer, loaded once for the session: do not train it in place."""
    import emlab

    return emlab.load_model(str(smollm2_path), device="cpu")


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_path):
    """The SmolLM2-135M-Instruct folder (an alias of ``smollm2_path``)."""
    return smollm2_path
