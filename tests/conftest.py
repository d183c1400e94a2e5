"""Test setup: without a GPU, kernels run under the Triton interpreter. TRITON_INTERPRET must be
set before any kernel module is imported, so it is set here, before the tests are collected."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _triton_version() -> tuple[int, int]:
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2])


# Kernels loop `for item in range(tl.program_id(0), ...)`; Triton 3.6's interpreter cannot (its
# program id is a 1-element array), Triton 3.9's can; 3.7-3.8 are untested. Compiled kernels are
# fine on 3.6. Tests that force the interpreter (CPU ranks) carry this mark.
needs_interpreter_loops = pytest.mark.skipif(
    _triton_version() < (3, 9), reason="the Triton interpreter before 3.9 cannot loop from tl.program_id")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different, reported seed per test: inputs are fresh each run yet reproducible."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failure's report names the test's seed (skips and passes say nothing)."""
    report = yield
    if report.failed:
        for key, value in item.user_properties:
            if key == "seed":
                report.sections.append(("torch seed", f"torch seed = {value}"))
    return report


@pytest.fixture
def load_paths(monkeypatch):
    """load_paths(descriptors): how the routed experts' kernels (`comet.ops`, forward and backward)
    read their operands from then on. True: through tensor descriptors wherever the picked configs
    and the layouts allow, at any tile height (the interpreter's tiles are small). False: through
    pointers only, every picked config with weight_descriptors = input_descriptors = False."""
    import dataclasses

    import comet.kernels.expert_gemm as expert_gemm
    import comet.ops

    def use(descriptors: bool):
        monkeypatch.setattr(expert_gemm, "DESCRIPTOR_MIN_BLOCK_M", 0)
        if descriptors:
            return
        select, backward = comet.ops.select_configs, comet.ops.backward_configs

        def pointers(cfg):
            return dataclasses.replace(cfg, weight_descriptors=False, input_descriptors=False)

        def backward_pointers(*args):
            return backward(*args).map_gemms(pointers)

        monkeypatch.setattr(comet.ops, "select_configs", lambda *args: tuple(map(pointers, select(*args))))
        monkeypatch.setattr(comet.ops, "backward_configs", backward_pointers)

    return use
