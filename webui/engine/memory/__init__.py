"""Where every weight lives: the memory manager's policy, streaming to the GPU, pinned and host pages, the trace, the model cache."""
