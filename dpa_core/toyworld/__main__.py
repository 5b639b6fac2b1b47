"""python -m dpa_core.toyworld --out DIR --size smoke --seed 0 [--set llm_steps=50 ...] [--base-models DIR]
python -m dpa_core.toyworld --base-models-only --out DIR --size default --seed 0   (the shipped base models)"""

from __future__ import annotations

import argparse
import json
import sys

from dpa_core.errors import DPAInputError

from .build import build_base_models, build_world
from .sizes import SIZES


def _override(text: str) -> tuple[str, int | float]:
    name, _, value = text.partition("=")
    try:
        return name, int(value)
    except ValueError:
        try:
            return name, float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--set wants NAME=NUMBER, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpa_core.toyworld", description="Build the seeded toy world.")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    parser.add_argument("--size", default="default", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                        metavar="NAME=VALUE", help="override one size field, e.g. --set llm_steps=50")
    parser.add_argument("--base-models", default=None, metavar="DIR",
                        help="reuse the tokenizer, LLM and vision tower built by --base-models-only")
    parser.add_argument("--base-models-only", action="store_true",
                        help="train only the tokenizer, base LLM and vision tower into --out")
    parser.add_argument("--probe-every", type=int, default=0, metavar="N",
                        help="with --base-models-only: every N LLM steps, print how well it reads a scene told in words")
    args = parser.parse_args(argv)
    try:
        if args.base_models_only:
            manifest = build_base_models(args.out, args.size, args.seed, overrides=dict(args.overrides),
                                         probe_every=args.probe_every)
            print(json.dumps({k: manifest[k] for k in ("seed", "size", "fingerprint", "llm", "clip", "timings_s")}, indent=2))
            return 0
        manifest = build_world(args.out, args.size, args.seed, overrides=dict(args.overrides),
                               base_models=args.base_models)
    except DPAInputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {k: manifest[k] for k in ("seed", "size", "prior_gap_ppl", "timings_s")}
    summary["bytes_total"] = manifest["bytes"]["total"]
    summary["text_bench_acc_base_llm"] = manifest["checks"]["text_bench_acc_base_llm"]
    summary["clip_bench_retrieval_acc_in_32"] = manifest["checks"]["clip"]["bench_retrieval_acc_in_32"]
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
