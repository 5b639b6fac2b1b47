"""Vanilla vs CMO (reference / efficient image-free pass): step time and peak memory.

    python -m dpa_core.bench.cmo --preset smoke|cpu|gpu [--out results.json]

With presets cpu and gpu, each config is timed in a fresh process (all methods interleaved step by
step, see step.py) and each (config, method) pair gets its own fresh process for peak memory, so
that one measurement's allocations cannot leak into another's peak. Prints a table with the ratios
efficient/vanilla and reference/vanilla (wall time, CPU time, peak memory) and writes JSON with
the machine, torch version, dtype and every raw figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from .presets import PRESETS, BenchConfig
from .models import ModelShape

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}
RATIOS = {"efficient/vanilla": ("cmo_efficient", "vanilla"), "reference/vanilla": ("cmo_reference", "vanilla")}


def machine(device: str) -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else None
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "platform": platform.platform(), "python": platform.python_version()}


def config_from_dict(d: dict) -> BenchConfig:
    return BenchConfig(**{**d, "model": ModelShape(**d["model"])})


def in_fresh_process(job: dict, timeout: float) -> dict:
    # Memory jobs only: returning every freed large block to the OS makes the resident set track live
    # tensors, but costs page faults that would distort timings.
    env = {**os.environ, **(MALLOC_ENV if job["what"] == "memory" else {})}
    proc = subprocess.run([sys.executable, "-m", "dpa_core.bench.cmo", "--worker", json.dumps(job)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"error": (proc.stderr or proc.stdout).strip()[-2000:]}
    return json.loads(lines[-1][len("RESULT "):])


def do_job(job: dict) -> dict:
    from .step import peak_memory, time_methods

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    config = config_from_dict(job["config"])
    if job["what"] == "time":
        return time_methods(config, job["methods"], job["device"], job["dtype"], job["steps"], job["warmup"])
    return peak_memory(config, job["method"], job["device"], job["dtype"])


def measure_config(config: BenchConfig, methods: list[str], args, isolate: bool) -> dict:
    """Timing of all methods in one process (interleaved); peak memory of each in its own process."""
    common = {"config": dataclasses.asdict(config), "device": args.device, "dtype": args.dtype,
              "threads": args.threads}
    run = (lambda job: in_fresh_process(job, args.timeout)) if isolate else do_job
    timed = run({**common, "what": "time", "methods": methods, "steps": args.steps, "warmup": args.warmup})
    results = {}
    for method in methods:
        mem = run({**common, "what": "memory", "method": method})
        results[method] = {**timed.get(method, {"error": timed.get("error")}), **mem}
        r = results[method]
        print(f"{config.name} {method}: " + (f"ERROR {str(r.get('error'))[-300:]}" if "step_s" not in r or "peak_bytes" not in r
              else f"{r['step_s']:.3f} s (cpu {r['cpu_s']:.3f} s), peak {r['peak_bytes'] / 2**20:.0f} MB, "
                   f"loss {r['loss']:.5f}"), file=sys.stderr, flush=True)
    return results


def ratios(results: dict) -> dict:
    out = {}
    for name, (num, den) in RATIOS.items():
        a, b = results.get(num, {}), results.get(den, {})
        if all(k in r for k in ("step_s", "peak_bytes") for r in (a, b)):
            out[name] = {"time": a["step_s"] / b["step_s"], "cpu_time": a["cpu_s"] / b["cpu_s"],
                         "peak": a["peak_bytes"] / b["peak_bytes"],
                         "step_peak": a["step_peak_bytes"] / max(b["step_peak_bytes"], 1)}
    return out


def table(rows: list[dict], methods: list[str]) -> str:
    mb = 1 / 2**20
    head = (["config", "shape", "model", "img", "text", "B"] + [f"{m} s" for m in methods]
            + ["eff/van time", "ref/van time", "eff/van cpu", "ref/van cpu", "vanilla peak MB", "eff/van peak", "ref/van peak",
               "eff/van step-peak", "ref/van step-peak"])
    body = []
    for r in rows:
        c, res, rat = r["config"], r["results"], r["ratios"]
        cells = [c["name"], c["shape"], f"h{c['model']['hidden']}x{c['model']['layers']}L v{c['model']['vocab']}",
                 str(c["image_tokens"]), str(c["text_tokens"]), str(c["batch"])]
        cells += [f"{res[m]['step_s']:.3f}" if "step_s" in res.get(m, {}) else "err" for m in methods]
        ev, rv = rat.get("efficient/vanilla", {}), rat.get("reference/vanilla", {})
        van = res.get("vanilla", {})
        cells += [f"{ev['time']:.2f}" if ev else "-", f"{rv['time']:.2f}" if rv else "-",
                  f"{ev['cpu_time']:.2f}" if ev else "-", f"{rv['cpu_time']:.2f}" if rv else "-",
                  f"{van['peak_bytes'] * mb:.0f}" if "peak_bytes" in van else "-",
                  f"{ev['peak']:.2f}" if ev else "-", f"{rv['peak']:.2f}" if rv else "-",
                  f"{ev['step_peak']:.2f}" if ev else "-", f"{rv['step_peak']:.2f}" if rv else "-"]
        body.append(cells)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "| " + " | ".join(x.ljust(w) for x, w in zip(cells, widths)) + " |"
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(b) for b in body])


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m dpa_core.bench.cmo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--device", help="cpu | cuda (default: cuda if available)")
    p.add_argument("--dtype", help="float32 | bfloat16 (default: the preset's)")
    p.add_argument("--steps", type=int, help="measured steps per (config, method); the median is reported")
    p.add_argument("--warmup", type=int, help="unmeasured steps first")
    p.add_argument("--configs", help="comma-separated config names to run (default: all of the preset)")
    p.add_argument("--methods", help="comma-separated, from vanilla, cmo_reference, cmo_efficient, vanilla_full_logits")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one fresh process per measurement (default: the preset's)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: the preset's, else torch's)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per isolated measurement")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(job: str) -> None:
    print("RESULT " + json.dumps(do_job(json.loads(job))), flush=True)


def main(argv=None) -> dict | None:
    args = parse(argv)
    if args.worker:
        worker(args.worker)
        return None
    preset = PRESETS[args.preset]
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or preset.dtype
    args.steps = args.steps or preset.steps
    args.threads = args.threads or preset.threads
    if args.threads:
        torch.set_num_threads(args.threads)
    args.warmup = preset.warmup if args.warmup is None else args.warmup
    isolate = preset.isolate if args.isolate is None else args.isolate
    methods = args.methods.split(",") if args.methods else list(preset.methods)
    configs = [c for c in preset.configs if not args.configs or c.name in args.configs.split(",")]
    load_before = os.getloadavg()
    rows = []
    for config in configs:
        results = measure_config(config, methods, args, isolate)
        rows.append({"config": dataclasses.asdict(config), "results": results, "ratios": ratios(results)})

    report = {
        "preset": args.preset, "note": preset.note, "device": args.device, "dtype": args.dtype,
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "machine": machine(args.device), "steps": args.steps, "warmup": args.warmup, "isolated": isolate,
        "methods": methods, "rows": rows, "load_average": {"before": load_before, "after": os.getloadavg()},
        "timing": "step_s: median wall-clock seconds of forward + backward over the measured steps, the "
                  "methods interleaved step by step in one process; cpu_s: the same in process CPU time",
        "memory": "peak_bytes: whole-process peak over one step after a warm-up step, each method in a "
                  "fresh process when isolated (GPU: max_memory_allocated; CPU: resident-set high-water "
                  "mark); step_peak_bytes: the same minus the level just before the step (model, batch)",
    }
    print(table(rows, methods))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
