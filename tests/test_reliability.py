"""What survives a crash or a corrupt file: config.json, the saved images, and the message the user sees."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from PIL import Image

from tests.conftest import make_engine
from webui.engine.outputs import remove_stale_temp_files, save_image
from webui.jobs import JobQueue
from webui.settings import Options
from webui.ui import build_ui

WRITER = """
import itertools, sys
from pathlib import Path
from PIL import Image
from webui.engine.outputs import save_image
from webui.settings import Options

data = Path(sys.argv[1])
options = Options(data / "config.json")
image = Image.new("RGB", (256, 256), "red")
print("ready", flush=True)
for i in itertools.count():
    save_image(image, data / "outputs", i, f"image {i}", f"image {i}\\nSteps: {i}")
    options.update({"max_steps": 100 + i % 50, "sd_vae": "x" * (i % 4000)})
"""


def test_killing_the_process_while_it_saves_leaves_every_image_and_the_config_whole(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(tmp_path)],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "ready"
    time.sleep(1.5)  # hundreds of saves
    writer.send_signal(signal.SIGKILL)
    writer.wait(timeout=30)

    images = sorted((tmp_path / "outputs").rglob("*.png"))
    assert len(images) > 20
    for path in images:
        with Image.open(path) as image:
            image.load()  # the whole file decodes
            assert image.size == (256, 256) and image.info["parameters"].startswith("image ")
    assert isinstance(json.loads((tmp_path / "config.json").read_text()), dict)
    stored = Options(tmp_path / "config.json")
    assert 100 <= stored["max_steps"] < 150 and not stored.problems
    assert not (tmp_path / "config.json.tmp").exists(), "a save cut short is removed at the next start"

    finished = set(images)
    left = remove_stale_temp_files(tmp_path / "outputs")
    assert left <= 1 and set((tmp_path / "outputs").rglob("*.png")) == finished, "finished images untouched"
    assert not list((tmp_path / "outputs").rglob("*.tmp"))


def test_a_corrupt_config_is_kept_aside_and_the_ui_says_so(tmp_path, sd1_file):
    (tmp_path / "config.json").write_text('{"max_steps": 200, "sd_vae": ')  # cut short by a crash of another tool
    engine = make_engine(tmp_path, sd1_file)
    assert engine.options["max_steps"] == 150, "defaults in use"
    assert (tmp_path / "config.json.bad").read_text() == '{"max_steps": 200, "sd_vae": '
    assert "config.json is corrupt" in engine.options.problems[0] and "config.json.bad" in engine.options.problems[0]
    banner = next(c["props"] for c in build_ui(engine, JobQueue(engine)).config["components"]
                  if c["props"].get("elem_id") == "startup_problems")
    assert "⚠" in banner["value"] and "defaults are in use" in banner["value"]
    engine.options.update({"max_steps": 120})
    assert Options(tmp_path / "config.json")["max_steps"] == 120 and not Options(tmp_path / "config.json").problems


def test_a_wrong_value_in_the_config_is_named_and_the_rest_is_kept(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_steps": "many", "max_batch_size": 4}))
    options = Options(tmp_path / "config.json")
    assert options["max_steps"] == 150 and options["max_batch_size"] == 4
    assert options.problems == ["config.json: max_steps ignored (must be a whole number, got 'many'); "
                                "its default is in use."]


def test_half_written_images_are_removed_at_start_and_nothing_else(tmp_path, sd1_file):
    outputs = tmp_path / "outputs" / "txt2img-images" / "2026-11-22"
    outputs.mkdir(parents=True)
    kept = save_image(Image.new("RGB", (8, 8)), outputs.parent, 1, "kept", "kept")
    (outputs / ".0123456789abcdef.png.tmp").write_bytes(b"\x89PNG half")
    (outputs / ".notes.png.tmp").write_text("the user's own file: not ours to delete")
    make_engine(tmp_path, sd1_file)
    assert not (outputs / ".0123456789abcdef.png.tmp").exists()
    assert kept.exists() and (outputs / ".notes.png.tmp").exists()


def test_a_save_during_an_override_stores_the_values_beneath_it(tmp_path):
    """An override (a request's override_settings, an X/Y/Z cell, --ckpt) is never saved, even when another option
    is stored meanwhile; a value stored meanwhile for the overridden option is the one kept afterwards."""
    path = tmp_path / "config.json"
    options = Options(path)
    with options.overridden({"sd3_shift": 5.0, "CLIP_stop_at_last_layers": 2}):
        with options.overridden({"sd3_shift": 7.0}):
            assert options["sd3_shift"] == 7.0
        assert options["sd3_shift"] == 5.0, "the inner override gives back the outer one"
        options.update({"samples_save": False})
        saved = json.loads(path.read_text())
        assert saved["sd3_shift"] == 3.0 and saved["CLIP_stop_at_last_layers"] == 1 and saved["samples_save"] is False
        options.update({"CLIP_stop_at_last_layers": 3})
        assert options["CLIP_stop_at_last_layers"] == 3 and json.loads(path.read_text())["CLIP_stop_at_last_layers"] == 3
    assert options["sd3_shift"] == 3.0 and options["CLIP_stop_at_last_layers"] == 3, "what was stored meanwhile stays"
    assert Options(path).as_dict()["CLIP_stop_at_last_layers"] == 3


def test_options_this_app_does_not_use_are_kept_within_bounds_and_a_null_removes_them(tmp_path):
    """A value nested 400 deep made GET /options fail for good (it survived restarts); a 95 kB one made every save
    slow. Such values are refused naming their key; null gives A1111's default back, or removes the key."""
    from webui.errors import UserError
    from webui.settings import KEPT_KEYS, KEPT_VALUE_CHARS

    path = tmp_path / "config.json"
    options = Options(path)
    nested: list = []
    for _ in range(400):
        nested = [nested]
    for key, value in (("deep", nested), ("big", "x" * (KEPT_VALUE_CHARS + 1)), ("k" * 300, 1)):
        with pytest.raises(UserError) as refused:
            options.update({key: value, "samples_save": False})
        assert refused.value.field == key[:80] and options["samples_save"] is True, "nothing changed"
    options.update({"my_client_flag": {"a": [1, 2]}, "send_seed": False})
    assert json.loads(path.read_text())["my_client_flag"] == {"a": [1, 2]}
    options.update({"my_client_flag": None, "send_seed": None})
    stored = json.loads(path.read_text())
    assert "my_client_flag" not in stored and stored["send_seed"] is True, "removed; A1111's default back"
    with pytest.raises(UserError, match=f"at most {KEPT_KEYS}"):
        options.update({f"key{i}": i for i in range(KEPT_KEYS + 1)})
    path.write_text(json.dumps({"deep": nested, "samples_save": False}))  # a config.json poisoned before this check
    reopened = Options(path)
    assert "deep" not in reopened.as_dict() and reopened["samples_save"] is False
    assert any("deep" in problem for problem in reopened.problems)
    json.dumps(reopened.as_dict())  # what GET /options answers can always be written


def test_an_options_save_that_fails_changes_nothing(tmp_path, monkeypatch):
    """Disk full while saving: the error says so, the old value stays in memory and on disk, no temp file is left."""
    path = tmp_path / "config.json"
    options = Options(path)
    options.update({"samples_save": False})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("webui.settings.os.fsync", disk_full)
    with pytest.raises(OSError, match="No space left on device.*nothing was changed"):
        options.update({"samples_save": True, "sd3_shift": 5.0})
    assert options["samples_save"] is False and options["sd3_shift"] == 3.0
    assert json.loads(path.read_text())["samples_save"] is False
    assert not path.with_suffix(".json.tmp").exists()
