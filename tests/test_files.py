"""Reading model files without trusting them: bad files give clear errors, never crashes or code execution."""
from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from webui.engine.formats.files import (
    HASH_CHUNK,
    HashCache,
    find_checkpoints,
    find_files,
    load_state_dict,
    read_safetensors_header,
    short_hash,
)
from webui.engine.formats.gguf_file import read_gguf
from webui.errors import ModelFileError, UserError


def raw_safetensors(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def test_truncated_file_names_the_problem(tmp_path, sd1_file):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(sd1_file.read_bytes()[: sd1_file.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        load_state_dict(broken)


def test_header_that_lies_about_sizes(tmp_path):
    path = raw_safetensors(tmp_path / "lie.safetensors",
                           {"w": {"dtype": "F32", "shape": [10, 10], "data_offsets": [0, 4]}}, b"\0" * 4)
    with pytest.raises(ModelFileError, match="lies about tensor 'w'"):
        read_safetensors_header(path)


def test_header_longer_than_file(tmp_path):
    path = tmp_path / "short.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(ModelFileError, match="truncated or not a safetensors file"):
        read_safetensors_header(path)


def test_a_text_file_named_safetensors_is_refused_without_echoing_its_bytes(tmp_path):
    """A symlink to /etc/passwd leaked "root:x:0" through the header length it printed."""
    path = tmp_path / "passwd.safetensors"
    path.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n" * 4)
    with pytest.raises(ModelFileError, match="not a safetensors file") as refused:
        read_safetensors_header(path)
    assert str(struct.unpack("<Q", b"root:x:0")[0]) not in str(refused.value)


@pytest.mark.parametrize("header", [
    b"[" * 100_000 + b"]" * 100_000,  # deeper than Python's recursion limit: was a RecursionError (a 500)
    json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}).encode(),  # a 500 comparing str
    json.dumps({"w": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}).encode(),
    json.dumps({"__metadata__": [1, 2]}).encode(),
], ids=["deep", "string offsets", "list dtype", "list metadata"])
def test_headers_that_trip_the_parser_are_corrupt_files(tmp_path, header):
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4)
    with pytest.raises(ModelFileError, match="odd.safetensors"):
        read_safetensors_header(path)


@pytest.mark.parametrize("content", [b"", b"abc", b"\xff" * 64])
def test_garbage_is_not_a_safetensors_file(tmp_path, content):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError):
        load_state_dict(path)


def test_pickle_that_carries_code_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": Exploit()}}, path)
    with pytest.raises(ModelFileError, match="refused"):
        load_state_dict(path)
    assert not marker.exists()


def test_plain_weights_pickle_loads(tmp_path):
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"a": torch.ones(2)}, "global_step": 3}, path)
    assert torch.equal(load_state_dict(path)["a"], torch.ones(2))


def test_safetensors_round_trip(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, str(path), metadata={"k": "v"})
    infos, metadata = read_safetensors_header(path)
    assert infos["a"].shape == (2, 3) and metadata == {"k": "v"}
    assert torch.equal(load_state_dict(path)["a"], torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_find_checkpoints_recursively_with_folders(tmp_path, sd1_folder):
    root = tmp_path / "Stable-diffusion"
    (root / "sub").mkdir(parents=True)
    (root / "a.safetensors").write_bytes(b"x")
    (root / "sub" / "b.gguf").write_bytes(b"x")
    (root / "sub" / "c.ckpt").write_bytes(b"x")
    (root / "notes.txt").write_text("ignored")
    (root / "pipe").symlink_to(sd1_folder, target_is_directory=True)
    found = {c.name: c.kind for c in find_checkpoints([root])}
    assert found == {"a.safetensors": "safetensors", "sub/b.gguf": "gguf", "sub/c.ckpt": "ckpt", "pipe": "diffusers"}


def test_engines_sharing_a_hash_cache_keep_each_others_hashes(tmp_path):
    """Several engines on one data dir (Ray Serve replicas): each write keeps what the others wrote, and none trips
    over another's temporary file."""
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    one, other = (HashCache(tmp_path / "cache.json", lambda: False) for _ in range(2))
    one.sha256(first)
    other.sha256(second)
    fresh = HashCache(tmp_path / "cache.json", lambda: False)
    assert fresh.cached(first) == hashlib.sha256(b"first").hexdigest()
    assert fresh.cached(second) == hashlib.sha256(b"second").hexdigest()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_hash_is_a1111_short_hash_and_cached(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"model bytes")
    cache = HashCache(tmp_path / "cache.json", lambda: False)
    expected = hashlib.sha256(b"model bytes").hexdigest()
    assert cache.sha256(path) == expected and short_hash(expected) == expected[:10]
    assert HashCache(tmp_path / "cache.json", lambda: False).cached(path) == expected, "the hash survives a restart"
    path.write_bytes(b"other bytes!")
    assert HashCache(tmp_path / "cache.json", lambda: False).cached(path) is None, "a changed file is hashed again"
    assert cache.sha256(path) == hashlib.sha256(b"other bytes!").hexdigest()


def test_gguf_checkpoint_is_recognised_and_asks_for_its_text_encoders(tmp_path):
    from gguf import GGMLQuantizationType as Q

    from tests.conftest import make_engine
    from webui.engine.formats.detect import Family, detect_family
    from webui.engine.formats.files import read_tensor_infos
    from webui.engine.request import GenerationRequest
    from webui.engine.weights.gguf_load import quantize_where_possible, write_gguf
    from webui.synthetic.builders import build_flux_transformer
    from webui.synthetic.ldm_export import flux_to_bfl

    model = build_flux_transformer("tiny")
    path = write_gguf(tmp_path / "flux-tiny-Q8_0.gguf", flux_to_bfl(model.state_dict(), model.config),
                      quantize_where_possible(Q.Q8_0))
    infos, metadata = read_tensor_infos(path)
    assert detect_family(infos, metadata) is Family.FLUX and metadata["general.architecture"] == "flux"
    assert "Q8_0" in {info.dtype for info in infos.values()}
    engine = make_engine(tmp_path / "data", path)
    assert any(c.kind == "gguf" for c in engine.models.checkpoints())
    with pytest.raises(UserError, match="VAE / Text Encoder") as missing:
        engine.txt2img(GenerationRequest(checkpoint=path.name, width=64, height=64, steps=1))
    assert missing.value.field == "forge_additional_modules"


# ---- a hostile models folder (issue 22) ----------------------------------------------------------------------


def finished(call, seconds: float = 20.0):
    """What ``call()`` returned or raised, run in a thread given ``seconds``: opening a fifo or reading /dev/zero
    never ended, and a test should say so instead of hanging."""
    outcome: list = []

    def run():
        try:
            outcome.append(call())
        except BaseException as e:  # noqa: B036 (handed to the test)
            outcome.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"still running after {seconds} s"
    return outcome[0]


def not_regular_files(folder: Path, suffix: str) -> list[Path]:
    """A fifo and a symlink to /dev/zero, named as model files."""
    folder.mkdir(parents=True, exist_ok=True)
    fifo, zero = folder / f"fifo{suffix}", folder / f"zero{suffix}"
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    return [fifo, zero]


def test_fifos_and_devices_are_not_listed_as_models(tmp_path):
    """Hashing a listed fifo or /dev/zero held the generation queue for good; a symlink to a file is still a model."""
    root = tmp_path / "Stable-diffusion"
    not_regular_files(root, ".safetensors")
    (root / "real.safetensors").write_bytes(b"x")
    (root / "link.safetensors").symlink_to(root / "real.safetensors")
    assert [c.name for c in find_checkpoints([root])] == ["link.safetensors", "real.safetensors"]
    assert [p.name for p in find_files(root, (".safetensors",))] == ["link.safetensors", "real.safetensors"]


def hashed(path: Path) -> str:
    return HashCache(path.parent / "cache.json", lambda: False).sha256(path)


@pytest.mark.parametrize("suffix, read", [
    (".safetensors", read_safetensors_header), (".safetensors", load_state_dict), (".ckpt", load_state_dict),
    (".gguf", read_gguf), (".safetensors", hashed),
], ids=["safetensors header", "safetensors", "pickle", "gguf", "hash"])
def test_a_model_file_replaced_by_a_fifo_or_device_is_refused_at_once(tmp_path, suffix, read):
    """A file can be swapped after it was listed: every reader opens it without waiting and refuses what is not a
    regular file, naming it."""
    for path in not_regular_files(tmp_path, suffix):
        refused = finished(lambda: read(path))
        assert isinstance(refused, ModelFileError) and f"{path.name} is not a regular file" in str(refused)


def symlink_loop(root: Path) -> None:
    """root/a.vae.pt, root/sub/b.vae.pt, root/sub/up -> root (a loop), root/twin -> root/sub (the same folder)."""
    (root / "sub").mkdir(parents=True)
    for path in (root / "a.vae.pt", root / "sub" / "b.vae.pt"):
        path.write_bytes(b"x")
    (root / "sub" / "up").symlink_to(root, target_is_directory=True)
    (root / "twin").symlink_to(root / "sub", target_is_directory=True)


def test_a_symlink_loop_is_walked_once(tmp_path):
    """refresh-checkpoints walked a loop for ever (+500 MB); each real folder is walked once, a linked one too."""
    models = tmp_path / "models"
    symlink_loop(models)
    (models / "elsewhere").symlink_to(tmp_path / "outside", target_is_directory=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "c.vae.pt").write_bytes(b"x")
    expected = ["a.vae.pt", "elsewhere/c.vae.pt", "sub/b.vae.pt"]
    assert [c.name for c in finished(lambda: find_checkpoints([models]))] == expected
    assert [p.relative_to(models).as_posix() for p in finished(lambda: find_files(models, (".pt",)))] == expected


def test_names_that_are_not_utf8_are_not_listed(tmp_path):
    """A file named with bytes that are not UTF-8 made /sdapi/v1/sd-models and /sdapi/v1/loras answer 500."""
    root = tmp_path / "Stable-diffusion"
    root.mkdir()
    (root / os.fsdecode(b"\xff.safetensors")).write_bytes(b"x")
    (root / "ok.safetensors").write_bytes(b"x")
    assert [c.name for c in find_checkpoints([root])] == ["ok.safetensors"]


def test_hashing_stops_at_an_interrupt_between_chunks(tmp_path):
    """Hashing a huge checkpoint ran to the end whatever the user pressed; nothing half-hashed is kept."""
    path = tmp_path / "big.safetensors"
    path.write_bytes(b"\0" * (3 * HASH_CHUNK))
    asked = []
    cache = HashCache(tmp_path / "cache.json", lambda: asked.append(1) or len(asked) > 1)
    with pytest.raises(UserError, match="Interrupted while hashing big.safetensors"):
        cache.sha256(path)
    assert len(asked) == 2 and cache.cached(path) is None


@pytest.mark.parametrize("suffix, read", [(".ckpt", load_state_dict), (".gguf", read_gguf)], ids=["pickle", "gguf"])
@pytest.mark.parametrize("content", [b"root:x:0:0:root:/root:/bin/bash\n", b"csecret\npassword\n",
                                     b"GGUFsecret password"], ids=["passwd", "pickle global", "gguf version"])
def test_a_text_file_named_as_a_model_is_refused_without_echoing_its_bytes(tmp_path, suffix, read, content):
    """A symlink to any file can be named .ckpt or .gguf: the refusal quoted it ("version 1919116659": b"secr"), or
    was an IndexError (a 500)."""
    path = tmp_path / f"passwd{suffix}"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=path.name) as refused:
        read(path)
    quoted = ["root", "secret", "password", str(struct.unpack("<I", b"secr")[0])]
    assert not [word for word in quoted if word in str(refused.value)]
