"""Benchmark CLI (``python -m flashdelta.bench``): flashdelta against FLA's Triton path and FlashQLA,
with cross-checks, CUDA-graph and eager timings, first-call (compile) time and a roofline floor."""
