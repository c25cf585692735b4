"""Where every weight lives: the memory manager's policy, streaming to the GPU, pinned and host pages, the trace, the model cache."""

MB = 1024 * 1024  # the unit every memory figure is shown in (bytes in a MiB, as A1111 and Forge count)
