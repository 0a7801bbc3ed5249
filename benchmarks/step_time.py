"""Step time before and after the Cuttlefish switch inside ``Trainer``, on random-init BERT / DeiT sizes.

Measures, in one run, the median optimizer-step time of the dense model and of the factorized model after the
switch, the rank-measurement overhead, and the FLOP-ideal speedup of the factorized layers; eagerly or with
``--compile`` (``TrainingArguments(torch_compile=True)``: inductor, re-traced at the switch; the graphs compiled
in each phase are recorded). A few steps of each phase run under the profiler and are split into the matrix
products (what factorizing shrinks) and the rest (attention, norms, embeddings, the optimizer); on CUDA also
device busy time and kernels per step. On CUDA the optimizer is the fused AdamW.
Synthetic data; no downloads. CUDA timings synchronize around every step.

    python benchmarks/step_time.py --model bert-base --device cpu --steps 40
    python benchmarks/step_time.py --model bert-base --device cpu --steps 40 --compile
    python benchmarks/step_time.py --model deit-base --device cuda --dtype bf16 --batch-size 128 --steps 200 --compile
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import transformers
from torch.autograd import DeviceType
from transformers import TrainerCallback, TrainingArguments

from cuttlefish_hf import CuttlefishConfig, CuttlefishTrainer
from cuttlefish_hf.surgery import count_parameters


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (CUDA-synchronized)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::_addmm_activation"}  # what Linear layers run, eager or inductor


class StepProfiler(TrainerCallback):
    """Over a few steps at given points: time spent in matrix products (CPU time on CPU, device time on CUDA),
    and on CUDA the device busy time and kernel launches. When a CUDA step's wall time is well above its busy
    time, the step is bound by the host launching kernels. Profiled steps are left out of the step-time medians."""

    def __init__(self, starts: dict[str, int], steps: int, cuda: bool) -> None:
        self.starts, self.steps, self.cuda = starts, steps, cuda
        self.results: dict[str, dict] = {}
        self.profiled: set[int] = set()  # global steps (as counted at step begin) run under the profiler
        self._profiler = None
        self._label = None

    def on_step_begin(self, args, state, control, **kwargs):
        for label, start in self.starts.items():
            if state.global_step == start:
                self._label = label
                activities = [torch.profiler.ProfilerActivity.CPU]
                if self.cuda:
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                self._profiler = torch.profiler.profile(activities=activities)
                self._profiler.__enter__()
        if self._profiler is not None:
            self.profiled.add(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self._profiler is None or state.global_step < self.starts[self._label] + self.steps:
            return
        if self.cuda:
            torch.cuda.synchronize()
        self._profiler.__exit__(None, None, None)
        try:
            self.results[self._label] = self._summarize(self._profiler.events())
        except Exception as error:  # a diagnostic: never lose the timings to it
            self.results[self._label] = {"error": repr(error)}
        self._profiler = None

    def _summarize(self, events) -> dict:
        matmuls = [e for e in events if e.name in MATMUL_OPS]
        if not self.cuda:
            return {"matmul_ms_per_step": sum(e.self_cpu_time_total for e in matmuls) / 1000 / self.steps}
        kernels = [e for e in events if e.device_type == DeviceType.CUDA]  # kernels and copies on the device
        return {"matmul_ms_per_step": sum(e.self_device_time_total for e in matmuls) / 1000 / self.steps,
                "device_busy_ms_per_step": sum(e.time_range.elapsed_us() for e in kernels) / 1000 / self.steps,
                "kernels_per_step": len(kernels) / self.steps}


BERTS = {  # the BERT-base and BERT-large shapes, and a 2-layer one for smoke tests
    "bert-base": dict(),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "tiny-bert": dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=32),
}
DEITS = {"deit-small": "deit_small_patch16_224", "deit-base": "deit_base_patch16_224"}
MODELS = [*BERTS, *DEITS]


def build(model_name: str, batch: int):
    """A random-init model and a synthetic dataset of the right shape (sequence 128; tiny-bert: 16)."""
    if model_name in BERTS:
        config = transformers.BertConfig(num_labels=2, **BERTS[model_name])
        model = transformers.BertForSequenceClassification(config)
        seq = min(128, config.max_position_embeddings // 2)
        data = [{"input_ids": torch.randint(0, config.vocab_size, (seq,)), "labels": torch.tensor(i % 2)}
                for i in range(batch * 4)]
        return model, data, batch * seq
    if model_name in DEITS:
        import timm

        model = timm.create_model(DEITS[model_name], pretrained=False, num_classes=10)

        class Wrapper(torch.nn.Module):  # Trainer wants a loss from the model
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, pixel_values, labels):  # uint8 images: a quarter of the host-to-device bytes
                logits = self.inner(pixel_values.float() / 255)
                return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

        data = [{"pixel_values": torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8),
                 "labels": torch.tensor(i % 10)} for i in range(batch * 4)]
        return Wrapper(model), data, batch * 197
    raise ValueError(f"unknown --model {model_name!r}; choose one of {', '.join(MODELS)}")


def flop_ideal_speedup(report) -> float:
    dense = sum(layer.params_before for layer in report.layers)
    factorized = sum(layer.params_after for layer in report.layers)
    return dense / factorized


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bert-base", choices=MODELS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40, help="total optimizer steps; the switch is at 40%%")
    parser.add_argument("--rank-ratio", type=float, default=0.25, help="fixed rank ratio (pufferfish mode)")
    parser.add_argument("--compile", action="store_true", help="TrainingArguments(torch_compile=True), inductor")
    parser.add_argument("--output", default=None, help="results JSON (default: benchmarks/results/step_time_...)")
    args = parser.parse_args(argv)
    if args.steps < 20:
        parser.error("--steps must be at least 20: each side of the switch needs 3 warm-up, 3 profiled and some "
                     "timed steps")

    torch.manual_seed(0)
    model, data, tokens = build(args.model, args.batch_size)
    params_before = count_parameters(model)
    config = CuttlefishConfig(mode="pufferfish", rank_ratio=args.rank_ratio, fixed_warmup_fraction=0.4,
                              skip_first_blocks=0, measure_every_steps=max(1, args.steps // 10), extra_bn=False)
    training = TrainingArguments(
        "/tmp/cuttlefish-step-time", per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=1e-4, report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=10 ** 6,
        use_cpu=args.device == "cpu", bf16=args.dtype == "bf16", fp16=args.dtype == "fp16", dataloader_num_workers=0,
        torch_compile=args.compile, optim="adamw_torch_fused" if args.device == "cuda" else "adamw_torch")
    timer = StepTimer()
    cuda = args.device == "cuda"  # profile a few dense steps mid-way to the switch, low-rank ones near the end
    profiler = StepProfiler({"dense": int(0.2 * args.steps), "low_rank": int(0.8 * args.steps)}, steps=3, cuda=cuda)
    trainer = CuttlefishTrainer(model=model, args=training, train_dataset=data, cuttlefish_config=config,
                                callbacks=[timer, profiler])
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    controller = trainer.cuttlefish.controller
    switch = controller.switch_step
    warm = 3  # skip allocator / autotuning / compile warm-up on each side of the switch
    unprofiled = [(step, seconds) for step, seconds in enumerate(timer.times) if step not in profiler.profiled]
    dense_steps = [seconds for step, seconds in unprofiled if warm <= step < switch]
    low_rank_steps = [seconds for step, seconds in unprofiled if step >= switch + warm]
    dense, low_rank = statistics.median(dense_steps), statistics.median(low_rank_steps)
    ideal = flop_ideal_speedup(controller.report)
    summary = controller.summary()
    result = {
        "model": args.model, "dtype": args.dtype, "batch_size": args.batch_size, "tokens_per_batch": tokens,
        "compiled": args.compile, "optimizer": training.optim.value,
        "steps": args.steps, "switch_step": switch, "rank_ratio": args.rank_ratio,
        "params_before": params_before, "params_after": count_parameters(trainer.model),
        "dense_step_s": dense, "low_rank_step_s": low_rank, "step_speedup": dense / low_rank,
        "targeted_layers_flop_ideal_speedup": ideal, "fraction_of_ideal": dense / low_rank / ideal,
        "dense_step_spread": spread(dense_steps), "low_rank_step_spread": spread(low_rank_steps),
        "timed_steps": {"dense": len(dense_steps), "low_rank": len(low_rank_steps)},
        "step_seconds": timer.times,
        "compiled_graphs_dense": summary["compiled_graphs_dense"],
        "compiled_graphs_low_rank": summary["compiled_graphs_low_rank"],
        "measure_seconds": summary["measure_seconds"], "surgery_seconds": summary["surgery_seconds"],
        "measurement_overhead_pct": 100 * summary["measure_seconds"] / total, "train_seconds": total,
        **matmul_split(profiler.results, {"dense": 1000 * dense, "low_rank": 1000 * low_rank}, ideal),
        "step_profile": profiler.results,
        "machine": machine(args.device), "command": "python benchmarks/step_time.py " + " ".join(argv or sys.argv[1:]),
    }
    compiled = "_compiled" if args.compile else ""
    output = args.output or os.path.join(os.path.dirname(__file__), "results",
                                         f"step_time_{args.model}_{args.device}_{args.dtype}{compiled}.json")
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))
    return result


def matmul_split(profile: dict, step_ms: dict[str, float], ideal: float) -> dict:
    """Each phase's median step split into the profiled matrix products and the rest (attention, norms,
    activations, embeddings, the optimizer, data; the profiler's own overhead stays out: the medians are of
    unprofiled steps); the matrix products' speed-up against the FLOP ideal, and the rest's."""
    if any("matmul_ms_per_step" not in profile.get(phase, {}) for phase in step_ms):
        return {}
    split = {phase: {"step_ms": ms, "matmul_ms": profile[phase]["matmul_ms_per_step"],
                     "rest_ms": ms - profile[phase]["matmul_ms_per_step"]} for phase, ms in step_ms.items()}
    dense, low_rank = split["dense"], split["low_rank"]
    return {"step_split": split, "matmul_share_of_dense_step": dense["matmul_ms"] / dense["step_ms"],
            "matmul_speedup": dense["matmul_ms"] / low_rank["matmul_ms"],
            "matmul_fraction_of_ideal": dense["matmul_ms"] / low_rank["matmul_ms"] / ideal,
            "rest_speedup": dense["rest_ms"] / low_rank["rest_ms"]}


def spread(times: list[float]) -> float:
    """(max - min) / median of the timed steps."""
    return (max(times) - min(times)) / statistics.median(times)


def machine(device: str) -> dict:
    info = {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device}
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


if __name__ == "__main__":
    main()
