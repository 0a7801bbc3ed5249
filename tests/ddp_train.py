"""Run under ``torchrun --nproc_per_node 2``: CuttlefishTrainer with DDP on CPU (gloo); each rank saves its view.

    ddp_train.py OUTPUT_DIR [scratch|pretrained|compiled]   # a random init with rank_rule="stable_rank",
        # pretrained-like weights with rank_rule="auto" (activation-aware, all-reduced), or the random init under
        # torch_compile=True (aot_eager)
"""

import sys

import torch
from helpers import KeywordDataset, pretrained_like, tiny_bert
from transformers import TrainingArguments

from cuttlefish_hf import CuttlefishConfig, CuttlefishTrainer
from cuttlefish_hf.layers import FactorizedLayer


def main(output_dir: str, weights: str) -> None:
    args = TrainingArguments(output_dir, per_device_train_batch_size=8, num_train_epochs=3, learning_rate=2e-3,
                             report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                             ddp_backend="gloo", logging_steps=1, torch_compile=weights == "compiled",
                             torch_compile_backend="aot_eager" if weights == "compiled" else None)
    pretrained = weights == "pretrained"
    config = CuttlefishConfig(measure_every_steps=2, window=2, min_warmup_measurements=3, eps_relative=0.05,
                              rank_rule="auto" if pretrained else "stable_rank")
    model = pretrained_like(tiny_bert()) if pretrained else tiny_bert()
    trainer = CuttlefishTrainer(model=model, args=args, train_dataset=KeywordDataset(), cuttlefish_config=config)
    trainer.train()
    controller = trainer.cuttlefish.controller
    factors = {f"{name}.{part}": getattr(module, part).weight.detach().clone()
               for name, module in trainer.model.named_modules() if isinstance(module, FactorizedLayer)
               for part in ("first", "second")}
    torch.save({"plan": controller.report.plan, "switch_step": controller.switch_step,
                "max_steps": trainer.state.max_steps, "factors": factors,
                "wrapped": type(getattr(trainer.model_wrapped, "_orig_mod", trainer.model_wrapped)).__name__,
                "compiled": hasattr(trainer.model_wrapped, "_orig_mod"), "rank_rule": controller.rank_rule,
                "compiled_graphs_low_rank": controller.compiled_graphs()["low_rank"]},
               f"{output_dir}/rank{args.process_index}.pt")
    # Tear the process group down before exit: left to interpreter shutdown, gloo's threads can abort a rank
    # ("terminate called without an active exception") after all the work is done.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "scratch")
