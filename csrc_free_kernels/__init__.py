"""Triton kernels and their thin launchers (imported as `comet.kernels`). No C/C++/CUDA source."""
