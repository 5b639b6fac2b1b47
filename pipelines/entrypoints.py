"""The stage registry and its entry points: params in, dpa_core call, outputs + MLflow out.

One function per stage, the same for DVC (`dpa stage NAME`) and for Prefect tasks (which run the
DVC stage). Each returns a `StageOutput` naming what it wrote; all ML lives in dpa_core. `STAGES` is
the one registry of stages (entry point, whether it takes an arm and a seed, whether it trains,
whether a failure may be transient): the CLI, the Prefect flow and the tests read it; `Layout` is
where every stage writes (dvc.yaml uses the same paths).
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from dpa_core.errors import DPAInputError
from dpa_core.io import read_json, write_json_atomic

from .params import Params
from .tracking import MlflowStepLogger, StageRun, Tracker, tracking_uri

if TYPE_CHECKING:
    from dpa_core.settings import ModelPaths, TrainSettings


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
    def eval_ceiling(self) -> Path: return self.eval_reference() / "ceiling"
    def reliance(self, arm: str, seed: int) -> Path: return self.root / "reliance" / f"{arm}-seed{seed}"
    def compare(self) -> Path: return self.root / "compare"
    def curves(self) -> Path: return self.root / "plots"

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


def _parent(p: Params, stage: str, arm: str | None, seed: int | None) -> tuple[str, dict[str, str], dict]:
    """Name, tags and params of the parent run a stage is nested under: `ARM-seedN` for an arm,
    one `shared` run for the stages every arm shares (world, mix, proxy-seedN, diagnose-seedN),
    and `study` for the comparison (its table and chart are that run's artifacts)."""
    if arm is None:
        kind = "study" if stage == "compare" else "shared"
        return kind, {"dpa.profile": p.profile, "dpa.arm": kind}, {"profile": p.profile}
    tags = {k: v for k, v in _run_tags(p, arm, seed).items() if not k.startswith("prefect.")}
    params = {"arm": arm, "seed": seed, "profile": p.profile}
    if arm in p.arms:
        a = p.arms[arm]
        params |= {"proxy": str(a.proxy).lower(), "loss": a.loss, "align": str(a.align).lower()}
    return f"{arm}-seed{seed}", tags, params


@contextmanager
def tracked(p: Params, stage: str, arm: str | None, seed: int | None, params: dict) -> Iterator[StageRun]:
    """A nested MLflow run for this stage under its parent run (no-op on non-main processes)."""
    tracker = _tracker(p)
    if tracker is None:
        yield _NullRun()
        return
    tags = _run_tags(p, arm, seed)
    parent = tracker.parent_run(*_parent(p, stage, arm, seed))
    name = stage if seed is None or arm else f"{stage}-seed{seed}"
    with tracker.stage_run(parent, name, {**tags, "dpa.stage": stage}) as run:
        run.params(params)
        yield run


# ---- params -> dpa_core: the schema's sections are dpa_core's settings (dpa_core/settings.py) -----

def model_paths(p: Params) -> ModelPaths:
    """p.model, once its directories are there."""
    for key in ("vision", "llm"):
        path = getattr(p.model, key)
        if not (path / "config.json").is_file():
            raise DPAInputError(f"model.{key} = {str(path)!r} is not a model directory (no config.json).",
                                file="params.yaml",
                                fix="run the `world` stage for the toy models, or download the model there "
                                "(see the profile's header).")
    return p.model


def preflight(p: Params):
    """The model pair and the data code checked against each other and against every stage's
    max_length (dpa_core.preflight); run first by every training stage and by `dpa validate`."""
    from dpa_core.preflight import preflight as check

    paths = model_paths(p)
    return check(paths.vision, paths.llm, paths.image_token, paths.add_image_token,
                 multimodal_lengths={"align.max_length": p.align.max_length,
                                     "finetune.max_length": p.finetune.max_length},
                 text_lengths={"proxy.max_length": p.proxy.max_length})


def _section_as_run(section, settings: TrainSettings) -> dict:
    """A training section for MLflow, with the training settings the run used (its seed and, for
    finetune, the connector rate) in place of the section's."""
    return {**asdict(section), "train": asdict(settings)}


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
        manifest = build_world(p.world.out, p.world.size, p.world.seed,
                               overrides={"verbose_style": p.world.verbose_style}, base_models=p.world.base_models)
        gap = read_json(Path(p.world.out) / "metrics" / "prior_gap.json")
        timings = manifest.pop("timings_s", {})
        metrics = _numeric(gap, "prior_gap") | _numeric(manifest, "world")
        run.metrics(metrics)
        _log_timings(p, run, timings, "world")
        write_json_atomic(layout(p).metrics("world"), metrics)
        return StageOutput("world", Path(p.world.out), metrics)


def mix(p: Params) -> StageOutput:
    from dpa_core.mixing import check_sources, mix_captions

    if not Path(p.data.root).is_dir():
        toy = Path(p.world.out).resolve().is_relative_to(Path(p.data.root).resolve())
        raise DPAInputError(f"data.root ({p.data.root}) does not exist yet.", file=p.data.root,
                            fix="run the world stage first (`dvc repro world`; it builds the toy data there)" if toy
                            else "download the profile's data there first (see its header in conf/profile/).")
    # Every data source of the study, instructions too: a bad instruction record stops the study
    # here, not at finetune after the proxy and both alignments ran.
    check_sources([(s.path, s.image_root) for s in p.data.instructions], image_token=p.model.image_token,
                  require_image=False)
    out = layout(p).mix()
    with tracked(p, "mix", None, None, {"mix": asdict(p.mix), "captions": [asdict(c) for c in p.data.captions]}) as run:
        stats = mix_captions(p.data.captions, out, total=p.mix.total, seed=p.mix.seed, dedup_records=p.mix.dedup)
        run.metrics(stats)
        run.artifact(out / "stats.json")
        write_json_atomic(layout(p).metrics("mix"), stats)
        return StageOutput("mix", out, stats)


def proxy(p: Params, seed: int) -> StageOutput:
    from dpa_core.stages import proxy_pretrain

    preflight(p)
    out = layout(p).proxy(seed)
    corpus = _require(layout(p).mix() / "text_corpus.jsonl", "mix")
    settings = p.train_settings("proxy", seed)
    with tracked(p, "proxy", None, seed, {"proxy": _section_as_run(p.proxy, settings), "seed": seed}) as run:
        res = proxy_pretrain(p.model.llm, corpus, out, lora=p.proxy.lora, settings=settings,
                             max_length=p.proxy.max_length, sequence_end=p.proxy.sequence_end,
                             callbacks=[MlflowStepLogger(run)])
        run.metrics(res.metrics)
        _log_timings(p, run, res.timings, "proxy", None, seed)
        run.artifact(out)
        write_json_atomic(layout(p).metrics("proxy", None, seed), res.metrics)
        return StageOutput("proxy", out, res.metrics)


def diagnose(p: Params, seed: int) -> StageOutput:
    """The proxy stage's two jobs, measured: perplexity of the base and the proxy LLM on each caption
    source's held-out text (did it learn the captions' language?), and the text-oracle ceiling answered
    by the proxy LLM (did it keep what the base LLM could read from a scene told in words?)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpa_core.data import load_text_records
    from dpa_core.diagnose import perplexity_by_source
    from dpa_core.evaluation.evaluate import evaluate_text_oracles
    from dpa_core.io import atomic_dir
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
        proxy_llm = load_proxy_llm(Path(p.model.llm), adapter)
        prox = perplexity_by_source(proxy_llm, tok, holdout)
        metrics = {**{f"ppl/base/{k}": v for k, v in base.items()}, **{f"ppl/proxy/{k}": v for k, v in prox.items()},
                   **{f"ppl/proxy_over_base/{k}": prox[k] / base[k] for k in base}}
        # The base LLM's own ceiling is the evaluate_reference stage's; compare shows the two rows together.
        ceiling = evaluate_text_oracles(p.model.llm, _benchmarks(p), out, batch_size=p.evaluate.batch_size,
                                        max_new_tokens=p.evaluate.max_new_tokens, limit=p.evaluate.limit,
                                        language_model=proxy_llm, provenance={"proxy_adapter": str(adapter.resolve())})
        if ceiling is None:  # no benchmark carries scene text: nothing to ask the proxy
            with atomic_dir(out) as tmp:
                write_json_atomic(tmp / "scores.json", {})
        else:
            metrics |= {f"text_oracle/proxy/{k}": v for k, v in ceiling.items()
                        if isinstance(v, (int, float)) and not k.startswith("meta/")}
            run.artifact(out / "scores.json")
        write_json_atomic(layout(p).metrics("diagnose", None, seed), metrics)
        run.metrics(metrics)
        return StageOutput("diagnose", out, metrics)


def align(p: Params, arm: str, seed: int) -> StageOutput:
    from dpa_core.stages import DataSource, align as align_stage, untrained_connector

    preflight(p)
    out = layout(p).align(arm, seed)
    settings = p.train_settings("align", seed)
    if not p.arm(arm).align:  # the no-alignment control: the starting connector, untrained
        with tracked(p, "align", arm, seed, {"align": "skipped (arm align: false)", "seed": settings.seed}) as run:
            res = untrained_connector(model_paths(p), out, seed=settings.seed)
            run.metrics(res.metrics)
            write_json_atomic(layout(p).metrics("align", arm, seed), res.metrics)
            return StageOutput("align", out, res.metrics)
    use_proxy = p.arm(arm).proxy
    mix_dir = _require(layout(p).mix(), "mix")
    info = read_json(mix_dir / "mix.json")
    lc = p.loss_config(arm, "align")
    with tracked(p, "align", arm, seed, {"align": _section_as_run(p.align, settings), "loss": asdict(lc),
                                         "proxy": use_proxy}) as run:
        res = align_stage(model_paths(p), [DataSource(mix_dir / "captions.json", Path(info["image_root"]))], out,
                          loss=lc, settings=settings,
                          proxy_adapter=_require(layout(p).proxy(seed), "proxy") if use_proxy else None,
                          max_length=p.align.max_length, image_aspect_ratio=p.align.image_aspect_ratio,
                          sequence_end=p.align.sequence_end, callbacks=[MlflowStepLogger(run)])
        run.metrics(res.metrics)
        _log_timings(p, run, res.timings, "align", arm, seed)
        run.artifact(out)
        write_json_atomic(layout(p).metrics("align", arm, seed), res.metrics)
        return StageOutput("align", out, res.metrics)


def reliance(p: Params, arm: str, seed: int) -> StageOutput:
    """Image reliance of the aligned connector, with the LLM it was aligned against, on held-out captions."""
    from dpa_core.io import atomic_dir
    from dpa_core.reliance import connector_reliance, flat_reliance

    out = layout(p).reliance(arm, seed)
    connector = _require(layout(p).align(arm, seed) / "connector.safetensors", "align")
    r = p.reliance
    adapter = _require(layout(p).proxy(seed), "proxy") if p.arm(arm).proxy else None
    with tracked(p, "reliance", arm, seed, {"reliance": asdict(r), "proxy": adapter is not None}) as run:
        if r.captions:
            result = connector_reliance(model_paths(p), connector, r.captions, proxy_adapter=adapter,
                                        content_words_file=Path(r.content_words) if r.content_words else None,
                                        batch_size=r.batch_size, max_length=r.max_length, limit=r.limit)
        else:
            print("[dpa] reliance: no held-out captions configured (reliance.captions); nothing measured.", flush=True)
            result = {}
        metrics = flat_reliance(result)
        with atomic_dir(out) as tmp:
            write_json_atomic(tmp / "scores.json", metrics)
            write_json_atomic(tmp / "reliance.json", {"arm": arm, "seed": seed, "proxy": adapter is not None,
                                                      "content_words": r.content_words, "sets": result})
        write_json_atomic(layout(p).metrics("reliance", arm, seed), metrics)
        run.metrics(metrics, on_parent=True)
        run.artifact(out / "reliance.json")
        return StageOutput("reliance", out, metrics)


def finetune(p: Params, arm: str, seed: int) -> StageOutput:
    from dpa_core.stages import finetune as finetune_stage

    preflight(p)
    out = layout(p).finetune(arm, seed)
    connector = _require(layout(p).align(arm, seed) / "connector.safetensors", "align")
    lc = p.loss_config(arm, "finetune")
    settings = p.train_settings("finetune", seed)
    with tracked(p, "finetune", arm, seed, {"finetune": _section_as_run(p.finetune, settings),
                                            "loss": asdict(lc)}) as run:
        res = finetune_stage(model_paths(p), connector, p.data.instructions, out, loss=lc, settings=settings,
                             tune=p.finetune.tune, lora=p.finetune.lora,
                             max_length=p.finetune.max_length, image_aspect_ratio=p.finetune.image_aspect_ratio,
                             image_first=p.finetune.image_first, system_prompt=p.finetune.system_prompt,
                             callbacks=[MlflowStepLogger(run)])
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


def evaluation_settings(p: Params) -> dict:
    """evaluate_all's settings from params.yaml (the evaluate stage and `dpa eval` share them)."""
    return dict(batch_size=p.evaluate.batch_size, max_new_tokens=p.evaluate.max_new_tokens,
                limit=p.evaluate.limit, lmu_data=p.evaluate.lmu_data)


def _evaluate_dir(p: Params, model_dir: Path, out: Path, run: StageRun) -> dict:
    from dpa_core.evaluation import evaluate_all

    scores = evaluate_all(model_dir, _benchmarks(p), out, **evaluation_settings(p))
    run.metrics(scores)
    run.metrics(headline_scores(scores), on_parent=True)  # the parent's columns: one score per benchmark
    for f in ("scores.json",):
        if (out / f).exists():
            run.artifact(out / f)
    return scores


def headline_scores(scores: dict) -> dict[str, float]:
    """One score per benchmark (its overall accuracy) and their mean, `average`, as in the comparison."""
    from .compare import AVERAGE, headline_keys

    numeric = {k: float(v) for k, v in scores.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("meta/")}
    heads = headline_keys(numeric)
    return {AVERAGE: sum(numeric[k] for k in heads) / len(heads), **{k: numeric[k] for k in heads}} if heads else {}


def evaluate(p: Params, arm: str, seed: int) -> StageOutput:
    out = layout(p).eval(arm, seed)
    model_dir = _require(layout(p).merged(arm, seed), "merge")
    with tracked(p, "evaluate", arm, seed, {"evaluate": asdict(p.evaluate)}) as run:
        scores = _evaluate_dir(p, model_dir, out, run)
        write_json_atomic(layout(p).metrics("evaluate", arm, seed), scores)
        return StageOutput("evaluate", out, scores)


def evaluate_reference(p: Params) -> StageOutput:
    """The base models before any training (connector freshly initialised, seed 0) as a reference row,
    and the text-oracle ceiling (the base LLM alone, told each scene in words) where a benchmark has
    scene text."""
    import shutil
    import torch

    from dpa_core.evaluation.evaluate import evaluate_text_oracles, text_oracle_specs
    from dpa_core.io import atomic_dir
    from dpa_core.modeling import build_llava, save_llava

    out = layout(p).eval_reference()
    if not p.evaluate.reference_row:
        with atomic_dir(out) as tmp:
            write_json_atomic(tmp / "scores.json", {"enabled": 0})
        return StageOutput("evaluate_reference", out, {})
    paths = model_paths(p)
    with tracked(p, "evaluate", "reference", 0, {"evaluate": asdict(p.evaluate)}) as run:
        torch.manual_seed(0)
        model, processor = build_llava(paths.vision, paths.llm, image_token=paths.image_token,
                                       add_image_token=paths.add_image_token)
        model_dir = out.with_name(out.name + ".model")
        save_llava(model, processor, model_dir)
        del model
        try:
            scores = _evaluate_dir(p, model_dir, out, run)
        finally:
            shutil.rmtree(model_dir, ignore_errors=True)
    if text_oracle_specs(_benchmarks(p)):  # a benchmark TSV with a scene_text column
        with tracked(p, "evaluate", "ceiling", 0, {"evaluate": asdict(p.evaluate), "text_oracle": True}) as run:
            ceiling = evaluate_text_oracles(paths.llm, _benchmarks(p), layout(p).eval_ceiling(),
                                            batch_size=p.evaluate.batch_size,
                                            max_new_tokens=p.evaluate.max_new_tokens, limit=p.evaluate.limit)
            run.metrics(ceiling, on_parent=True)
            run.artifact(layout(p).eval_ceiling() / "scores.json")
    return StageOutput("evaluate_reference", out, scores)


def compare(p: Params) -> StageOutput:
    from .compare import build_comparison

    out = layout(p).compare()
    with tracked(p, "compare", None, None, {"study": asdict(p.study)}) as run:
        result = build_comparison(p, layout(p), out, log_parent=_parent_logger(p))
        run.metrics(result["metrics"])
        # The study run's columns: each arm's average minus Vanilla's, with its 95% CI (the rest is
        # in its table and in the nested compare run).
        diffs = [k for k in result["metrics"] if re.fullmatch(r"[^/]+_minus_[^/]+/average", k)]
        run.metrics({k + tail: result["metrics"][k + tail] for k in diffs for tail in ("", "/ci_low", "/ci_high")
                     if k + tail in result["metrics"]}, on_parent=True)
        write_json_atomic(layout(p).metrics("compare"), result["metrics"])
        write_json_atomic(layout(p).metrics("compare_plot"), result["plot"])
        for f in ("comparison.md", "comparison.csv", "comparison.png", "metrics.json"):
            run.artifact(out / f, on_parent=True)  # on the study-level run
        if run.tracker is not None and run.tracker.active:
            arm_keys = {k.split("/", 1)[1] for k in result["metrics"] if k.split("/", 1)[0] in p.study.arms}
            run.tracker.save_runs_view([*headline_scores(dict.fromkeys(arm_keys, 0.0)), *diffs])
            print(f"[dpa] MLflow: {run.tracker.runs_view_url()} (after `mlflow ui`, see README)", flush=True)
        return StageOutput("compare", out, result["metrics"])


def _parent_logger(p: Params):
    """Logs metrics straight onto an arm's parent run (the compare figures, beside its scores)."""
    tracker = _tracker(p)
    if tracker is None:
        return None

    def log(arm: str, seed: int, metrics: dict) -> None:
        tags = {k: v for k, v in _run_tags(p, arm, seed).items() if not k.startswith("prefect.")}
        StageRun(tracker, tracker.parent_run(f"{arm}-seed{seed}", tags), None).metrics(metrics)
        tracker.report()
        tracker.failures.clear()

    return log


def curve_records(history: list[dict], run: str, **fields) -> list[dict]:
    """The per-step records of a training history, flat for a DVC plot: step, loss, learning_rate
    and the mean token weight of the loss (CMO/CAL statistics; plain CE weighs every token 1)."""
    rows = []
    for rec in history:
        if "loss" not in rec or "step" not in rec:
            continue  # the Trainer's end-of-training summary
        weight = next((v for k, v in rec.items() if k.endswith("/weight_mean")), 1.0)
        rows.append({"run": run, **fields, "step": rec["step"], "loss": rec["loss"],
                     "learning_rate": rec.get("learning_rate"), "weight_mean": weight})
    return rows


def curves(p: Params) -> StageOutput:
    """Loss, learning rate and token-weight curves of every training stage, one file per stage with
    every arm and seed in it (a `run` field per record): dvc.yaml's plots overlay the arms."""
    from dpa_core.io import atomic_dir

    lay, out = layout(p), layout(p).curves()
    per_stage: dict[str, list[dict]] = {"proxy": [], "align": [], "finetune": []}
    for seed in p.study.seeds:
        per_stage["proxy"] += curve_records(read_json(_require(lay.proxy(seed) / "history.json", "proxy")),
                                            f"proxy-seed{seed}", arm="proxy", seed=seed)
        for arm in p.study.arms:
            for stage in ("align", "finetune"):
                d = lay.align(arm, seed) if stage == "align" else lay.finetune(arm, seed)
                per_stage[stage] += curve_records(read_json(_require(d / "history.json", stage)),
                                                  f"{arm}-seed{seed}", arm=arm, seed=seed)
    with atomic_dir(out) as tmp:
        for stage, rows in per_stage.items():
            write_json_atomic(tmp / f"{stage}.json", rows)
    return StageOutput("curves", out, {stage: len(rows) for stage, rows in per_stage.items()})


def _numeric(d: dict, prefix: str) -> dict:
    from .params import flatten

    return {f"{prefix}/{k}": v for k, v in flatten(d).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass(frozen=True)
class Stage:
    """One stage of the study: `dpa stage NAME [--arm A] [--seed N]` calls `fn(params, **kwargs)`."""

    fn: Callable[..., StageOutput]
    arm: bool = False  # one run per arm (DVC: the <name>_proxy / <name> matrix over study.*_arms)
    seed: bool = False  # one run per study seed
    training: bool = False  # runs under `accelerate launch` with runtime.launcher: accelerate
    retry: bool = False  # may fail for transient reasons (out of memory, a preempted GPU): Prefect retries it


STAGES: dict[str, Stage] = {
    "world": Stage(world),
    "mix": Stage(mix),
    "proxy": Stage(proxy, seed=True, training=True, retry=True),
    "diagnose": Stage(diagnose, seed=True),
    "align": Stage(align, arm=True, seed=True, training=True, retry=True),
    "reliance": Stage(reliance, arm=True, seed=True),
    "finetune": Stage(finetune, arm=True, seed=True, training=True, retry=True),
    "merge": Stage(merge, arm=True, seed=True),
    "evaluate": Stage(evaluate, arm=True, seed=True, retry=True),
    "evaluate_reference": Stage(evaluate_reference, retry=True),
    "compare": Stage(compare),
    "curves": Stage(curves),
}
TRAINING_STAGES = tuple(name for name, st in STAGES.items() if st.training)


def expected_stages(p: Params) -> list[str]:
    """The DVC stage names dvc.yaml yields for validated params (DVC's matrix naming): per-arm stages
    split into `<name>_proxy@ARM-SEED` (proxy arms) and `<name>@ARM-SEED` (plain arms)."""
    s, out = p.study, []
    for name, st in STAGES.items():
        if st.arm:
            out += [f"{name}_proxy@{a}-{x}" for a in s.proxy_arms for x in s.seeds]
            out += [f"{name}@{a}-{x}" for a in s.plain_arms for x in s.seeds]
        elif st.seed:
            out += [f"{name}@{x}" for x in s.seeds]
        else:
            out.append(name)
    return out
