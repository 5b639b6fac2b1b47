"""The `dpa` command: DVC stage entry points and helpers.

    dpa stage NAME [--arm ARM] [--seed N] [-S key=value ...]   run one stage (what dvc.yaml calls)
    dpa validate [-S key=value ...]                             check params.yaml (+ profile) and exit
    dpa show                                                    print the compare table of the last run
    dpa bench cmo [...]                                         the CMO speed/memory benchmark
    dpa flow [...]                                              run the Prefect flow once (see README)

A stage runs in this process, in the project's container (runtime.executor: docker), or under
`accelerate launch` for the training stages (runtime.launcher: accelerate), chosen in params.yaml.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path

from dpa_core.errors import DPAInputError

from .params import load_params, parse_override

NEEDS_ARM = ("align", "finetune", "merge", "evaluate")
NEEDS_SEED = ("proxy", "diagnose", *NEEDS_ARM)


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
    from .stages import STAGES, TRAINING_STAGES

    if args.name not in STAGES:
        raise DPAInputError(f"unknown stage {args.name!r}.", fix=f"use one of {', '.join(STAGES)}.")
    if args.name in NEEDS_ARM and not args.arm:
        raise DPAInputError(f"stage {args.name} needs --arm.", fix="pass --arm NAME (an arm from params.yaml).")
    if args.name in NEEDS_SEED and args.seed is None:
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

    if args.name in TRAINING_STAGES and p.runtime.launcher == "accelerate" and "LOCAL_RANK" not in os.environ:
        from .container import accelerate_command

        cmd = accelerate_command(["-m", "pipelines.cli", *_stage_argv(args)], config_file=p.runtime.accelerate_config,
                                 num_processes=p.runtime.num_processes)
        print("[dpa] launching:", " ".join(cmd), flush=True)
        return subprocess.call(cmd)

    fn = STAGES[args.name]
    kwargs = {}
    if args.name in NEEDS_ARM:
        p.arm(args.arm)  # validates the name
        kwargs["arm"] = args.arm
    if args.name in NEEDS_SEED:
        kwargs["seed"] = args.seed
    out = fn(p, **kwargs)
    print(f"[dpa] stage {args.name} done -> {out.out_dir}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="dpa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage", help="run one pipeline stage")
    st.add_argument("name")
    st.add_argument("--arm")
    st.add_argument("--seed", type=int)
    st.add_argument("--params", default="params.yaml")
    st.add_argument("-S", "--set", action="append", metavar="KEY=VALUE", help="override a setting")
    va = sub.add_parser("validate", help="validate params.yaml and the selected profile")
    va.add_argument("--params", default="params.yaml")
    va.add_argument("-S", "--set", action="append", metavar="KEY=VALUE")
    sh = sub.add_parser("show", help="print the comparison table")
    sh.add_argument("--params", default="params.yaml")
    be = sub.add_parser("bench", help="benchmarks", add_help=False)
    be.add_argument("what", choices=["cmo"])
    fl = sub.add_parser("flow", help="run the Prefect flow once, in-process", add_help=False)
    args, rest = parser.parse_known_args(argv)
    try:
        if args.cmd == "stage":
            return run_stage(args)
        if args.cmd == "validate":
            p = load_params(args.params, _overrides(args.set))
            print(f"params OK (profile {p.profile}; arms {p.study.arms}; seeds {p.study.seeds})")
            if all((Path(m) / "config.json").is_file() for m in (p.model.vision, p.model.llm)):
                from .stages import preflight

                print(preflight(p).summary())
            else:
                print("models not checked: model.vision / model.llm not there yet (the world stage builds the toy "
                      "ones); every training stage checks them first.")
            return 0
        if args.cmd == "show":
            p = load_params(args.params)
            from .stages import layout

            print((layout(p).compare() / "comparison.md").read_text())
            return 0
        if args.cmd == "bench":
            from dpa_core.bench.cmo import main as bench_main

            return bench_main(rest) or 0
        if args.cmd == "flow":
            from .prefect_flow import cli as flow_cli

            return flow_cli(rest) or 0
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
