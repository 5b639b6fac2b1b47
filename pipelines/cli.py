"""The `dpa` command: DVC stage entry points and helpers.

    dpa stage NAME [--arm ARM] [--seed N] [-S key=value ...]   run one stage (what dvc.yaml calls)
    dpa validate [-S key=value ...]                             check params.yaml (or conf/ + overrides) and exit
    dpa compose [-S key=value ...]                              write params.yaml from conf/ (as dvc exp run -S)
    dpa show                                                    print the compare table of the last run
    dpa sweep conflict --values 0,0.5,1 [-S key=value ...]      the conflict dial (DPA − Vanilla vs prior gap)
    dpa chat MODEL_DIR --image PATH [--prompt TEXT]             talk to a Llava checkpoint (streamed reply)
    dpa eval MODEL_DIR [--benchmark NAME|FILE|KIND:TASK ...]    the evaluate stage's benchmarks, outside DVC
    dpa bench cmo [...]                                         the CMO speed/memory benchmark
    dpa flow [...]                                              run the Prefect flow once (see README)
    dpa workers [--workers 2] [--push end|stage|never] [...]    arms x seeds in parallel workspaces (docs/scaleout.md)

A stage runs in this process, in the project's container (runtime.executor: docker), or under
`accelerate launch` for the training stages (runtime.launcher: accelerate), chosen in params.yaml.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

from dpa_core.errors import DPAInputError

from .params import load_params, parse_override

def _overrides(pairs) -> dict:
    return dict(parse_override(s) for s in pairs or [])


def _stage_argv(args) -> list[str]:
    argv = ["stage", args.name, "--params", args.params]
    if args.arm:
        argv += ["--arm", args.arm]
    if args.seed is not None:
        argv += ["--seed", str(args.seed)]
    for s in args.set or []:
        argv += ["-S", s]
    return argv


def run_stage(args) -> int:
    from .entrypoints import STAGES

    if args.name not in STAGES:
        raise DPAInputError(f"unknown stage {args.name!r}.", fix=f"use one of {', '.join(STAGES)}.")
    stage = STAGES[args.name]
    if stage.arm and not args.arm:
        raise DPAInputError(f"stage {args.name} needs --arm.", fix="pass --arm NAME (an arm from params.yaml).")
    if stage.seed and args.seed is None:
        raise DPAInputError(f"stage {args.name} needs --seed.", fix="pass --seed N.")
    p = load_params(args.params, _overrides(args.set))

    if p.runtime.executor == "docker" and not os.environ.get("DPA_IN_CONTAINER"):
        from .container import container_command

        env = {"DPA_IN_CONTAINER": "1"}
        for k in ("MLFLOW_TRACKING_URI", "DPA_PREFECT_FLOW_RUN_ID", "HF_HUB_OFFLINE"):
            if os.environ.get(k):
                env[k] = os.environ[k]
        cmd = container_command(_stage_argv(args), image=p.runtime.image, workdir=Path.cwd(), gpus=p.runtime.gpus,
                                env=env, extra_mounts=[])
        print("[dpa] in container:", " ".join(cmd), flush=True)
        return subprocess.call(cmd)

    if stage.training and p.runtime.launcher == "accelerate" and "LOCAL_RANK" not in os.environ:
        from .container import accelerate_command

        cmd = accelerate_command(["-m", "pipelines.cli", *_stage_argv(args)], config_file=p.runtime.accelerate_config,
                                 num_processes=p.runtime.num_processes)
        print("[dpa] launching:", " ".join(cmd), flush=True)
        return subprocess.call(cmd)

    kwargs = {}
    if stage.arm:
        p.arm(args.arm)  # validates the name
        kwargs["arm"] = args.arm
    if stage.seed:
        kwargs["seed"] = args.seed
    label = " ".join([args.name, *([args.arm] if args.arm else []), *([f"seed {args.seed}"] if args.seed is not None else [])])
    main_process = int(os.environ.get("RANK", "0")) == 0
    if main_process:
        print(f"[dpa] ── {label} ──", flush=True)
    start = time.monotonic()
    out = stage.fn(p, **kwargs)
    if main_process:
        print(f"[dpa] ── {label}: done in {_elapsed(time.monotonic() - start)} -> {out.out_dir}", flush=True)
    return 0


def _elapsed(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    return f"{minutes}m{sec:02d}s" if minutes else f"{seconds:.1f}s"


CHAT_HELP = "commands: /image PATH (new image, new conversation), /reset, /exit (or Ctrl-D)"


def run_chat(args) -> int:
    """One-shot (--prompt) or interactive chat about one image; the reply streams as it is generated."""
    from dpa_core.chat import LlavaChat, load_image

    image = load_image(args.image)
    chat = LlavaChat(args.model_dir, device=args.device)
    chat.reset(image)
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, stream=sys.stdout)
    if args.prompt is not None:
        chat.ask(args.prompt, **opts)
        print(flush=True)
        return 0
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    print(f"[dpa] chatting with {args.model_dir} about {args.image} on {chat.device} ({CHAT_HELP})", flush=True)
    while True:
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit", "exit", "quit"):
            return 0
        if line == "/reset":
            chat.reset()
            print("[dpa] new conversation", flush=True)
            continue
        if line.startswith("/image"):
            try:
                chat.reset(load_image(line[len("/image"):].strip()))
                print("[dpa] new image, new conversation", flush=True)
            except DPAInputError as e:
                print(f"[dpa] error: {e}", flush=True)
            continue
        print("model> ", end="", flush=True)
        chat.ask(line, **opts)
        print(flush=True)


def benchmark_specs(items: list[str] | None, p) -> list[dict]:
    """--benchmark values as evaluate_all specs: a benchmark name from params.yaml, a file (.tsv: the
    built-in scorer; .jsonl: a multiple-choice text benchmark through lm-eval), or KIND:TASK
    (vlmeval:MMBench_DEV_EN, lmeval:arc_easy). None: every benchmark in params.yaml."""
    from .entrypoints import _benchmarks

    configured = {b["name"]: b for b in _benchmarks(p)} if p is not None else {}
    if not items:
        if not configured:
            raise DPAInputError("no benchmarks: no params.yaml here and no --benchmark given.",
                                fix="pass --benchmark FILE.tsv|FILE.jsonl|vlmeval:TASK|lmeval:TASK, or --params.")
        return list(configured.values())
    specs = []
    for item in items:
        kind, _, task = item.partition(":")
        if item in configured:
            specs.append(configured[item])
        elif kind in ("vlmeval", "lmeval") and task:
            specs.append({"name": task.replace(":", "_"), "kind": kind, "task": task})
        elif item.endswith((".tsv", ".jsonl")):
            if not Path(item).is_file():
                raise DPAInputError("benchmark file not found.", file=item, fix="pass an existing .tsv or .jsonl file.")
            specs.append({"name": Path(item).stem, "kind": "builtin_tsv" if item.endswith(".tsv") else "lmeval",
                          "path": item})
        else:
            raise DPAInputError(f"unknown benchmark {item!r}.",
                                fix=f"use a name from params.yaml ({', '.join(configured) or 'none'}), a .tsv/.jsonl "
                                "file, or vlmeval:TASK / lmeval:TASK.")
    return specs


def score_table(scores: dict) -> str:
    """The scores of one model as a markdown table, in %: the headline score per benchmark and their
    average first (as in the comparison), then every other score."""
    from .entrypoints import headline_scores

    numeric = {k: v for k, v in scores.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and not k.startswith("meta/")}
    heads = headline_scores(numeric)
    rows = [*heads.items(), *((k, v) for k, v in sorted(numeric.items()) if k not in heads)]
    lines = ["| score | % |", "|---|---|", *(f"| {k} | {100 * v:.1f} |" for k, v in rows)]
    skipped = scores.get("meta/evaluate/n_skipped")
    if skipped:
        lines.append(f"\n{int(skipped)} benchmark(s) skipped: see report.json.")
    return "\n".join(lines)


def run_eval(args) -> int:
    from dpa_core.evaluation import evaluate_all

    from .entrypoints import evaluation_settings

    p = load_params(args.params, _overrides(args.set)) if Path(args.params).is_file() else None
    specs = benchmark_specs(args.benchmark, p)
    settings = evaluation_settings(p) if p is not None else dict(batch_size=8, max_new_tokens=16, limit=None,
                                                                   lmu_data=None)
    for key in ("batch_size", "max_new_tokens", "limit"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    model_dir = Path(args.model_dir)
    out = Path(args.out) if args.out else Path("eval-results") / model_dir.resolve().name
    print(f"[dpa] evaluating {model_dir} on {', '.join(s['name'] for s in specs)} -> {out}", flush=True)
    scores = evaluate_all(model_dir, specs, out, device=args.device, **settings)
    print(f"\n{model_dir}\n\n{score_table(scores)}", flush=True)
    return 0


def _csv(text: str, typ=str) -> list:
    return [typ(x) for x in text.replace(" ", "").split(",") if x]


def flow_parser() -> argparse.ArgumentParser:
    from .prefect_flow import DEPLOYMENT_NAME, __doc__ as flow_doc

    ap = argparse.ArgumentParser(prog="dpa flow", description=flow_doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", nargs="?", choices=["run", "serve"], default="run",
                    help="run: the flow once, in this process (default); serve: the deployment for the UI")
    ap.add_argument("--profile", help="conf/profile/<name>.yaml (default: conf/config.yaml's)")
    ap.add_argument("--proxy-arms", type=_csv, help="comma-separated, e.g. dpa,pmo_only")
    ap.add_argument("--plain-arms", type=_csv, help="comma-separated, e.g. vanilla,cal")
    ap.add_argument("--seeds", type=lambda s: _csv(s, int), help="comma-separated, e.g. 0,1,2")
    ap.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", default=[], help="override a setting")
    ap.add_argument("--project-dir", default=".", help="the repository root (default: .)")
    ap.add_argument("--name", default=DEPLOYMENT_NAME, help="serve: the deployment name (default: local)")
    ap.add_argument("--limit", type=int, default=1,
                    help="serve: flow runs at once (default 1: runs share params.yaml and the workspace)")
    return ap


def run_flow(argv: list[str] | None = None) -> int:
    """`dpa flow ...`: run the Prefect flow once in-process, or `serve` the deployment."""
    from .prefect_flow import PARAMS_FILE, dpa_study, serve

    args = flow_parser().parse_args(argv)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per API request otherwise
    if args.action == "serve":
        serve(args.name, args.project_dir, args.limit)
        return 0
    overrides = _overrides(args.set)
    profile = args.profile or load_params(Path(args.project_dir) / PARAMS_FILE).profile
    from prefect.settings import temporary_settings

    # without PREFECT_API_URL Prefect starts a temporary local server; give it time on a busy machine
    with temporary_settings(set_defaults={"server.ephemeral.startup_timeout_seconds": 120}):
        state = dpa_study(profile=profile, proxy_arms=args.proxy_arms, plain_arms=args.plain_arms, seeds=args.seeds,
                          overrides=overrides or None, project_dir=args.project_dir, return_state=True)
    if not state.is_completed():
        print(f"[dpa] flow run {state.name}: {state.message}", file=sys.stderr, flush=True)
        return 1
    print(f"[dpa] flow run completed: {state.result()}", flush=True)
    return 0


QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",       # "Loading weights" / "Writing model shards" bars
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",  # "Generating test split" (lm-eval's data)
    "TRANSFORMERS_VERBOSITY": "error",         # load reports of the unused CLIP text tower, advisories
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "MLFLOW_CONFIGURE_LOGGING": "false",       # MLflow's INFO lines (database setup) go to WARNING
}


def quiet_libraries() -> None:
    """Keep the terminal to what a user reads: stage headers, one progress bar per training or
    evaluation, warnings and errors. The libraries' INFO logs and loading bars are off (the
    records are in MLflow and the outputs); DPA_VERBOSE=1 keeps everything. Set in the
    environment, so `accelerate launch` and container children inherit it."""
    if os.environ.get("DPA_VERBOSE", "") not in ("", "0"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in ("dpa", "dpa_core", "pipelines"):
        logging.getLogger(name).setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()
    parser = argparse.ArgumentParser(prog="dpa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage", help="run one pipeline stage")
    st.add_argument("name")
    st.add_argument("--arm")
    st.add_argument("--seed", type=int)
    st.add_argument("--params", default="params.yaml")
    st.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="override a setting")
    co = sub.add_parser("compose", help="write params.yaml from conf/ + profile + overrides, as `dvc exp run -S` does")
    co.add_argument("--params", default="params.yaml")
    co.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="e.g. profile=smoke, proxy.lora.r=64")
    va = sub.add_parser("validate", help="validate params.yaml (or conf/ composed with -S overrides)")
    va.add_argument("--params", default="params.yaml")
    va.add_argument("-S", "--set", action="append", metavar="KEY=VALUE")
    sh = sub.add_parser("show", help="print the comparison table")
    sh.add_argument("--params", default="params.yaml")
    sw = sub.add_parser("sweep", help="the conflict dial: one DVC experiment per world.verbose_style value")
    sw.add_argument("what", choices=["conflict"])
    sw.add_argument("--values", default="0,0.5,1", help="dial settings in 0..1, comma-separated")
    sw.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="passed to every dvc exp run")
    ch = sub.add_parser("chat", help="talk to a Llava checkpoint about an image (streamed)")
    ch.add_argument("model_dir", help="a Llava checkpoint directory (outputs/merged/ARM-seedN, a llava-hf model)")
    ch.add_argument("--image", required=True, help="the image to talk about")
    ch.add_argument("--prompt", help="ask once and exit (default: interactive)")
    ch.add_argument("--max-new-tokens", type=int, default=256)
    ch.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    ch.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda, cuda:1 ...")
    ev = sub.add_parser("eval", help="evaluate a Llava checkpoint as the evaluate stage does, outside DVC")
    ev.add_argument("model_dir")
    ev.add_argument("--benchmark", action="append", metavar="NAME|FILE|KIND:TASK",
                    help="a benchmark of params.yaml, a .tsv/.jsonl file, or vlmeval:TASK / lmeval:TASK "
                    "(repeatable; default: every benchmark of params.yaml)")
    ev.add_argument("--out", help="results directory (default: eval-results/MODEL_DIR_NAME)")
    ev.add_argument("--params", default="params.yaml")
    ev.add_argument("-S", "--set", action="append", metavar="KEY=VALUE")
    ev.add_argument("--limit", type=int, help="only the first N questions of each benchmark")
    ev.add_argument("--batch-size", type=int)
    ev.add_argument("--max-new-tokens", type=int)
    ev.add_argument("--device", default="auto")
    be = sub.add_parser("bench", help="benchmarks", add_help=False)
    be.add_argument("what", choices=["cmo"])
    fl = sub.add_parser("flow", help="run the Prefect flow once, in-process", add_help=False)
    sub.add_parser("workers", help="the study with arms x seeds in parallel DVC workspaces", add_help=False)
    args, rest = parser.parse_known_args(argv)
    try:
        if args.cmd == "stage":
            return run_stage(args)
        if args.cmd == "compose":
            from .params import CONF_DIR, build, compose, write_params, Params

            data = compose(Path(args.params).parent / CONF_DIR, _overrides(args.set))
            p = build(Params, data)  # validate before writing
            write_params(args.params, data)
            print(f"{args.params} written from {Path(args.params).parent / CONF_DIR} (profile {p.profile})")
            return 0
        if args.cmd == "validate":
            p = load_params(args.params, _overrides(args.set))
            print(f"params OK (profile {p.profile}; arms {p.study.arms}; seeds {p.study.seeds})")
            if not args.set:
                from .params import drift_from_conf

                if drift := drift_from_conf(args.params, p.profile):
                    print(f"note: {args.params} differs from conf/ composed with profile {p.profile} in "
                          f"{', '.join(drift)} (set by `dvc exp run -S`, or conf/ edited since); "
                          f"`dpa compose -S profile={p.profile}` rewrites it from conf/.")
            if all((Path(m) / "config.json").is_file() for m in (p.model.vision, p.model.llm)):
                from .entrypoints import preflight

                print(preflight(p).summary())
            else:
                print("models not checked: model.vision / model.llm not there yet (the world stage builds the toy "
                      "ones); every training stage checks them first.")
            return 0
        if args.cmd == "show":
            p = load_params(args.params)
            from .entrypoints import layout

            table = layout(p).compare() / "comparison.md"
            if not table.is_file():
                raise DPAInputError("no comparison yet: the pipeline has not run (or not to its end) here.",
                                    file=table, fix="run the study first: `bash scripts/demo.sh` or `dvc repro` "
                                    "(then `dpa show` prints its table).")
            print(table.read_text())
            from .tracking import existing_runs_view_url, tracking_uri

            uri = tracking_uri(p.tracking.uri)
            if url := existing_runs_view_url(uri, p.tracking.experiment):
                serve = "" if uri.startswith("http") else \
                    f"  .venv/bin/mlflow ui --backend-store-uri {p.tracking.uri} --host 127.0.0.1 --port 5000\n"
                print(f"MLflow (runs, params, loss curves, the comparison as artifacts of the `study` run):\n"
                      f"{serve}  {url}")
            return 0
        if args.cmd == "sweep":
            from .sweep import parse_values, run_conflict_sweep

            values = parse_values(args.values)
            sets = list(args.set or [])
            if "profile" not in _overrides(sets):  # `dvc exp run` composes conf/: keep the workspace's profile
                sets.insert(0, f"profile={load_params('params.yaml').profile}")
            load_params("params.yaml", _overrides(sets))  # fail before the first run
            run_conflict_sweep(values, sets)
            return 0
        if args.cmd == "chat":
            return run_chat(args)
        if args.cmd == "eval":
            return run_eval(args)
        if args.cmd == "bench":
            from dpa_core.bench.cmo import main as bench_main

            return bench_main(rest) or 0
        if args.cmd == "flow":
            return run_flow(rest) or 0
        if args.cmd == "workers":
            from .workers import cli as workers_cli

            return workers_cli(rest) or 0
    except DPAInputError as e:
        print(f"[dpa] error: {e}", file=sys.stderr, flush=True)
        return 2
    except OSError as e:  # disk full, permissions, ...: one line naming the path, not a traceback
        from dpa_core.io import storage_error

        short = storage_error(e, e.filename or "the outputs")
        print(f"[dpa] error: {short or e}", file=sys.stderr, flush=True)
        return 2
    return 1


if __name__ == "__main__":
    sys.exit(main())
