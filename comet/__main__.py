"""`python -m comet`: the command line. Each subcommand is a small function registered with
`@command` below; `main` builds the parser from that one registry."""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable

import torch

# Without a GPU the Triton kernels can only run under the interpreter, which must be chosen before
# any kernel module is imported (backends are loaded lazily, so this is early enough).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DESCRIPTION = """\
comet-moe: a drop-in Mixture-of-Experts layer whose experts run in persistent Triton kernels,
with COMET-style overlap of expert-parallel communication and expert GEMMs.

  python -m comet info                          what this machine offers: GPUs, links, backends
  python -m comet demo                          tiny Mixtral, its MoE layers through comet vs the originals
  python -m comet profile --model mixtral-tiny  per-layer time and error of a model, CSV and plot with --out
  python -m comet tune                          sweep the kernels' tile configs on this GPU, write its table
  torchrun --nproc-per-node W -m comet tune --ep-split   sweep the expert-parallel split over W GPUs, write its table

In Python: comet.MoELayer (your own model), comet.integrations.hf.apply(model) (a Hugging Face
model), comet.integrations.megatron.apply(model) (Megatron-Core), comet.profile(model, inputs).
"""
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None] = lambda p: None):
    """Register `run(args) -> exit code` as subcommand `name`."""
    def register(run):
        COMMANDS[name] = Command(name, help, add_arguments, run)
        return run
    return register


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# info
# ----------------------------------------------------------------------------------------------
def _version(module: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(module)
    except metadata.PackageNotFoundError:
        return "not installed"


def _symmetric_memory_status() -> str:
    if not torch.cuda.is_available():
        return "no (needs CUDA GPUs)"
    try:
        importlib.import_module("torch.distributed._symmetric_memory")
    except ImportError as exc:
        return f"no ({exc})"
    return "yes (torch.distributed._symmetric_memory)"


def _link_topology() -> str:
    nvidia_smi = shutil.which("nvidia-smi")
    if nvidia_smi is None:
        return "nvidia-smi not found"
    try:
        result = subprocess.run([nvidia_smi, "topo", "-m"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"nvidia-smi topo -m failed: {exc}"
    return result.stdout.strip() or result.stderr.strip()


@command("info", "GPUs, their links, library versions, symmetric memory, and which backends can run here")
def info(args) -> int:
    from comet import __version__
    from comet.backends import backend_status
    from comet.measurement import git_commit

    print(f"comet-moe {__version__} (commit {git_commit()}), Python {sys.version.split()[0]}")
    for package in ("torch", "triton", "transformers", "megatron-core"):
        print(f"  {package:13s} {_version(package)}")
    if torch.cuda.is_available():
        print(f"GPUs ({torch.cuda.device_count()}), CUDA {torch.version.cuda}:")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
                  f"{p.total_memory / 2**30:.0f} GiB")
        print("links (nvidia-smi topo -m):")
        print("  " + _link_topology().replace("\n", "\n  "))
    else:
        print("GPUs: none (kernels run under the Triton interpreter: TRITON_INTERPRET="
              f"{os.environ.get('TRITON_INTERPRET', '')})")
    print(f"symmetric memory: {_symmetric_memory_status()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print("backends:")
    for device in devices:
        for name, reason in backend_status(torch.device(device)).items():
            print(f"  {name:10s} on {device:4s}: {'usable' if reason is None else 'not usable: ' + reason}")
    return 0


# ----------------------------------------------------------------------------------------------
# profile
# ----------------------------------------------------------------------------------------------
def _profile_arguments(p: argparse.ArgumentParser):
    from comet.model_shapes import DEFAULT_LAYERS, model_names

    p.add_argument("--model", required=True,
                   help=f"one of {', '.join(model_names())}, or a local checkpoint directory")
    p.add_argument("--tokens", type=int, default=512, help="tokens in the batch (one sequence; default 512)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="default bf16")
    p.add_argument("--backend", default="auto", help="comet backend: auto, reference, triton, ... (default auto)")
    p.add_argument("--baselines", nargs="+", default=["original"],
                   help="what comet is compared with: original and/or transformers experts implementations "
                        "(eager, grouped_mm, batched_mm); speedups are over the first")
    p.add_argument("--out", help="directory for profile.csv and speedup.png")
    p.add_argument("--ep", type=int, metavar="W",
                   help="expert parallelism over W ranks; run under torchrun --nproc-per-node W")
    p.add_argument("--layers", type=int, default=DEFAULT_LAYERS, help="decoder layers of a -shape model")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)


def _expert_parallel_group(world_size: int):
    """The default process group of a torchrun launch of `world_size` ranks, and this rank's device."""
    import torch.distributed as dist

    if "WORLD_SIZE" not in os.environ:
        raise ValueError(f"--ep {world_size}: run under torchrun --nproc-per-node {world_size}")
    if int(os.environ["WORLD_SIZE"]) != world_size:
        raise ValueError(f"--ep {world_size}: torchrun started {os.environ['WORLD_SIZE']} ranks")
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    else:
        device = "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.group.WORLD, device


PRINTED_COLUMNS = ["layer", "tokens", "experts", "top_k"]
ERROR_COLUMNS = ["max abs diff", "max rel diff"]
# The largest "max rel diff" (relative to the baseline's largest magnitude) that passes, per dtype:
# fp32 for the demo's whole model; half precision a few units of its rounding (bf16: 2**-8).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def _verdicts(table) -> bool:
    """Add each row's tolerance and verdict (OK / FAIL) to `table`; whether every row passed."""
    table["tolerance"] = [TOLERANCE[getattr(torch, dtype)] for dtype in table["dtype"]]
    passed = table["max rel diff"] <= table["tolerance"]
    table["verdict"] = passed.map({True: "OK", False: "FAIL"})
    return bool(passed.all())


def _reference_note(backend: str, device: str) -> str:
    """What a run through comet's PyTorch reference measured (nothing of the Triton kernels)."""
    why = "--backend auto takes it off a GPU" if backend == "auto" else f"--backend {backend}"
    return (f"note: comet ran its PyTorch reference ({why}): the table compares it with the original blocks, "
            f"not the Triton kernels; --backend triton runs the kernels"
            + (" under the Triton interpreter" if device == "cpu" else ""))


@command("profile", "time every MoE layer of a model, original vs comet, on the inputs the layers really see",
         _profile_arguments)
def profile_command(args) -> int:
    from comet.model_shapes import build_model
    from comet.profiler import profile

    if args.tokens < 1:
        raise ValueError(f"--tokens: expected a positive number, got {args.tokens}")
    device = args.device or default_device()
    process_group = None
    if args.ep is not None:
        process_group, device = _expert_parallel_group(args.ep)
    torch.manual_seed(args.seed)
    model = build_model(args.model, device=device, dtype=DTYPES[args.dtype], num_layers=args.layers)
    input_ids = torch.randint(0, model.config.vocab_size, (1, args.tokens), device=device)
    table = profile(model, {"input_ids": input_ids}, baselines=tuple(args.baselines), backend=args.backend,
                    out_dir=args.out, process_group=process_group, progress=True)
    ok = _verdicts(table)
    columns = [*PRINTED_COLUMNS, *(f"{b} ms" for b in args.baselines), "ours ms", "speedup", *ERROR_COLUMNS,
               "tolerance", "verdict"]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    row = table.iloc[0]
    print(f"backend {row['backend']}, {row['gpu']}, torch {row['torch']}, triton {row['triton']}, "
          f"commit {row['commit']}")
    print(f"timing: {row['timing']}")
    if row["backend"] == "reference":
        print(_reference_note(args.backend, torch.device(device).type))
    print(f"outputs against {row['baseline']}: {'OK' if ok else 'FAIL'} (max rel diff within the {args.dtype} "
          f"tolerance {TOLERANCE[DTYPES[args.dtype]]:g} on every layer{'' if ok else ': not on all'})")
    if args.out:
        print(f"wrote {os.path.join(args.out, 'profile.csv')} and {os.path.join(args.out, 'speedup.png')}")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------------------------------
def _demo_arguments(p: argparse.ArgumentParser):
    p.add_argument("--tokens", type=int, default=32, help="default 32")
    p.add_argument("--backend", default=None,
                   help="default: triton where it can run (a GPU, or the interpreter on the CPU), else reference")


@command("demo", "tiny Mixtral built from a config: its MoE layers through comet, compared with the originals",
         _demo_arguments)
def demo(args) -> int:
    from comet.backends import backend_status
    from comet.integrations import hf as comet_hf
    from comet.profiler import profile
    from comet.tiny_models import build_tiny_model

    device = default_device()
    backend = args.backend or ("triton" if backend_status(torch.device(device)).get("triton") is None else "reference")
    model = build_tiny_model("mixtral").to(device)
    c = model.config
    print(f"tiny Mixtral: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_local_experts} experts, "
          f"top-{c.num_experts_per_tok}, expert FFN {c.intermediate_size}, fp32, on {device}; "
          f"comet backend {backend!r}")
    generator = torch.Generator(device).manual_seed(0)
    input_ids = torch.randint(0, c.vocab_size, (1, args.tokens), device=device, generator=generator)

    table = profile(model, {"input_ids": input_ids}, backend=backend)
    columns = [*PRINTED_COLUMNS, "original ms", "ours ms", *ERROR_COLUMNS]
    print(table[columns].to_string(index=False, float_format=lambda v: f"{v:.3g}"))

    with torch.no_grad():
        expected = model(input_ids).logits
        comet_hf.apply(model, backend=backend)
        actual = model(input_ids).logits
        comet_hf.revert(model)
    rel = ((actual - expected).abs().max() / expected.abs().max()).item()
    ok = rel <= TOLERANCE[torch.float32]
    print(f"whole model, logits through comet vs original: relative max error {rel:.2e} "
          f"({'OK' if ok else 'FAIL'}, tolerance {TOLERANCE[torch.float32]:g})")
    if device == "cpu":
        print("note: CPU timings (PyTorch on the CPU, Triton kernels in the interpreter) say nothing about "
              "GPU speed; on the CPU the demo shows that the outputs match.")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------
# tune
# ----------------------------------------------------------------------------------------------
TUNE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
TUNE_TOKENS = (128, 1024, 4096, 16384)


def model_shape(name: str) -> tuple[int, int, int, int]:
    """(experts, hidden, ffn, top_k) of a `comet.model_shapes` model (its published config)."""
    from comet.config import MoEConfig
    from comet.model_shapes import shape_config

    cfg = MoEConfig.from_hf(shape_config(name))
    return cfg.num_experts, cfg.hidden_size, cfg.ffn_size, cfg.top_k


def tuning_shapes(names, ep_ranks=(1,)) -> dict:
    """name -> (experts, hidden, ffn, top_k, W) to tune, for each W of `ep_ranks`: W = 1 the model
    whole, W > 1 one of W expert-parallel ranks ("name/W": E/W experts, top_k at most E/W; the
    token counts then mean tokens per rank)."""
    shapes = {}
    for name in names:
        e, h, f, k = model_shape(name)
        for w in ep_ranks:
            if w < 1 or e % w:
                raise ValueError(f"ep_ranks: {name}'s {e} experts do not split over {w} ranks")
            shapes[name if w == 1 else f"{name}/{w}"] = (e // w, h, f, min(k, e // w), w)
    return shapes


def _tune_arguments(parser: argparse.ArgumentParser):
    from comet.model_shapes import SHAPES

    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES),
                        help="model shapes to tune (default: all)")
    parser.add_argument("--tokens", nargs="+", type=int, default=list(TUNE_TOKENS),
                        help="token counts; each gives a rows-per-expert bucket (default: %(default)s)")
    parser.add_argument("--ep-ranks", nargs="+", type=int, default=[1], metavar="W",
                        help="tune each shape as one of W expert-parallel ranks (E/W experts; the token counts "
                             "are then per rank); 1: the whole layer (default: %(default)s)")
    parser.add_argument("--dtype", choices=list(TUNE_DTYPES), default="bf16")
    parser.add_argument("--dry-run", action="store_true", help="print the table, do not write it")
    parser.add_argument("--ep-split", action="store_true",
                        help="instead, tune the expert-parallel split (n_comm, column_chunks) over the GPUs of a "
                             "torchrun launch and write scheduler/tables/ep_<gpu>.json, which n_comm='auto' "
                             "reads: torchrun --nproc-per-node W -m comet tune --ep-split (W >= 2 ranks, one GPU "
                             "each; the token counts are per rank)")
    parser.add_argument("--n-comm", nargs="+", type=int, default=None, metavar="N",
                        help="with --ep-split: pushing programs of the fused candidates (default: 8 16 32)")


@command("tune", "sweep the expert kernels' tile configs on this GPU and write its table "
         "(scheduler/tables/<gpu>.json), which later calls read", _tune_arguments)
def tune_command(args) -> int:
    if args.ep_split:
        return _tune_ep_split(args)
    try:
        shapes = tuning_shapes(args.shapes, args.ep_ranks)
    except ValueError as err:
        print(f"comet tune: {err}")
        return 2
    if not torch.cuda.is_available():
        print("comet tune: needs a CUDA GPU (it times compiled kernels)")
        return 2
    from comet.scheduler import tune

    tune.run(shapes, args.tokens, TUNE_DTYPES[args.dtype], torch.device("cuda"), write=not args.dry_run)
    return 0


def _tune_ep_split(args) -> int:
    """`comet tune --ep-split` on one torchrun rank: `comet.ep_tune`'s sweep over the group, the
    table written by rank 0."""
    import torch.distributed as dist

    from comet import ep_tune
    from comet.config import MoEConfig
    from comet.model_shapes import shape_config
    from comet.multiprocess import init_torchrun_rank
    from comet.scheduler.configs import gpu_key

    if args.ep_ranks != [1]:
        print("comet tune: --ep-split tunes over the torchrun group (its size is W); leave out --ep-ranks")
        return 2
    n_comms = args.n_comm or list(ep_tune.DEFAULT_N_COMM)
    if min(n_comms) < 1 or min(args.tokens) < 1:
        print("comet tune: --n-comm and --tokens must be positive")
        return 2
    init_torchrun_rank("comet tune --ep-split")
    try:
        if dist.get_world_size() < 2:
            print("comet tune: --ep-split needs at least 2 ranks (torchrun --nproc-per-node W, W >= 2)")
            return 2
        device, dtype = torch.device("cuda", torch.cuda.current_device()), TUNE_DTYPES[args.dtype]
        configs = {name: MoEConfig.from_hf(shape_config(name)) for name in args.shapes}
        rows = ep_tune.sweep_splits(configs, args.tokens, dtype, device, n_comms)
        if dist.get_rank() == 0:
            for r in rows:
                print(f"{r['shape']} T/rank={r['tokens_per_rank']} n_comm={r['n_comm']} "
                      f"column_chunks={r['column_chunks']}: {r['status']} {r['ms']:.3f} ms")
            best = ep_tune.best_splits(rows)
            if not args.dry_run:
                print(f"wrote {ep_tune.write_splits(best, configs, dist.get_world_size(), dtype, gpu_key(device))}")
    finally:
        dist.destroy_process_group()
    return 0


# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m comet", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return args.run(args)
    except (ValueError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
