"""The paper-scale pieces agree with each other (issue 12, item 7): every profile, accelerate config,
Dockerfile and Prefect template names the same images and real stages, and the batch arithmetic
(global batch = per-device x processes x accumulation) works out for every profile."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from pipelines.params import load_params
from pipelines.entrypoints import STAGES

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted(p.stem for p in (ROOT / "conf/profile").glob("*.yaml"))
PAPER = [p for p in PROFILES if p not in ("toy", "smoke")]
IMAGES = {"cpu": "dpa:cpu", "gpu": "dpa:gpu"}
DOCKERFILES = {"cpu": ROOT / "docker/Dockerfile.cpu", "gpu": ROOT / "docker/Dockerfile.gpu"}
TEMPLATES = [ROOT / "prefect.yaml", *sorted((ROOT / "configs/prefect").glob("*.json"))]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "configs/prefect/README.md"]
IMAGE_REF = re.compile(r"(?<![\w./-])(dpa[\w.-]*):(cpu|gpu)\b")


def test_paper_profiles_exist():
    assert set(PAPER) == {"qwen2.5-7b", "llama3.1-8b", "gemma2-9b"}


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_image_is_a_built_image(profile):
    p = load_params(ROOT / "params.yaml", {"profile": profile})
    assert p.runtime.image in IMAGES.values(), (profile, p.runtime.image)
    if p.runtime.gpus:
        assert p.runtime.image == IMAGES["gpu"]


def test_every_image_reference_names_a_built_image():
    for kind, dockerfile in DOCKERFILES.items():
        assert f"-t {IMAGES[kind]} " in dockerfile.read_text(), dockerfile
    for f in [*DOCKERFILES.values(), *TEMPLATES, *DOCS, *sorted((ROOT / "conf").rglob("*.yaml")),
              ROOT / "params.yaml", ROOT / "pipelines/container.py"]:
        for m in IMAGE_REF.finditer(f.read_text()):
            if m.group(0).startswith("registry."):
                continue
            assert m.group(0) in IMAGES.values(), f"{f.relative_to(ROOT)} names image {m.group(0)!r}"


def test_docker_run_examples_name_real_stages():
    """The images' entry point is `dpa stage`: what follows the image in a `docker run` is a stage."""
    for f in [*DOCKERFILES.values(), *DOCS]:
        for line in f.read_text().splitlines():
            m = re.search(r"\bdpa:(?:cpu|gpu)\s+([a-z_]+)", line)
            if m and "docker run" in line or (m and f.suffix == ".md" and line.startswith("  dpa:")):
                assert m.group(1) in STAGES, f"{f.relative_to(ROOT)}: {line.strip()!r}"
    assert 'ENTRYPOINT ["dpa", "stage"]' in DOCKERFILES["cpu"].read_text()
    assert 'ENTRYPOINT ["dpa", "stage"]' in DOCKERFILES["gpu"].read_text()


def _accelerate(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def test_accelerate_configs_leave_accumulation_to_the_trainer():
    for f in sorted((ROOT / "configs/accelerate").glob("*.yaml")):
        ds = (yaml.safe_load(f.read_text()) or {}).get("deepspeed_config") or {}
        assert ds.get("gradient_accumulation_steps", "auto") == "auto", f
        assert ds.get("train_batch_size", "auto") == "auto" and ds.get("train_micro_batch_size_per_gpu", "auto") == "auto"


@pytest.mark.parametrize("profile", PAPER)
def test_batch_arithmetic_of_paper_profiles(profile):
    p = load_params(ROOT / "params.yaml", {"profile": profile})
    acc = _accelerate(p.runtime.accelerate_config)
    assert p.runtime.launcher == "accelerate" and acc["num_processes"] == p.runtime.num_processes
    header = (ROOT / f"conf/profile/{profile}.yaml").read_text()
    m = re.search(r"Per-device micro-batches ([\d /]+) with gradient\s*#?\s*accumulation ([\d /]+) on (\d+) GPUs", header)
    assert m, "the profile header states the per-device batches and accumulation"
    per_device = [int(x) for x in m.group(1).split("/")]
    accumulation = [int(x) for x in m.group(2).split("/")]
    assert int(m.group(3)) == p.runtime.num_processes
    for i, stage in enumerate((p.proxy, p.align, p.finetune)):
        t = stage.train
        assert t.per_device_batch_size == per_device[i]
        assert t.global_batch_size % (t.per_device_batch_size * p.runtime.num_processes) == 0
        assert t.global_batch_size == t.per_device_batch_size * p.runtime.num_processes * accumulation[i]
        assert t.global_batch_size == 256  # the paper's global batch
