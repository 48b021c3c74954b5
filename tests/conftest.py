"""Shared test setup: tiny models run fastest on one thread (and the suite shares 2 cores)."""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_folder():
    """A Hugging Face folder of SmolLM2-135M-Instruct (config, tokenizer, weights), or skip.

    ``$EMLAB_TEST_SMOLLM2`` names it; the default is the development copy in /tmp/smollm2-hf (to be
    replaced by the folder ``emlab.models`` puts in emlab's cache).
    """
    from pathlib import Path

    folder = Path(os.environ.get("EMLAB_TEST_SMOLLM2") or "/tmp/smollm2-hf")
    if not (folder / "config.json").is_file():
        pytest.skip(f"no SmolLM2-135M-Instruct folder at {folder} (set EMLAB_TEST_SMOLLM2 to one)")
    return folder
