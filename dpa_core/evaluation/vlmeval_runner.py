"""Evaluate a Llava checkpoint on a VLMEvalKit dataset by name (MMBench_DEV_EN, AI2D_TEST, OCRBench,
DocVQA_VAL, NaturalBenchDataset, ... or a custom TSV placed in LMUData), with VLMEvalKit's own
prompts (LLaVA's for multiple choice), answer extraction and metrics.

Data: VLMEvalKit reads `<LMUData>/<file>.tsv` (env var LMUData, or the `lmu_data` argument). With
allow_download=False (the default: this machine and the pipeline run offline) a dataset whose TSV is
not there, or differs from VLMEvalKit's MD5, raises BenchmarkSkipped instead of being fetched.
Judging is VLMEvalKit's exact matching only (no OpenAI judge): datasets that need an LLM judge are skipped.

Writes into out_dir (atomically): scores.json (flat metrics), summary.json (VLMEvalKit's result table),
predictions.jsonl (index, prediction) and VLMEvalKit's own files (<model>_<dataset>.xlsx with its
per-question hit/log, *_acc.csv).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd

from ..errors import BenchmarkSkipped
from ..io import atomic_dir, write_json_atomic
from .flat_metrics import category_key, check_flat, meta_key, metric_part
from .vlmeval_import import VLMEvalUnavailable, import_vlmeval

JUDGE = "exact_matching"


@contextmanager
def lmu_data_root(path: str | os.PathLike | None) -> Iterator[Path]:
    """Point VLMEvalKit at `path` (else $LMUData) for the block; never fall back to its ~/LMUData."""
    chosen = path if path is not None else os.environ.get("LMUData")
    if not chosen or not Path(chosen).is_dir():
        raise BenchmarkSkipped("vlmeval", f"no VLMEvalKit data directory: LMUData={chosen!r} is not a directory. "
                               "Set the LMUData environment variable (or lmu_data) to the folder holding the TSVs.")
    old = os.environ.get("LMUData")
    os.environ["LMUData"] = str(Path(chosen).resolve())
    try:
        yield Path(chosen).resolve()
    finally:
        if old is None:
            os.environ.pop("LMUData", None)
        else:
            os.environ["LMUData"] = old


def expected_tsv(dataset_name: str, root: Path) -> tuple[Path, str | None, str | None]:
    """(local path, md5 or None, download url or None) VLMEvalKit will use for `dataset_name`."""
    from vlmeval.dataset import DATASET_CLASSES

    for cls in DATASET_CLASSES:
        if dataset_name in cls.supported_datasets():
            url = getattr(cls, "DATASET_URL", {}).get(dataset_name) or None
            md5 = getattr(cls, "DATASET_MD5", {}).get(dataset_name)
            return root / (url.split("/")[-1] if url else f"{dataset_name}.tsv"), md5, url
    return root / f"{dataset_name}.tsv", None, None  # a custom dataset: <name>.tsv in LMUData


@contextmanager
def downloads_refused(dataset_name: str, local: Path) -> Iterator[None]:
    """VLMEvalKit fetches a missing or MD5-mismatched TSV with `download_file`, imported into many of
    its modules: replace it there for the block, so nothing is fetched."""
    import sys

    def refuse(url, *args, **kwargs):
        raise BenchmarkSkipped(dataset_name, f"VLMEvalKit wants to download {url} (local file {local} missing or "
                               "different from VLMEvalKit's MD5) and downloads are off. Place the official TSV there, "
                               "or pass allow_download=True on a machine with network.")

    patched = [(m, m.download_file) for name, m in list(sys.modules.items())
               if name.startswith("vlmeval") and m is not None and callable(getattr(m, "download_file", None))]
    for module, _ in patched:
        module.download_file = refuse
    try:
        yield
    finally:
        for module, original in patched:
            module.download_file = original


def _build_dataset(dataset_name: str, root: Path, allow_download: bool):
    from vlmeval.dataset import build_dataset

    local, md5, url = expected_tsv(dataset_name, root)
    if not allow_download and not local.is_file():
        where = f" (VLMEvalKit downloads it from {url})" if url else ""
        raise BenchmarkSkipped(dataset_name, f"TSV not found at {local}{where}; downloads are off. "
                               "Put the file there (LMUData) and run again.")
    guard = downloads_refused(dataset_name, local) if not allow_download else _nothing()
    with guard:
        try:
            dataset = build_dataset(dataset_name)
        except BenchmarkSkipped:
            raise
        except Exception as err:  # noqa: BLE001 - a network failure or a dataset this build cannot load
            raise BenchmarkSkipped(dataset_name, f"VLMEvalKit could not load it: {err!r}") from err
    if dataset is None:
        raise BenchmarkSkipped(dataset_name, f"VLMEvalKit does not know it and {local} is not a usable custom TSV.")
    if type(dataset).__name__ == "CustomVQADataset":  # its evaluate() is not implemented in VLMEvalKit
        raise BenchmarkSkipped(dataset_name, f"{local} has no option columns, and VLMEvalKit cannot score custom "
                               "open questions without a judge. Score it with kind: builtin_tsv instead.")
    return dataset


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def _prompts(model, dataset) -> list[list[dict]]:
    name = dataset.dataset_name
    custom = model.use_custom_prompt(name)
    rows = [dataset.data.iloc[i] for i in range(len(dataset.data))]
    return [model.build_prompt(r, dataset=name) if custom else dataset.build_prompt(r) for r in rows]


def evaluate_vlmeval(
    model_dir: str | os.PathLike | None,
    dataset_name: str,
    out_dir: str | os.PathLike,
    *,
    name: str | None = None,
    lmu_data: str | os.PathLike | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 16,
    device: str = "auto",
    limit: int | None = None,
    allow_download: bool = False,
    generator=None,
) -> dict:
    """Run one VLMEvalKit dataset; returns the flat metrics ("<name>/overall", ...) also in scores.json.
    Raises BenchmarkSkipped (with the reason) when VLMEvalKit or the data is not available."""
    name = metric_part(name or dataset_name)
    try:
        import_vlmeval()
    except VLMEvalUnavailable as err:
        raise BenchmarkSkipped(name, str(err)) from err
    from vlmeval.smp import dump

    from .vlmeval_adapter import MODEL_NAME, DPALlavaVLM

    with lmu_data_root(lmu_data) as root:
        dataset = _build_dataset(dataset_name, root, allow_download)
        if limit is not None:
            dataset.data = dataset.data.iloc[:limit]
        model = DPALlavaVLM(model_dir, device=device, max_new_tokens=max_new_tokens, generator=generator)
        model.set_dump_image(dataset.dump_image)
        start = time.perf_counter()
        replies = model.generate_batch(_prompts(model, dataset), batch_size=batch_size, desc=name)
        seconds = time.perf_counter() - start
        with atomic_dir(out_dir) as tmp:
            data = dataset.data.copy()
            data["prediction"] = [str(r) for r in replies]
            data = data.drop(columns=[c for c in ("image",) if c in data.columns])
            eval_file = str(tmp / f"{MODEL_NAME}_{dataset_name}.xlsx")
            dump(data, eval_file)
            try:
                result = dataset.evaluate(eval_file, model=JUDGE, nproc=1)
            except AssertionError as err:  # VLMEvalKit asserts a working API judge where it needs one
                raise BenchmarkSkipped(name, f"VLMEvalKit's evaluation needs an LLM judge: {err}") from err
            except NotImplementedError as err:
                raise BenchmarkSkipped(name, f"VLMEvalKit has no evaluation for {dataset_name}.") from err
            metrics = check_flat(result_to_metrics(name, result) | {meta_key(name, "n"): len(data),
                                                                   meta_key(name, "seconds"): round(seconds, 3)})
            with open(tmp / "predictions.jsonl", "w", encoding="utf-8") as f:
                for idx, reply in zip(data["index"], data["prediction"]):
                    f.write(json.dumps({"index": str(idx), "prediction": reply}, ensure_ascii=False) + "\n")
            write_json_atomic(tmp / "summary.json", {
                "benchmark": name, "vlmeval_dataset": dataset_name, "lmu_data": str(root), "judge": JUDGE,
                "n": len(data), "result": result_as_json(result),
                "generation": {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "greedy": True,
                               "seconds": round(seconds, 3)},
            })
            write_json_atomic(tmp / "scores.json", metrics)
    return metrics


def result_as_json(result):
    if isinstance(result, pd.DataFrame):
        return json.loads(result.to_json(orient="records"))
    return json.loads(json.dumps(result, default=str))


# ---- VLMEvalKit's evaluate() results as flat metrics ----------------------------------------------
# Its result is a pandas table or a nested dict, per dataset type. Values keep VLMEvalKit's units:
# multiple-choice accuracies are fractions in [0, 1]; some VQA datasets (OCRBench, DocVQA) report
# points or percentages.

def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Number):
        try:
            value = float(value)
        except (TypeError, ValueError):
            return None
    value = float(value)
    return value if math.isfinite(value) else None


def _key(name: str, label: str) -> str:
    return f"{name}/overall" if str(label).strip().lower() == "overall" else category_key(name, label)


def _from_table(name: str, table: pd.DataFrame) -> dict[str, float]:
    rows = table.to_dict(orient="records")
    flat = {}
    for row in rows:
        split = row.pop("split", None)
        prefix = name if len(rows) == 1 or split in (None, "none") else f"{name}/{metric_part(split)}"
        for label, value in row.items():
            number = _number(value)
            if number is not None:
                flat[_key(prefix, label)] = number
    return flat


def _from_dict(name: str, result: dict, prefix: str = "") -> dict[str, float]:
    flat = {}
    for label, value in result.items():
        path = f"{prefix}{metric_part(label)}"
        if isinstance(value, dict):
            flat |= _from_dict(name, value, prefix=f"{path}/")
        elif (number := _number(value)) is not None:
            flat[_key(name, path) if not prefix else f"{name}/{path}"] = number
    return flat


def result_to_metrics(name: str, result) -> dict[str, float]:
    if isinstance(result, pd.DataFrame):
        return _from_table(name, result)
    if isinstance(result, dict):
        return _from_dict(name, result)
    raise TypeError(f"unexpected VLMEvalKit result type {type(result).__name__} for {name}")
