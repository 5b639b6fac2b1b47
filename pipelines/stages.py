"""Stage entry points: params in, dpa_core call, outputs + MLflow out.

One function per stage, the same for DVC (`dpa stage NAME`) and for Prefect tasks. Each returns a
`StageOutput` naming what it wrote; all ML lives in dpa_core.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from dpa_core.errors import DPAInputError
from dpa_core.io import read_json, write_json_atomic
from dpa_core.losses import LossConfig
from dpa_core.trainer import TrainSettings

from .params import Params
from .tracking import MlflowStepLogger, StageRun, Tracker, tracking_uri

TRAINING_STAGES = ("proxy", "align", "finetune")


@dataclass(frozen=True)
class Layout:
    """Where every stage writes (relative to the project root); dvc.yaml uses the same paths."""

    root: Path

    def mix(self) -> Path: return self.root / "mix"
    def proxy(self, seed: int) -> Path: return self.root / "proxy" / f"seed{seed}"
    def diagnose(self, seed: int) -> Path: return self.root / "diagnose" / f"seed{seed}"
    def align(self, arm: str, seed: int) -> Path: return self.root / "align" / f"{arm}-seed{seed}"
    def finetune(self, arm: str, seed: int) -> Path: return self.root / "finetune" / f"{arm}-seed{seed}"
    def merged(self, arm: str, seed: int) -> Path: return self.root / "merged" / f"{arm}-seed{seed}"
    def eval(self, arm: str, seed: int) -> Path: return self.root / "eval" / f"{arm}-seed{seed}"
    def eval_reference(self) -> Path: return self.root / "eval_reference"
    def compare(self) -> Path: return self.root / "compare"

    def metrics(self, stage: str, arm: str | None = None, seed: int | None = None) -> Path:
        """DVC metrics file of a stage (outside its output dir: DVC outputs must not overlap)."""
        name = "-".join([stage] + ([arm] if arm else []) + ([f"seed{seed}"] if seed is not None else []))
        return self.root / "metrics" / f"{name}.json"

    def timings(self, stage: str, arm: str | None = None, seed: int | None = None) -> Path:
        """Wall-clock figures of a stage: not a DVC output or metric (they differ on every run, and
        inside an output they made DVC rerun everything downstream of identical weights)."""
        return self.root / "timings" / self.metrics(stage, arm, seed).name


@dataclass
class StageOutput:
    stage: str
    out_dir: Path
    metrics: dict = field(default_factory=dict)


def layout(p: Params) -> Layout:
    return Layout(Path(p.runtime.outputs))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---- tracking glue ------------------------------------------------------------------------------

def _tracker(p: Params) -> Tracker | None:
    return Tracker(tracking_uri(p.tracking.uri), p.tracking.experiment) if is_main_process() else None


def _run_tags(p: Params, arm: str | None, seed: int | None) -> dict[str, str]:
    tags = {"dpa.profile": p.profile, "dpa.arm": arm or "shared", "dpa.seed": str(seed if seed is not None else "-")}
    if arm and arm in p.arms:
        tags |= {"dpa.proxy": str(p.arms[arm].proxy).lower(), "dpa.loss": p.arms[arm].loss}
    flow_run = os.environ.get("DPA_PREFECT_FLOW_RUN_ID")
    if flow_run:
        tags["prefect.flow_run_id"] = flow_run
    return tags


class _NullRun(StageRun):
    def __init__(self):
        super().__init__(tracker=None, run_id=None, parent_id=None)

    def params(self, *a, **k): pass
    def metrics(self, *a, **k): pass
    def artifact(self, *a, **k): pass
    def tag(self, *a, **k): pass


@contextmanager
def tracked(p: Params, stage: str, arm: str | None, seed: int | None, params: dict) -> Iterator[StageRun]:
    """A nested MLflow run for this stage under its arm's parent run (no-op on non-main processes)."""
    tracker = _tracker(p)
    if tracker is None:
        yield _NullRun()
        return
    tags = _run_tags(p, arm, seed)
    parent = tracker.parent_run(f"{arm}-seed{seed}" if arm else "shared",
                                {k: v for k, v in tags.items() if not k.startswith("prefect.")})
    name = stage if seed is None or arm else f"{stage}-seed{seed}"
    with tracker.stage_run(parent, name, {**tags, "dpa.stage": stage}) as run:
        run.params(params)
        yield run


# ---- conversions params -> dpa_core -------------------------------------------------------------

def train_settings(section, seed: int) -> TrainSettings:
    return TrainSettings(**asdict(section.train), seed=seed)


def loss_config(p: Params, arm: str, stage: str) -> LossConfig:
    kind = p.arm(arm).loss
    if kind != "vanilla" and not (p.loss.cmo_in_align if stage == "align" else p.loss.cmo_in_finetune):
        kind = "vanilla"
    l = p.loss
    return LossConfig(kind, delta_min=l.delta_min, delta_max=l.delta_max, cal_min=l.cal_min, cal_max=l.cal_max,
                      window=l.window, smoothing=l.smoothing, image_free=l.image_free)


def model_paths(p: Params):
    from dpa_core.stages import ModelPaths

    for key in ("vision", "llm"):
        path = Path(getattr(p.model, key))
        if not (path / "config.json").is_file():
            raise DPAInputError(f"model.{key} = {str(path)!r} is not a model directory (no config.json).",
                                file="params.yaml",
                                fix="run the `world` stage for the toy models, or download the model there "
                                "(see the profile's header).")
    return ModelPaths(Path(p.model.vision), Path(p.model.llm), p.model.image_token, p.model.add_image_token)


def preflight(p: Params):
    """The model pair and the data code checked against each other and against every stage's
    max_length (dpa_core.preflight); run first by every training stage and by `dpa validate`."""
    from dpa_core.preflight import preflight as check

    paths = model_paths(p)
    return check(paths.vision, paths.llm, paths.image_token, paths.add_image_token,
                 multimodal_lengths={"align.max_length": p.align.max_length,
                                     "finetune.max_length": p.finetune.max_length},
                 text_lengths={"proxy.max_length": p.proxy.max_length})


def _log_timings(p: Params, run: StageRun, timings: dict, stage: str, arm: str | None = None,
                 seed: int | None = None) -> None:
    if timings:
        run.metrics({f"time/{k}": v for k, v in timings.items()})
        write_json_atomic(layout(p).timings(stage, arm, seed), timings)


def _require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise DPAInputError(f"input {path} does not exist.", file=path,
                            fix=f"run the stage that produces it first (dvc repro runs {stage} in order).")
    return path


# ---- stages -------------------------------------------------------------------------------------

def world(p: Params) -> StageOutput:
    from dpa_core.toyworld import build_world

    with tracked(p, "world", None, None, {"world": asdict(p.world)}) as run:
        manifest = build_world(p.world.out, p.world.size, p.world.seed)
        gap = read_json(Path(p.world.out) / "metrics" / "prior_gap.json")
        timings = manifest.pop("timings_s", {})
        metrics = _numeric(gap, "prior_gap") | _numeric(manifest, "world")
        run.metrics(metrics)
        _log_timings(p, run, timings, "world")
        write_json_atomic(layout(p).metrics("world"), metrics)
        return StageOutput("world", Path(p.world.out), metrics)


def mix(p: Params) -> StageOutput:
    from dpa_core.mixing import MixSource, check_sources, mix_captions

    sources = [MixSource(c.name, Path(c.path), Path(c.image_root), c.weight, c.count) for c in p.data.captions]
    # Every data source of the study, instructions too: a bad instruction record stops the study
    # here, not at finetune after the proxy and both alignments ran.
    check_sources([(Path(s.path), Path(s.image_root)) for s in p.data.instructions], image_token=p.model.image_token)
    out = layout(p).mix()
    with tracked(p, "mix", None, None, {"mix": asdict(p.mix), "captions": [asdict(c) for c in p.data.captions]}) as run:
        stats = mix_captions(sources, out, total=p.mix.total, seed=p.mix.seed, dedup_records=p.mix.dedup)
        run.metrics(stats)
        run.artifact(out / "stats.json")
        write_json_atomic(layout(p).metrics("mix"), stats)
        return StageOutput("mix", out, stats)


def proxy(p: Params, seed: int) -> StageOutput:
    from dpa_core.stages import LoraSettings, proxy_pretrain

    preflight(p)
    out = layout(p).proxy(seed)
    corpus = _require(layout(p).mix() / "text_corpus.jsonl", "mix")
    with tracked(p, "proxy", None, seed, {"proxy": asdict(p.proxy), "seed": seed}) as run:
        res = proxy_pretrain(Path(p.model.llm), corpus, out, lora=LoraSettings(**asdict(p.proxy.lora)),
                             settings=train_settings(p.proxy, seed), max_length=p.proxy.max_length,
                             callbacks=[MlflowStepLogger(run)])
        run.metrics(res.metrics)
        _log_timings(p, run, res.timings, "proxy", None, seed)
        run.artifact(out)
        write_json_atomic(layout(p).metrics("proxy", None, seed), res.metrics)
        return StageOutput("proxy", out, res.metrics)


def diagnose(p: Params, seed: int) -> StageOutput:
    """Perplexity of the base and the proxy LLM on each caption source's held-out text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpa_core.data import load_text_records
    from dpa_core.diagnose import perplexity_by_source
    from dpa_core.stages import load_proxy_llm

    out = layout(p).diagnose(seed)
    holdout_file = _require(layout(p).mix() / "text_holdout.jsonl", "mix")
    holdout = load_text_records(holdout_file)
    if not holdout:  # the mix refuses this; an older mix output may still hold it
        raise DPAInputError("the mix's held-out text is empty, so there is nothing to measure.", file=holdout_file,
                            fix="raise mix.total (each caption source needs at least 10 records) and rerun the mix.")
    adapter = _require(layout(p).proxy(seed), "proxy")
    tok = AutoTokenizer.from_pretrained(p.model.llm)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    with tracked(p, "diagnose", None, seed, {"seed": seed}) as run:
        base = perplexity_by_source(AutoModelForCausalLM.from_pretrained(p.model.llm), tok, holdout)
        prox = perplexity_by_source(load_proxy_llm(Path(p.model.llm), adapter), tok, holdout)
        metrics = {**{f"ppl/base/{k}": v for k, v in base.items()}, **{f"ppl/proxy/{k}": v for k, v in prox.items()},
                   **{f"ppl/proxy_over_base/{k}": prox[k] / base[k] for k in base}}
        write_json_atomic(layout(p).metrics("diagnose", None, seed), metrics)
        run.metrics(metrics)
        return StageOutput("diagnose", out, metrics)


def align(p: Params, arm: str, seed: int) -> StageOutput:
    from dpa_core.stages import DataSource, align as align_stage

    preflight(p)
    use_proxy = p.arm(arm).proxy
    mix_dir = _require(layout(p).mix(), "mix")
    info = read_json(mix_dir / "mix.json")
    out = layout(p).align(arm, seed)
    lc = loss_config(p, arm, "align")
    with tracked(p, "align", arm, seed, {"align": asdict(p.align), "loss": asdict(lc), "proxy": use_proxy}) as run:
        res = align_stage(model_paths(p), [DataSource(mix_dir / "captions.json", Path(info["image_root"]))], out,
                          loss=lc, settings=train_settings(p.align, seed),
                          proxy_adapter=_require(layout(p).proxy(seed), "proxy") if use_proxy else None,
                          max_length=p.align.max_length, callbacks=[MlflowStepLogger(run)])
        run.metrics(res.metrics)
        _log_timings(p, run, res.timings, "align", arm, seed)
        run.artifact(out)
        write_json_atomic(layout(p).metrics("align", arm, seed), res.metrics)
        return StageOutput("align", out, res.metrics)


def finetune(p: Params, arm: str, seed: int) -> StageOutput:
    from dpa_core.stages import DataSource, LoraSettings, finetune as finetune_stage

    preflight(p)
    out = layout(p).finetune(arm, seed)
    connector = _require(layout(p).align(arm, seed) / "connector.safetensors", "align")
    sources = [DataSource(Path(s.path), Path(s.image_root)) for s in p.data.instructions]
    lc = loss_config(p, arm, "finetune")
    with tracked(p, "finetune", arm, seed, {"finetune": asdict(p.finetune), "loss": asdict(lc)}) as run:
        res = finetune_stage(model_paths(p), connector, sources, out, loss=lc, settings=train_settings(p.finetune, seed),
                             tune=p.finetune.tune, lora=LoraSettings(**asdict(p.finetune.lora)),
                             max_length=p.finetune.max_length, callbacks=[MlflowStepLogger(run)])
        run.metrics(res.metrics)
        _log_timings(p, run, res.timings, "finetune", arm, seed)
        if p.finetune.tune == "lora":
            run.artifact(out / "adapter", "adapter")
        write_json_atomic(layout(p).metrics("finetune", arm, seed), res.metrics)
        return StageOutput("finetune", out, res.metrics)


def merge(p: Params, arm: str, seed: int) -> StageOutput:
    from dpa_core.stages import merge as merge_stage

    out = layout(p).merged(arm, seed)
    with tracked(p, "merge", arm, seed, {"tune": p.finetune.tune}) as run:
        res = merge_stage(model_paths(p), _require(layout(p).finetune(arm, seed), "finetune"), out)
        run.tag("dpa.checkpoint_path", str(out.resolve()))
        if p.tracking.log_checkpoints:
            run.artifact(out, "merged_model")
        return StageOutput("merge", out, res.metrics)


def _benchmarks(p: Params) -> list[dict]:
    return [{k: v for k, v in asdict(b).items() if v is not None} for b in p.evaluate.benchmarks]


def _evaluate_dir(p: Params, model_dir: Path, out: Path, run: StageRun) -> dict:
    from dpa_core.evaluation import evaluate_all

    scores = evaluate_all(model_dir, _benchmarks(p), out, batch_size=p.evaluate.batch_size,
                          max_new_tokens=p.evaluate.max_new_tokens, limit=p.evaluate.limit,
                          lmu_data=p.evaluate.lmu_data)
    run.metrics(scores, on_parent=True)
    for f in ("scores.json",):
        if (out / f).exists():
            run.artifact(out / f)
    return scores


def evaluate(p: Params, arm: str, seed: int) -> StageOutput:
    out = layout(p).eval(arm, seed)
    model_dir = _require(layout(p).merged(arm, seed), "merge")
    with tracked(p, "evaluate", arm, seed, {"evaluate": asdict(p.evaluate)}) as run:
        scores = _evaluate_dir(p, model_dir, out, run)
        write_json_atomic(layout(p).metrics("evaluate", arm, seed), scores)
        return StageOutput("evaluate", out, scores)


def evaluate_reference(p: Params) -> StageOutput:
    """The base models before any training (connector freshly initialised, seed 0) as a reference row."""
    import shutil
    import torch

    from dpa_core.io import atomic_dir
    from dpa_core.modeling import build_llava, save_llava

    out = layout(p).eval_reference()
    if not p.evaluate.reference_row:
        with atomic_dir(out) as tmp:
            write_json_atomic(tmp / "scores.json", {"enabled": 0})
        return StageOutput("evaluate_reference", out, {})
    with tracked(p, "evaluate", "reference", 0, {"evaluate": asdict(p.evaluate)}) as run:
        torch.manual_seed(0)
        paths = model_paths(p)
        model, processor = build_llava(paths.vision, paths.llm, image_token=paths.image_token,
                                       add_image_token=paths.add_image_token)
        model_dir = out.with_name(out.name + ".model")
        save_llava(model, processor, model_dir)
        try:
            scores = _evaluate_dir(p, model_dir, out, run)
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
        return StageOutput("evaluate_reference", out, scores)


def compare(p: Params) -> StageOutput:
    from .compare import build_comparison

    out = layout(p).compare()
    with tracked(p, "compare", None, None, {"study": asdict(p.study)}) as run:
        result = build_comparison(p, layout(p), out)
        run.metrics(result["metrics"])
        write_json_atomic(layout(p).metrics("compare"), result["metrics"])
        write_json_atomic(layout(p).metrics("compare_plot"), result["plot"])
        for f in ("comparison.md", "comparison.csv", "comparison.png", "metrics.json"):
            run.artifact(out / f)
        return StageOutput("compare", out, result["metrics"])


def _numeric(d: dict, prefix: str) -> dict:
    from .tracking import _flatten

    return {f"{prefix}/{k}": v for k, v in _flatten(d).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


STAGES = {
    "world": world, "mix": mix, "proxy": proxy, "diagnose": diagnose, "align": align, "finetune": finetune,
    "merge": merge, "evaluate": evaluate, "evaluate_reference": evaluate_reference, "compare": compare,
}
