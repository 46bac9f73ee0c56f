"""Tests of the benchmark harness (benchmarks/): results file, baselines, the GPU step on a CPU."""
