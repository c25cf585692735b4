"""GPU benchmarks: the project beside its reference, measured in one run on one machine."""
