"""Weights as they are stored and computed: quantized (GGUF) and FP8 layers, their kernels, T5's storage."""
