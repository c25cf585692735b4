"""A benchmark's result as the Markdown section BENCHMARKS.md keeps: title with date and device, what was run, table."""
from __future__ import annotations

import os
import time

import torch


def print_table(title: str, description: str, header: list[str], rows: list[str]) -> None:
    """``rows`` are Markdown table lines already (``| a | b |``)."""
    where = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    device = f"{where}, torch {torch.__version__}"
    print(f"\n## {title} — {time.strftime('%Y-%m-%d')}, {device}\n")
    print(f"{description}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    print("\n".join(rows))
