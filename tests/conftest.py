from __future__ import annotations

import pytest
import torch

from tests.tiny_models import make_clip, make_images, make_llm

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """A tiny CLIP, a tiny Qwen2 and a few images on disk: {'clip','llm','images'}."""
    root = tmp_path_factory.mktemp("tiny")
    make_images(root / "images")
    return {"clip": make_clip(root / "clip"), "llm": make_llm(root / "llm"), "images": root / "images"}


@pytest.fixture(scope="session")
def tiny_llava_dir(tiny_paths, tmp_path_factory):
    """A random-initialised tiny Llava saved in the standard HF format."""
    from dpa_core.modeling import build_llava, save_llava

    model, processor = build_llava(tiny_paths["clip"], tiny_paths["llm"])
    return save_llava(model, processor, tmp_path_factory.mktemp("llava") / "model")
