"""What a LoRA costs one Q8_0 layer of Flux, each way it can be added: the figures behind ``lora.MERGE_COST_*``.

    python3 -m benchmarks.lora_layers

Flux-dev's layer shapes at 1344×768 (4 032 image tokens, 512 text tokens, 1 modulation vector), random
Q8_0 weights, bf16, ranks 32 and 128. Per layer, GPU time only (the host enqueues while the GPU sleeps,
so launch overheads do not count), in microseconds:
- the layer: unpack (Triton) + matmul;
- onto the output: the layer + ``x @ down.T`` + ``addmm`` into the output;
- into the weight: unpack, ``addmm_`` of ``up @ down`` onto it, matmul;
- fused: the unpacking kernel that adds ``up @ down`` itself, matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

SHAPES = [("attention, image tokens", 3072, 3072, 4032), ("MLP up, image tokens", 12288, 3072, 4032),
          ("MLP down, image tokens", 3072, 12288, 4032), ("attention, text tokens", 3072, 3072, 512),
          ("MLP up, text tokens", 12288, 3072, 512), ("modulation, one vector", 18432, 3072, 1)]


def gpu_us(fn, repeat: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(100_000_000)  # the GPU waits while the host enqueues everything: device time only
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat * 1000


def q8_0_blocks(rows: int, cols: int) -> torch.Tensor:
    blocks = torch.randint(0, 256, (rows * cols // 32, 34), dtype=torch.uint8, device="cuda")
    blocks[:, 0], blocks[:, 1] = 0x00, 0x20  # every block's fp16 scale 0x2000 = 2**-7: finite weights
    return blocks


def main() -> None:
    from webui.engine.weights import gguf_kernels
    from webui.engine.weights.quant import dequantize

    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}\n")
    print("| layer | rank | the layer | onto the output | into the weight | fused |\n|---|---|---|---|---|---|")
    for rank in (32, 128):
        for name, rows, cols, tokens in SHAPES:
            blocks = q8_0_blocks(rows, cols)
            x = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16)
            down = (torch.randn(rank, cols, device="cuda") / cols ** 0.5).bfloat16()
            up = (torch.randn(rows, rank, device="cuda") / rank ** 0.5).bfloat16()

            def unpacked() -> torch.Tensor:
                return dequantize(blocks, Q.Q8_0, (rows, cols), torch.bfloat16, fused=True)

            def into_weight() -> torch.Tensor:
                return F.linear(x, unpacked().addmm_(up, down))

            layer = gpu_us(lambda: F.linear(x, unpacked()))
            output = gpu_us(lambda: torch.addmm(F.linear(x, unpacked()), F.linear(x, down), up.t()))
            weight = gpu_us(into_weight)
            fused = gpu_us(lambda: F.linear(x, gguf_kernels.q8_0_plus_low_rank(blocks, (rows, cols), up, down)))
            cells = " | ".join(f"{t:.0f} (+{t - layer:.0f})" for t in (output, weight, fused))
            print(f"| {name} ({rows}×{cols}, {tokens} tokens) | {rank} | {layer:.0f} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
