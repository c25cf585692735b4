"""Model-file pages leave the process's resident set once their bytes have been copied; nothing else is touched."""
from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from webui.engine.memory import host_pages
from webui.engine.weights.fp8 import fp8_state_dict_split

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise and /proc are Linux's")
MB = 1024 * 1024


def resident_mb(path) -> float:
    """This process's resident pages of ``path``'s mappings (pinned memory and libraries are not counted)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5] == str(path)
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total / 1024


@pytest.fixture
def mapped(tmp_path) -> dict[str, torch.Tensor]:
    """64 MB of float32 and 16 MB of bfloat16, memory-mapped from a safetensors file as load_file gives them."""
    path = tmp_path / "weights.safetensors"
    save_file({"a": torch.randn(16, MB), "b": torch.randn(8, MB).bfloat16()}, path)
    return path, load_file(path)


def test_released_pages_leave_the_resident_set_and_read_back_the_same(mapped):
    path, tensors = mapped
    tensor = tensors["a"]
    expected = tensor.clone()  # read: the file's pages become resident
    assert resident_mb(path) > 63

    released = host_pages.release([tensor])
    assert released > 63.9 * MB  # all but the partial pages at the two ends
    assert resident_mb(path) < 1
    assert torch.equal(tensor, expected), "read again, the bytes come from the file"


def test_memory_that_is_not_a_mapped_model_file_is_never_released():
    anonymous = torch.randn(4 * MB)
    expected = anonymous.clone()
    assert host_pages.release([anonymous, anonymous[::2], torch.empty(0)]) == 0
    assert torch.equal(anonymous, expected)


def test_casting_a_loaded_file_keeps_one_copy_of_its_bytes(mapped):
    path, tensors = mapped
    weights, _ = fp8_state_dict_split(tensors, torch.float16)
    assert weights["a"].dtype == torch.float16 and weights["b"].dtype == torch.float16
    assert resident_mb(path) < 1, "the originals' pages were given back once their fp16 copies existed"
    assert torch.equal(weights["a"], tensors["a"].half())
