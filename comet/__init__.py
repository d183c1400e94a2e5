"""comet-moe: drop-in Mixture-of-Experts layer with persistent Triton expert kernels and
COMET-style overlapped expert parallelism."""
from comet.config import MoEConfig
from comet.functional import moe, moe_experts
from comet.layer import MoELayer
from comet.profiler import profile
from comet.weights import ExpertWeights

__version__ = "0.1.0"
__all__ = ["MoEConfig", "MoELayer", "ExpertWeights", "moe", "moe_experts", "profile", "__version__"]
