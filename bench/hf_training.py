#!/usr/bin/env python3
"""Loss curves of a small Hugging Face MoE model trained from one init, unpatched and patched by
`comet.integrations.hf.apply` (our kernels), same data, same optimizer: the curves should agree
within the dtype's noise, which a third curve shows: unpatched with transformers' "eager" experts
(a loop over experts) instead of its default. Writes bench/results/hf_training.csv (one row per
step and variant) and hf_training.png; with $OUT set, copies there.

    python -m bench.hf_training                       # Qwen3-MoE, 4 layers, hidden 512, 50 steps, bf16 (GPU)
    python -m bench.hf_training --smoke               # the tiny model, 3 steps, fp32, on CPU (interpreter)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from bench.common import RESULTS_DIR, append_csv, environment, plot_panels, progress, publish, run_on_device
from comet.tiny_models import build_tiny_model

# A small Qwen3-MoE: 4 layers, hidden 512, 32 experts of width 256, top-4.
SMALL = dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=64,
             moe_intermediate_size=256, intermediate_size=1024, num_experts=32, num_experts_per_tok=4,
             vocab_size=4096, max_position_embeddings=1024)


def train(model, batches, steps: int, lr: float, bar) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().item())
        bar.update()
    return losses


def run(args, device) -> int:
    from comet.integrations import hf as comet_hf

    env = environment(device)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    overrides = {} if args.smoke else SMALL
    torch.manual_seed(args.seed)
    vocab = build_tiny_model("qwen3_moe", seed=args.seed, **overrides).config.vocab_size
    batches = [torch.randint(3, vocab, (args.batch, args.seq), device=device) for _ in range(8)]
    bar = progress(3 * args.steps, "hf_training")
    curves = {}
    for variant in ("transformers", "transformers_eager", "comet"):
        model = build_tiny_model("qwen3_moe", seed=args.seed, **overrides).to(device, dtype)
        if variant == "comet":
            comet_hf.apply(model, backend="triton")
        elif variant == "transformers_eager":
            if not hasattr(model, "set_experts_implementation"):  # a transformers without the choice
                bar.update(args.steps)
                continue
            model.set_experts_implementation("eager")
        curves[variant] = train(model, batches, args.steps, args.lr, bar)
        del model
    bar.close()
    rows = [{**env, "model": "qwen3_moe" + ("-tiny" if args.smoke else "-small"), "dtype": str(dtype)[6:],
             "step": step, "variant": variant, "loss": loss}
            for variant, losses in curves.items() for step, loss in enumerate(losses)]
    def gap(variant):
        return max(abs(a - b) for a, b in zip(curves["transformers"], curves[variant]))

    results = args.results_dir
    append_csv(results / "hf_training.csv", rows)
    import pandas as pd

    png = results / "hf_training.png"
    plot_panels(pd.DataFrame(rows).assign(panel="loss"), png, panel="panel", x="step", y="loss", series="variant",
                ylabel="training loss", title=f"Qwen3-MoE trained from one init ({str(dtype)[6:]})", log_x=False)
    publish([png])
    print(f"{'step':>5}" + "".join(f"{v:>20}" for v in curves))
    for step in range(0, args.steps, max(1, args.steps // 10)):
        print(f"{step:>5}" + "".join(f"{c[step]:>20.4f}" for c in curves.values()))
    print(f"largest difference from the transformers curve (first loss {curves['transformers'][0]:.4f}): "
          + ", ".join(f"{v} {gap(v):.4f}" for v in curves if v != "transformers"))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="the tiny model, 3 steps, on CPU (interpreter)")
    p.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.seq = args.steps or 3, 2, 8
    else:
        args.steps = args.steps or 50
    return run_on_device("hf_training.py", args, run)


if __name__ == "__main__":
    sys.exit(main())
