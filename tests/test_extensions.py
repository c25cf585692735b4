"""Extensions: discovery and load order, every registration of the API, failures that disable only the
extension at fault, and the two shipped examples (a sampler, a per-step callback) on real tiny generations."""
from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerAncestralDiscreteScheduler
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import make_engine
from webui import extensions
from webui.api import register_api
from webui.cli import parse_args
from webui.engine.hooks import NetworkCall
from webui.engine.infotext import parse_infotext
from webui.engine.request import GenerationRequest
from webui.errors import UserError
from webui.extensions import BUILTIN_DIR, discover, extensions_of, find_extensions, load_extensions
from webui.jobs import JobQueue
from webui.settings import AppConfig

# diffusers feeds torch tensors to numpy; NumPy 2 warns thousands of times per run.
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

SMALL = dict(prompt="a cat", width=64, height=64, steps=4, cfg_scale=5.0, seed=11, save_images=False)


def write(folder: Path, name: str, code: str, **files: str) -> Path:
    """An extension folder with this extension.py (and other files of the folder)."""
    path = folder / name
    path.mkdir(parents=True)
    (path / "extension.py").write_text(textwrap.dedent(code))
    for file_name, text in files.items():
        (path / file_name).write_text(textwrap.dedent(text))
    return path


def load(engine, folder: Path) -> extensions.Extensions:
    return load_extensions(engine, find_extensions(folder, builtin=False))


def builtin(*names: str) -> list[extensions.Extension]:
    return [ext for ext in find_extensions(BUILTIN_DIR, builtin=True) if ext.name in names]


def generate(engine, **fields):
    return engine.txt2img(GenerationRequest(**{**SMALL, **fields}))


def pixels(result) -> np.ndarray:
    return np.stack([np.asarray(image) for image in result.images])


def status(registry: extensions.Extensions) -> dict[str, str | None]:
    return {ext.name: ext.error for ext in registry.extensions}


# ---- discovery ---------------------------------------------------------------------------------

def test_builtins_load_first_then_the_users_each_by_folder_name(tmp_path, monkeypatch, sd1_file):
    code = 'def setup(api):\n    api.on("before_generation", lambda request: None)\n'
    for name in ("b-second", "a-first"):
        write(tmp_path / "builtin", name, code)
    for name in ("z-last", "c-third"):
        write(tmp_path / "user", name, code)
    (tmp_path / "builtin" / "no-entry").mkdir()  # not an extension: no extension.py
    write(tmp_path / "builtin", ".hidden", code)
    monkeypatch.setattr(extensions, "BUILTIN_DIR", tmp_path / "builtin")
    engine = make_engine(tmp_path / "data", sd1_file, extra_args=("--extensions-dir", str(tmp_path / "user")))

    registry = load_extensions(engine)

    assert [(e.name, e.builtin, e.enabled) for e in registry.extensions] == [
        ("a-first", True, True), ("b-second", True, True), ("c-third", False, True), ("z-last", False, True)]
    assert [c.owner for c in engine.hooks.callbacks["before_generation"]] == ["a-first", "b-second", "c-third",
                                                                              "z-last"]
    assert extensions_of(engine) is registry


def test_flags_choose_which_extensions_load(tmp_path, monkeypatch):
    write(tmp_path / "builtin", "shipped", "def setup(api):\n    pass\n")
    write(tmp_path / "data" / "extensions", "mine", "def setup(api):\n    pass\n")  # the default --extensions-dir
    monkeypatch.setattr(extensions, "BUILTIN_DIR", tmp_path / "builtin")

    def names(*flags: str) -> list[str]:
        return [e.name for e in discover(AppConfig.from_args(parse_args(["--data-dir", str(tmp_path / "data"),
                                                                         *flags])))]

    assert names() == ["shipped", "mine"]
    assert names("--disable-extra-extensions") == ["shipped"]
    assert names("--disable-all-extensions") == []


def test_an_extension_imports_its_own_modules(engine, tmp_path):
    write(tmp_path, "multi-file", """\
        from .helpers import LABEL

        def setup(api):
            api.add_ui_tab(LABEL, lambda: None)
        """, **{"helpers.py": 'LABEL = "From helpers"\n'})
    assert [tab.title for tab in load(engine, tmp_path).tabs] == ["From helpers"]


# ---- failures ----------------------------------------------------------------------------------

def test_broken_extensions_are_logged_by_name_disabled_and_generation_goes_on(engine, tmp_path, caplog):
    write(tmp_path, "bad-syntax", "def setup(api):\n    return (\n")
    write(tmp_path, "no-setup", "NAME = 'nothing to set up'\n")
    write(tmp_path, "setup-raises", """\
        from diffusers import EulerDiscreteScheduler

        def setup(api):
            api.add_sampler("Half Done", EulerDiscreteScheduler)
            api.on("before_generation", lambda request: None)
            api.add_ui_tab("Half Done", lambda: None)
            raise RuntimeError("setup boom")
        """)
    write(tmp_path, "step-raises", """\
        from diffusers import EulerDiscreteScheduler

        calls = 0

        def explode(step, total, latents):
            global calls
            calls += 1
            raise ValueError("step boom")

        def setup(api):
            api.add_sampler("Steps Then Fails", EulerDiscreteScheduler)
            api.on("denoising_step", explode)
        """)
    write(tmp_path, "steady", """\
        steps = []

        def setup(api):
            api.on("denoising_step", lambda step, total, latents: steps.append(step))
        """)
    with caplog.at_level(logging.ERROR):
        registry = load(engine, tmp_path)
        assert "Steps Then Fails" in engine.samplers.sampler_names()
        first = generate(engine)
        second = generate(engine)

    errors = status(registry)
    assert errors["bad-syntax"].startswith("SyntaxError while loading")
    assert errors["no-setup"] == "TypeError while loading: extension.py defines no setup(api) function"
    assert errors["setup-raises"] == "RuntimeError while loading: setup boom"
    assert errors["step-raises"] == "ValueError in denoising_step: step boom"
    assert errors["steady"] is None
    logged = [r.getMessage() for r in caplog.records if r.exc_info]
    for name in ("bad-syntax", "no-setup", "setup-raises"):
        assert f"Extension {name} failed while loading; it is disabled." in logged
    assert logged.count("Extension step-raises failed in denoising_step; it is disabled.") == 1
    # What the failed setup had registered is gone; failed modules are not left imported.
    assert "Half Done" not in engine.samplers.sampler_names() and registry.tabs == []
    assert "Steps Then Fails" not in engine.samplers.sampler_names(), "a callback's failure takes its samplers too"
    assert [c.owner for c in engine.hooks.callbacks["before_generation"]] == []
    assert "webui_ext_setup_raises" not in sys.modules
    # Generation went on, the failing callback ran once, the good one at every step of both generations.
    assert len(first.images) == len(second.images) == 1
    assert np.array_equal(pixels(first), pixels(second))
    assert sys.modules["webui_ext_step_raises"].calls == 1
    assert sys.modules["webui_ext_steady"].steps == [0, 1, 2, 3] * 2


def test_refused_registrations_fail_only_that_extension(engine, tmp_path):
    write(tmp_path, "a-owner", 'def setup(api):\n    api.add_network("shared", object())\n')
    write(tmp_path, "b-network-thief", 'def setup(api):\n    api.add_network("shared", object())\n')
    write(tmp_path, "c-sampler-clash", 'def setup(api):\n    api.add_sampler("euler a", object)\n')
    write(tmp_path, "d-bad-route", 'def setup(api):\n    api.add_api_route("no-slash", lambda: 1)\n')
    write(tmp_path, "e-bad-event", 'def setup(api):\n    api.on("never", lambda: 1)\n')
    errors = status(load(engine, tmp_path))
    assert errors["a-owner"] is None and engine.hooks.networks["shared"][0] == "a-owner"
    assert "belongs to a-owner" in errors["b-network-thief"]
    assert "a sampler named 'euler a' already exists" in errors["c-sampler-clash"]
    assert "must start with '/'" in errors["d-bad-route"]
    assert "unknown event 'never'" in errors["e-bad-event"]
    assert engine.samplers.find_sampler("Euler a")[0].factory is EulerAncestralDiscreteScheduler


# ---- what an extension can add -----------------------------------------------------------------

def test_callbacks_get_each_events_arguments(engine, tmp_path):
    write(tmp_path, "recorder", """\
        seen = []

        def record(event):
            return lambda **kwargs: seen.append((event, sorted(kwargs)))

        def setup(api):
            for event in ("model_loaded", "before_generation", "denoising_step", "after_generation", "image_saved"):
                api.on(event, record(event))
        """)
    load(engine, tmp_path)
    generate(engine, steps=2, save_images=True)
    assert sys.modules["webui_ext_recorder"].seen == [
        ("before_generation", ["request"]), ("model_loaded", ["model"]),
        ("denoising_step", ["latents", "step", "total"]), ("denoising_step", ["latents", "step", "total"]),
        ("image_saved", ["image", "infotext", "path"]), ("after_generation", ["request", "result"])]


def test_before_generation_may_change_the_request(engine, tmp_path):
    write(tmp_path, "more-steps", 'def setup(api):\n    api.on("before_generation", lambda request: '
                                  'setattr(request, "steps", 5))\n')
    load(engine, tmp_path)
    assert "Steps: 5," in generate(engine).infotexts[0]


def test_settings_are_checked_and_saved_like_the_built_in_ones(tmp_path, sd1_file):
    data = tmp_path / "data"
    data.mkdir()
    (data / "config.json").write_text(json.dumps({"myext_mode": "slow", "myext_strength": "strong"}))
    engine = make_engine(data, sd1_file)
    write(tmp_path / "ext", "myext", """\
        def setup(api):
            api.add_setting("myext_strength", 0.5, "Strength")
            api.add_setting("myext_mode", "fast", "Mode", choices=["fast", "slow"])
        """)
    registry = load(engine, tmp_path / "ext")
    assert [(s.key, s.label, s.owner) for s in registry.settings] == [("myext_strength", "Strength", "myext"),
                                                                      ("myext_mode", "Mode", "myext")]
    options = engine.options
    assert options["myext_mode"] == "slow"  # kept from config.json
    assert options["myext_strength"] == 0.5  # the stored text was not a number
    assert options.choices("myext_mode") == ("fast", "slow")
    for key, bad in (("myext_mode", "medium"), ("myext_strength", "high")):
        with pytest.raises(UserError) as caught:
            options.update({key: bad})
        assert caught.value.field == key
    options.update({"myext_strength": 2})
    assert json.loads((data / "config.json").read_text())["myext_strength"] == 2.0


def test_ui_tabs_and_the_extensions_tab(engine, tmp_path):
    write(tmp_path, "a-tab", """\
        def build():
            import gradio as gr
            gr.Markdown("hello from a-tab", elem_id="a_tab_text")

        def setup(api):
            api.add_ui_tab("My Tab", build)
            api.add_setting("a_tab_enabled", True, "Enable my tab")
            api.add_xyz_axis("Style", lambda request, value: None)
        """)
    write(tmp_path, "b-broken-tab", """\
        def build():
            raise RuntimeError("no widgets today")

        def setup(api):
            api.add_ui_tab("Broken Tab", build)
        """)
    from webui.ui import build_ui

    registry = load(engine, tmp_path)
    components = build_ui(engine, JobQueue(engine)).config["components"]
    tabs = [c["props"]["label"] for c in components if c["type"] == "tabitem"
            and not c["props"]["label"].startswith("ControlNet Unit")]  # (the generation tabs' unit tabs)
    assert tabs == ["txt2img", "img2img", "X/Y/Z plot", "Prompt scripts", "Extras", "PNG Info", "Checkpoint Merger",
                    "My Tab", "Broken Tab", "Queue", "Settings", "Extensions"]
    props = {c["props"].get("elem_id"): c["props"] for c in components}
    assert ("Style", "Style") in props["xyz_x_type"]["choices"], "the X/Y/Z tab offers the extension's axis"
    assert props["a_tab_text"]["value"] == "hello from a-tab"
    assert props["a_tab_enabled"]["label"] == "Enable my tab" and props["a_tab_enabled"]["value"] is True
    assert status(registry)["b-broken-tab"] == "RuntimeError building its tab 'Broken Tab': no widgets today"
    table = props["extensions_status"]["value"]
    assert "| a-tab | user | enabled |" in table and "| b-broken-tab | user | disabled: RuntimeError" in table


def test_api_routes_are_mounted_with_the_api(engine, tmp_path):
    write(tmp_path, "myext", """\
        def setup(api):
            api.add_api_route("/myext/hello", lambda: {"hello": api.name})
            api.add_api_route("/myext/shout", lambda text: text.upper(), methods=["POST"])
        """)
    write(tmp_path, "later-broken", """\
        def setup(api):
            api.add_api_route("/broken/hello", lambda: {})
            raise RuntimeError("gone")
        """)
    load(engine, tmp_path)
    app = FastAPI()
    register_api(app, JobQueue(engine))
    client = TestClient(app)
    assert client.get("/myext/hello").json() == {"hello": "myext"}
    assert client.post("/myext/shout", params={"text": "ping"}).json() == "PING"
    assert client.get("/myext/shout").status_code == 405
    assert client.get("/broken/hello").status_code == 404
    assert client.post("/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, "steps": 1}).status_code \
        == 200


def test_xyz_axes_are_kept_for_the_xyz_script(engine, tmp_path):
    write(tmp_path, "cfg-axis", """\
        def setup(api):
            api.add_xyz_axis("CFG (ext)", lambda request, value: setattr(request, "cfg_scale", float(value)),
                             choices=lambda: ["3", "9"])
        """)
    (axis,) = load(engine, tmp_path).axes
    request = GenerationRequest(**SMALL)
    for value in axis.choices():
        axis.apply(request, value)
    assert (axis.label, axis.owner, request.cfg_scale) == ("CFG (ext)", "cfg-axis", 9.0)


def test_prompt_network_tags_reach_their_network_and_leave_the_encoded_text(engine, tmp_path):
    write(tmp_path, "myext", """\
        class Recorder:
            def __init__(self):
                self.calls = []

            def activate(self, model, calls):
                self.calls.append(calls)
                return {"Myext": ", ".join(c.name for c in calls)} if calls else {}

        recorder = Recorder()

        def setup(api):
            api.add_network("myext", recorder)
        """)
    load(engine, tmp_path)
    plain = generate(engine)
    tagged = generate(engine, prompt="a cat <myext:foo:1>")
    recorder = sys.modules["webui_ext_myext"].recorder
    assert recorder.calls == [[], [NetworkCall("myext", "foo", ("1",))]]
    params = parse_infotext(tagged.infotexts[0])
    assert params["Prompt"] == "a cat <myext:foo:1>" and params["Myext"] == "foo"
    assert np.array_equal(pixels(plain), pixels(tagged)), "the tag reached the text encoder"
    assert not np.array_equal(pixels(plain), pixels(generate(engine, prompt="a cat foo 1"))), "prompts do not matter"


def test_schedule_types_from_extensions(engine, tmp_path):
    write(tmp_path, "leading-schedule", """\
        def setup(api):
            api.add_schedule_type("leading", "Leading", {"timestep_spacing": "leading"})
        """)
    load(engine, tmp_path)
    assert engine.samplers.schedule_type_names()[-1] == "Leading"
    assert engine.samplers.resolve("DPM++ 2M Leading") == ("DPM++ 2M", "Leading")
    leading = generate(engine, sampler_name="Euler", scheduler="Leading")
    assert "Schedule type: Leading" in leading.infotexts[0]
    assert not np.array_equal(pixels(leading), pixels(generate(engine, sampler_name="Euler", scheduler="Karras")))


# ---- the shipped examples ----------------------------------------------------------------------

def test_the_shipped_extensions_load_enabled(engine):
    registry = load_extensions(engine)
    for name in ("sampler-dpmpp-3m-sde", "nan-watchdog"):
        (ext,) = [e for e in registry.extensions if e.name == name]
        assert ext.builtin and ext.enabled, ext.error


def test_example_sampler_dpmpp_3m_sde(engine):
    registry = load_extensions(engine, builtin("sampler-dpmpp-3m-sde"))
    assert status(registry) == {"sampler-dpmpp-3m-sde": None}
    assert "DPM++ 3M SDE" in engine.samplers.sampler_names()
    assert {"name": "DPM++ 3M SDE", "aliases": ["k_dpmpp_3m_sde"], "options": {"scheduler": "exponential"}} \
        in engine.samplers.api_samplers()
    config = engine.samplers.make_scheduler("DPM++ 3M SDE", "Automatic", {"prediction_type": "epsilon"}).config
    assert (config.algorithm_type, config.solver_order, config.use_exponential_sigmas) == ("sde-dpmsolver++", 3, True)

    first = generate(engine, sampler_name="DPM++ 3M SDE", steps=6)
    assert "Sampler: DPM++ 3M SDE, Schedule type: Automatic," in first.infotexts[0]
    assert np.array_equal(pixels(first), pixels(generate(engine, sampler_name="k_dpmpp_3m_sde", steps=6)))
    other_seed = generate(engine, sampler_name="DPM++ 3M SDE", steps=6, seed=12)
    second_order = generate(engine, sampler_name="DPM++ 2M SDE", steps=6)
    assert not np.array_equal(pixels(first), pixels(other_seed))
    assert not np.array_equal(pixels(first), pixels(second_order))
    in_sigma_space = generate(engine, sampler_name="DPM++ 3M SDE", scheduler="KL Optimal", steps=6, eta=0.5)
    assert "Schedule type: KL Optimal, " in in_sigma_space.infotexts[0] and "Eta: 0.5" in in_sigma_space.infotexts[0]
    assert np.array_equal(pixels(in_sigma_space),
                          pixels(generate(engine, sampler_name="DPM++ 3M SDE", scheduler="KL Optimal", steps=6, eta=0.5)))


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast:RuntimeWarning")
def test_example_nan_watchdog_names_the_step(engine, caplog):
    before = generate(engine)
    load_extensions(engine, builtin("nan-watchdog"))
    with caplog.at_level(logging.WARNING):
        clean = generate(engine)
        unet = engine.models.current.denoiser
        calls = []

        def overflow_at_second_step(module, args, output):
            calls.append(1)
            if len(calls) == 2:
                output.sample.fill_(float("nan"))

        handle = unet.register_forward_hook(overflow_at_second_step)
        try:
            with pytest.raises(UserError, match="NaN"):  # the engine stops the job; the watchdog names the step
                generate(engine)
        finally:
            handle.remove()
        after = generate(engine)
    warnings = [r.getMessage() for r in caplog.records if "NaN watchdog" in r.getMessage()]
    assert len(warnings) == 1 and "became NaN/inf at denoising step 2 of 4" in warnings[0]
    assert np.array_equal(pixels(before), pixels(clean)), "the watchdog changed the image"
    assert np.array_equal(pixels(clean), pixels(after))


def test_nan_watchdog_reads_the_device_once_a_batch_and_reports_an_interrupted_one_later(monkeypatch, caplog):
    """Reading a device value makes the host wait for the GPU: never at each step (issue 24)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("nan_watchdog", BUILTIN_DIR / "nan-watchdog" / "extension.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    reads = []
    for name in ("item", "__int__", "__bool__", "__float__", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name: reads.append(_n) or _o(self, *a))
    watchdog, fine, bad = module.Watchdog(), torch.zeros(4), torch.tensor([0.0, float("nan"), 0.0, 0.0])
    with caplog.at_level(logging.WARNING):
        watchdog.reset()
        for step, latents in enumerate([fine, bad, bad]):
            watchdog.check(step=step, total=4, latents=latents)
        assert reads == [] and not caplog.records, "no read before the batch's last step"
        watchdog.check(step=3, total=4, latents=bad)
        assert len(reads) == 1 and "became NaN/inf at denoising step 2 of 4" in caplog.records[-1].getMessage()
        watchdog.check(step=0, total=4, latents=bad)  # the next batch of the same generation: reported once
        watchdog.reset()  # a generation interrupted after its first step, then the next one begins
        watchdog.check(step=0, total=5, latents=fine)
        watchdog.check(step=1, total=5, latents=bad)
        watchdog.reset()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and "step 2 of 5" in messages[-1]


@pytest.mark.parametrize("with_setting", [True, False])
def test_the_extensions_tab_refreshes_on_page_load_with_or_without_settings(engine, tmp_path, with_setting):
    """The page-load handler answers per component: with no extension setting it once gave Gradio a tuple for the
    status table alone, and the tab failed to load."""
    write(tmp_path, "quiet", "def setup(api):\n" + ("    api.add_setting('quiet_on', True, 'On')\n" if with_setting
                                                     else "    pass\n"))
    from webui.ui import build_ui

    load(engine, tmp_path)
    demo = build_ui(engine, JobQueue(engine))
    table = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "extensions_status")
    (handler,) = [f for f in demo.fns.values() if table in f.outputs]
    answer = handler.fn()
    assert isinstance(answer, dict) and "| quiet | user | enabled |" in answer[table]
    assert len(answer) == len(handler.outputs) == 1 + with_setting
