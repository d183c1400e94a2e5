"""`comet.profile`: per MoE layer of a Hugging Face model, the original block against the block run
through comet, on the very input the layer sees in a forward of the model.

Each block's input is captured with forward hooks during one forward; every block is then timed
alone on it: as the model came ("original"), under any other transformers experts implementation
named in `baselines` (e.g. "grouped_mm"), and patched by `comet.integrations.hf.apply`. On a GPU:
CUDA events, warm-up, median; on the CPU: `time.perf_counter`, labelled as not representative.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from torch import nn

from comet.backends import check_backend_name, resolve_backend
from comet.config import MoEConfig
from comet.hf_families import config_from_hf, find_moe_blocks
from comet.measurement import environment, time_ms

ORIGINAL = "original"
CPU_TIMING = "cpu perf_counter: interpreter/CPU timings, not representative of GPU speed"


def _first(output):
    """A block's hidden-state output (Llama4's block also returns its router logits)."""
    return output[0] if isinstance(output, tuple) else output


def _capture_block_inputs(model: nn.Module, names: list[str], inputs) -> dict[str, torch.Tensor]:
    captured = {}

    def hook_for(name):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            captured[name] = x.detach().clone()
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n), with_kwargs=True) for n in names]
    try:
        with torch.no_grad():
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        for h in handles:
            h.remove()
    return captured


def _time_blocks(model, names, captured, device, warmup, repeats, bar) -> dict[str, tuple[float, torch.Tensor]]:
    results = {}
    with torch.no_grad():
        for name in names:
            block = model.get_submodule(name)
            ms, out = time_ms(lambda: block(captured[name]), device, warmup, repeats)
            results[name] = (ms, _first(out))
            bar.update(1)
    return results


def _check_baselines(baselines, family: str) -> tuple[str, ...]:
    if isinstance(baselines, str) or not baselines:
        raise ValueError(f"baselines: expected a non-empty tuple of names, got {baselines!r}")
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    known = {ORIGINAL, "eager", *ALL_EXPERTS_FUNCTIONS.keys()} - {"comet"}
    for b in baselines:
        if b not in known:
            raise ValueError(
                f"baselines: {b!r} is neither 'original' nor a transformers experts implementation {sorted(known)}"
            )
        if b != ORIGINAL and family == "llama4":
            raise ValueError(f"baselines: Llama4's experts have no implementation switch; only {ORIGINAL!r} applies")
    return tuple(baselines)


def _layer_row(name: str, cfg: MoEConfig, x: torch.Tensor) -> dict:
    return {"layer": name, "family": cfg.family, "tokens": x.numel() // cfg.hidden_size,
            "hidden": cfg.hidden_size, "ffn": cfg.ffn_size, "experts": cfg.num_experts, "top_k": cfg.top_k,
            "dtype": str(x.dtype).removeprefix("torch.")}


def profile(
    model: nn.Module,
    inputs,
    baselines=(ORIGINAL,),
    backend: str = "auto",
    out_dir=None,
    *,
    process_group=None,
    warmup: int | None = None,
    repeats: int | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per MoE layer of `model` (a transformers model of a supported family, not patched):
    layer, family, tokens, hidden, ffn, experts, top_k, dtype, "<baseline> ms" per baseline, "ours ms",
    baseline (the first one's name), speedup (its time over ours), max abs diff and max rel diff (ours
    against its output; relative to its largest magnitude), backend, timing, gpu, torch, triton, commit.

    inputs: the model's keyword arguments (a dict) or its input ids. baselines: "original" (the
    model as it is) and/or transformers experts implementations ("eager", "grouped_mm", ...).
    out_dir: also write profile.csv and speedup.png there.
    """
    from comet.integrations import hf as comet_hf

    check_backend_name(backend)
    if comet_hf.is_applied(model):
        raise ValueError("model: already patched by comet; profile the original model (comet.integrations.hf.revert)")
    cfg = config_from_hf(model.config)
    baselines = _check_baselines(baselines, cfg.family)
    device = next(model.parameters()).device
    # With a process group the experts run expert-parallel (comet.ep: the Triton kernels).
    dtype = next(model.parameters()).dtype
    backend_name = "ep (triton)" if process_group is not None else resolve_backend(backend, device, dtype).name
    on_gpu = device.type == "cuda"
    warmup = (5 if on_gpu else 1) if warmup is None else warmup
    repeats = (20 if on_gpu else 3) if repeats is None else repeats

    names = [name for name, _ in find_moe_blocks(model)]
    was_training = model.training
    model.eval()  # training-only block behaviour (input jitter) would change what is timed
    try:
        captured = _capture_block_inputs(model, names, inputs)
        timed = {}
        for step in [*baselines, "ours"]:  # one bar per step, over the layers
            bar = _progress(step, len(names), progress)
            timed[step] = _time_step(model, step, names, captured, device, warmup, repeats, backend, process_group,
                                     bar)
            bar.close()
    finally:
        model.train(was_training)

    env = environment()
    timing = f"cuda events, median of {repeats} after {warmup} warm-up" if on_gpu else CPU_TIMING
    rows = []
    for name in names:
        row = _layer_row(name, cfg, captured[name])
        for b in baselines:
            row[f"{b} ms"] = timed[b][name][0]
        ours_ms, ours_out = timed["ours"][name]
        row["ours ms"] = ours_ms
        row["baseline"] = baselines[0]
        row["speedup"] = timed[baselines[0]][name][0] / ours_ms
        expected = timed[baselines[0]][name][1].float()
        row["max abs diff"] = (ours_out.float() - expected).abs().max().item()
        row["max rel diff"] = row["max abs diff"] / max(expected.abs().max().item(), torch.finfo(torch.float32).tiny)
        row.update(backend=backend_name, timing=timing, **env)
        rows.append(row)
    table = pd.DataFrame(rows)
    if out_dir is not None:
        save(table, out_dir)
    return table


def _time_step(model, step, names, captured, device, warmup, repeats, backend, process_group, bar):
    """Time every block as the model is, under another experts implementation, or patched ("ours")."""
    from comet.integrations import hf as comet_hf

    if step == ORIGINAL:
        return _time_blocks(model, names, captured, device, warmup, repeats, bar)
    if step == "ours":
        comet_hf.apply(model, process_group=process_group, backend=backend)
        try:
            return _time_blocks(model, names, captured, device, warmup, repeats, bar)
        finally:
            comet_hf.revert(model)
    previous = model.config._experts_implementation
    model.set_experts_implementation(step)
    try:
        return _time_blocks(model, names, captured, device, warmup, repeats, bar)
    finally:
        model.set_experts_implementation(previous)


class _NoBar:
    def update(self, _):
        pass

    def close(self):
        pass


def _progress(step: str, layers: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=layers, desc=step, unit="layer")


def save(table: pd.DataFrame, out_dir) -> tuple[Path, Path]:
    """Write `table` as profile.csv and its per-layer speedup as speedup.png in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "profile.csv", out / "speedup.png"
    table.to_csv(csv_path, index=False)

    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(table) + 2), 3.5))
    ax.bar(range(len(table)), table["speedup"], color="tab:blue")
    ax.axhline(1.0, color="gray", linewidth=1, linestyle="--")
    ax.set_xticks(range(len(table)), table["layer"], rotation=60, ha="right", fontsize=7)
    first = table.iloc[0]
    ax.set_ylabel(f"speedup ({first['baseline']} / comet)")
    title = f"{first['family']}, {first['tokens']} tokens, {first['dtype']}, backend {first['backend']}\n{first['gpu']}"
    if first["timing"] == CPU_TIMING:
        title += " (CPU timings: not representative)"
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return csv_path, png_path
