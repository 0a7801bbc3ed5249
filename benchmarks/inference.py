"""Inference speed of the factorized model against the dense one, eager and compiled, side by side in one run.

The deliverable of a Cuttlefish run is a smaller model. This times forward passes (eval mode,
``torch.inference_mode``) of a random-init BERT-base (sequence 128) or DeiT-small (224 px) before and after a
switch at fixed ranks (``--rank-ratio`` of each targeted layer's full rank, every target factorized), eagerly
and under ``torch.compile``. Each figure is the median of ``--repeats`` timed calls after warm-up (the first
compiled call, which compiles, is reported apart); CUDA timings are synchronized, bf16/fp16 run under autocast.
Synthetic inputs, no downloads.

    python benchmarks/inference.py --model bert-base --batch-size 8
    python benchmarks/inference.py --model deit-small --batch-size 16
    python benchmarks/inference.py --model bert-base --device cuda --dtype bf16 --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from cuttlefish_hf import Cuttlefish, CuttlefishConfig
from cuttlefish_hf.surgery import count_parameters

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import MODELS, build, flop_ideal_speedup, machine, spread  # noqa: E402  (the same models as the step-time runs)

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_calls(run, *, device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Seconds of the first call (a compile, for a compiled model), then the median and range of ``repeats``."""
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    first = time.perf_counter() - start
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        run()
        synchronize(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"first_call_seconds": first, "median_seconds": median, "min_seconds": min(times),
            "max_seconds": max(times), "spread": spread(times)}


def time_model(model: torch.nn.Module, inputs: dict, args: argparse.Namespace) -> dict[str, dict]:
    """Eager, then compiled (unless ``--no-compile``) forward timings of ``model`` as it is now."""
    autocast = torch.autocast(args.device, dtype=DTYPES[args.dtype]) if DTYPES[args.dtype] else contextlib.nullcontext()

    def runner(module):
        def run():
            with torch.inference_mode(), autocast:
                module(**inputs)
        return run

    timings = {"eager": time_calls(runner(model), device=args.device, warmup=args.warmup, repeats=args.repeats)}
    if not args.no_compile:
        torch._dynamo.reset()  # nothing compiled for the other model is reused
        timings["compiled"] = time_calls(runner(torch.compile(model)), device=args.device, warmup=args.warmup,
                                         repeats=args.repeats)
    return timings


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bert-base", choices=MODELS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank-ratio", type=float, default=0.25)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-compile", action="store_true", help="time eager mode only")
    parser.add_argument("--output", default=None, help="results JSON (default: benchmarks/results/inference_...)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model, data, tokens = build(args.model, args.batch_size)
    model = model.to(args.device).eval()
    inputs = {key: torch.stack([row[key] for row in data[:args.batch_size]]).to(args.device) for key in data[0]}
    dense_params = count_parameters(model)
    dense = time_model(model, inputs, args)
    controller = Cuttlefish(model, CuttlefishConfig(mode="pufferfish", rank_ratio=args.rank_ratio,
                                                    skip_first_blocks=0, frobenius_decay=0.0), total_steps=2)
    controller.begin()
    report = controller.switch(step=1).report
    factorized = time_model(model.eval(), inputs, args)

    speedups = {mode: dense[mode]["median_seconds"] / factorized[mode]["median_seconds"] for mode in dense}
    result = {
        "model": args.model, "device": args.device, "dtype": args.dtype, "batch_size": args.batch_size,
        "tokens_per_batch": tokens, "rank_ratio": args.rank_ratio, "factorized_layers": len(report.layers),
        "params": {"dense": dense_params, "factorized": count_parameters(model)},
        "flop_ideal_speedup_of_targeted_layers": flop_ideal_speedup(report),
        "speedup": speedups, "dense": dense, "factorized": factorized,
        "compiled_over_eager": {name: timings["eager"]["median_seconds"] / timings["compiled"]["median_seconds"]
                                for name, timings in (("dense", dense), ("factorized", factorized))
                                if "compiled" in timings},
        "command": "python benchmarks/inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {**machine(args.device), "torch_threads": torch.get_num_threads()},
    }
    for mode, speedup in speedups.items():
        print(f"{args.model} {mode}: dense {dense[mode]['median_seconds'] * 1e3:.1f} ms, factorized "
              f"{factorized[mode]['median_seconds'] * 1e3:.1f} ms per batch of {args.batch_size}: {speedup:.2f}x "
              f"(targeted layers' FLOP ideal {result['flop_ideal_speedup_of_targeted_layers']:.2f}x)")
    card = f"_{torch.cuda.get_device_name().replace(' ', '_')}" if args.device == "cuda" else ""
    output = Path(args.output or RESULTS / f"inference_{args.model}_{args.device}_{args.dtype}{card}.json")
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
