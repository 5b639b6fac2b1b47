"""The world's files for the text-oracle ceiling and the image-reliance diagnostic (data only, no
model training): the benchmark TSV's scene_text column and the held-out captions of the benchmark scenes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from dpa_core.data import load_llava_records
from dpa_core.evaluation.builtin_scorer import has_scene_text, text_oracle_requests
from dpa_core.evaluation.generation import item_prompt
from dpa_core.evaluation.tsv_benchmark import read_tsv_benchmark
from dpa_core.toyworld import language, resolve_size
from dpa_core.toyworld.datasets import make_world_data, write_world_data
from dpa_core.toyworld.scenes import CONTENT_WORDS


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    ws = resolve_size("smoke")
    data = make_world_data(ws, 0)
    root = tmp_path_factory.mktemp("world")
    counts = write_world_data(root, data, ws.image_size)
    return root, data, counts


def test_scene_text_is_the_own_style_description(world):
    root, data, _ = world
    tsv = root / "bench" / "toy_mcq.tsv"
    assert has_scene_text(tsv)
    with open(tsv, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    image_of = {str(r["index"]): int(Path(r["image_file"]).stem) for r in data.bench_rows}
    assert len(rows) == len(image_of)
    for row in rows:
        assert row["scene_text"] == language.own_style(data.bench[image_of[row["index"]]])
    bench = read_tsv_benchmark(tsv)
    request = text_oracle_requests(bench)[0]
    assert request.prompt == f"{bench.items[0].scene_text}\n{item_prompt(bench.items[0])}"
    assert not request.images and request.load_images is None


def test_heldout_captions_show_the_benchmark_scenes_in_both_styles(world):
    root, data, counts = world
    n = len(data.bench)
    assert counts["heldout_caption_records"] == {"terse": n, "verbose": n}
    train_ids = {r["id"] for records in data.captions.values() for r in records}
    for style in ("terse", "verbose"):
        records = load_llava_records(root / "heldout" / f"captions_{style}.json", root / "images")
        assert len(records) == n
        assert all(r.image.parent.name == "bench" for r in records)
        assert not {r.id for r in records} & train_ids
    verbose = json.loads((root / "heldout" / "captions_verbose.json").read_text())
    # a verbose caption names every object of its scene
    for rec, scene in zip(verbose, data.bench):
        assert all(f"{o.color} {o.shape}" in rec["conversations"][1]["value"] for o in scene.objects)
    classes = json.loads((root / "heldout" / "content_words.json").read_text())
    assert {w for words in classes.values() for w in words} == CONTENT_WORDS
    assert sum(map(len, classes.values())) == len(CONTENT_WORDS)  # every word in one class
    assert {o.color for s in data.bench for o in s.objects} <= set(classes["colour"])
    # the text oracle's input: each held-out record carries its scene in the LLM's own words
    for style in ("terse", "verbose"):
        raw = json.loads((root / "heldout" / f"captions_{style}.json").read_text())
        assert [r["scene_text"] for r in raw] == [language.own_style(s) for s in data.bench]
    assert all("scene_text" not in r for records in data.captions.values() for r in records)


def test_heldout_files_are_deterministic(world, tmp_path):
    root, _, _ = world
    ws = resolve_size("smoke")
    write_world_data(tmp_path, make_world_data(ws, 0), ws.image_size)
    for rel in ("heldout/captions_terse.json", "heldout/captions_verbose.json", "heldout/content_words.json",
                "bench/toy_mcq.tsv"):
        assert (tmp_path / rel).read_bytes() == (root / rel).read_bytes(), rel
