"""The Gradio UI, served for real on a free local port and driven with gradio_client."""
from __future__ import annotations

import html
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from webui.cli import parse_args
from webui.engine.engine import Engine
from webui.engine.infotext import read_png_infotext
from webui.engine.progress import Progress
from webui.engine.request import GenerationRequest
from webui.errors import Busy
from webui.jobs import JobQueue
from webui.settings import AppConfig
from webui.ui import build_ui
from webui.ui.generation import generator, progress_html
from webui.ui.model_row import checkpoint_choices, gpu_weights_mb, set_gpu_weights, total_memory_mb, vae_choices
from webui.ui.styles import apply_styles, save_style

SMALL = {"prompt": "a red apple", "width": 64, "height": 64, "steps": 2}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def engine(tmp_path_factory) -> Engine:
    data = tmp_path_factory.mktemp("data")
    return Engine(AppConfig.from_args(parse_args(["--data-dir", str(data)])))


@contextmanager
def ui_client(engine: Engine) -> Iterator[Client]:
    """The web UI over ``engine`` on a free port, and a Gradio client of it."""
    demo = build_ui(engine, JobQueue(engine))
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    try:
        yield Client(url, verbose=False)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(engine):
    with ui_client(engine) as client:
        yield client


def txt2img(client: Client, **fields) -> tuple[list[dict], str, str]:
    """Gallery, status HTML and infotext of one Generate."""
    _preview, gallery, status, infotext, *_plots = client.predict(**{**SMALL, **fields}, api_name="/txt2img")
    return gallery, status, infotext


def test_the_styles_apply_to_a_generation_and_the_prompt_saves_as_one(client, engine):
    """The Styles field goes with Generate (the infotext has the styled prompt, as A1111's); "Save as style" writes
    the prompts to styles.csv under the name given, and "Apply to prompts" writes a style into the prompt boxes."""
    engine.config.paths.styles_file.write_text('name,prompt,negative_prompt\nFramed,"{prompt}, framed",lowres\n')
    _, _, infotext = txt2img(client, seed=5, styles=["Framed"])
    assert infotext.startswith("a red apple, framed\nNegative prompt: lowres\n")
    assert save_style(engine, " Mine ", "a cat, {prompt}", "ugly")["choices"] == ["Framed", "Mine"]
    assert apply_styles(engine, "a dog", "", ["Mine"]) == ("a cat, a dog", "ugly", [])
    assert "choices" not in save_style(engine, " ", "a cat", ""), "no name: a warning, nothing saved"
    assert list(engine.styles.all()) == ["Framed", "Mine"]


def test_generates_an_image_with_its_infotext(client, engine, monkeypatch):
    encoded, save = [], Image.Image.save  # the generated images (with their infotext), not the live previews

    def counted(self, *args, **kwargs):
        encoded.extend([1] if "parameters" in self.info else [])
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", counted)
    gallery, status, infotext = txt2img(client, seed=1234, negative_prompt="blurry")
    assert len(encoded) == 1, "the saved file is shown, not the image encoded again (0.1-0.2 s at 1024²)"
    assert len(gallery) == 1
    assert Image.open(gallery[0]["image"]).size == (64, 64)
    assert infotext.startswith("a red apple\nNegative prompt: blurry\n")
    for part in ("Steps: 2", "Sampler: DPM++ 2M", "Seed: 1234", "Size: 64x64", "Model: demo-shapes"):
        assert part in infotext
    assert "Done: 1 image in" in status and "seed 1234" in status
    assert "MB of weights in RAM (running on the CPU: no GPU budget)" in status and "VRAM" not in status
    assert read_png_infotext(gallery[0]["image"]) == infotext, "the gallery's file (what Download gives) keeps it"
    [saved] = [p for p in engine.output_folder("outdir_txt2img_samples").rglob("*.png") if "-1234-" in p.name]
    assert Path(gallery[0]["image"]).read_bytes() == saved.read_bytes(), "the saved file, not encoded again"


def test_the_variation_seed_fields_make_the_variation_seeds_picture(client):
    """Variation strength 1 draws the variation seed's noise: the picture of that seed (DPM++ 2M has no other
    noise); the infotext says so, and the fields' defaults change nothing."""
    own, _, _ = txt2img(client, seed=8)
    varied, _, infotext = txt2img(client, seed=3, subseed=8, subseed_strength=1)
    assert "Variation seed: 8, Variation seed strength: 1" in infotext
    pixels = [Image.open(gallery[0]["image"]).convert("RGB").getdata() for gallery in (own, varied)]
    assert max(abs(a - b) for p, q in zip(*pixels) for a, b in zip(p, q)) <= 1
    _, _, plain = txt2img(client, seed=3)
    assert "Variation seed" not in plain


def test_batches_give_one_image_each(client):
    gallery, _, infotext = txt2img(client, seed=7, n_iter=2, batch_size=2)
    assert len(gallery) == 4
    assert "Seed: 7" in infotext


def test_engine_refusal_names_the_field_and_the_app_keeps_working(client):
    gallery, status, _ = txt2img(client, width=100)
    assert "gen-error" in status
    assert "Width (width): must be a multiple of 8" in status
    gallery, status, infotext = txt2img(client, seed=5)
    assert len(gallery) == 1 and "Seed: 5" in infotext


def test_any_sampler_takes_any_schedule_type(client):
    """As in A1111 1.10 (the sampler registry runs pairs diffusers cannot express in sigma space)."""
    _, status, infotext = txt2img(client, sampler_name="Euler a", scheduler="Karras")
    assert "Done" in status and "Sampler: Euler a, Schedule type: Karras" in infotext


@pytest.mark.parametrize(("field", "value", "message"), [
    ("width", 100000, "Width: Value 100000 is greater than maximum value 4096"),
    ("steps", 0, "Sampling steps: Value 0 is less than minimum value 1"),
])
def test_out_of_range_fields_are_refused_by_name(client, field, value, message):
    with pytest.raises(AppError, match=message):
        txt2img(client, **{field: value})
    gallery, _, _ = txt2img(client)
    assert len(gallery) == 1


def test_interrupt_works_while_generating(client):
    job = client.submit(**{**SMALL, "steps": 150, "n_iter": 100}, api_name="/txt2img")
    deadline = time.monotonic() + 60
    while not any("%" in out[2] for out in job.outputs()):
        assert time.monotonic() < deadline, "no progress was reported"
        time.sleep(0.1)
    client.predict(api_name="/interrupt")
    _preview, gallery, status, *_ = job.result(timeout=60)
    assert "Interrupted" in status
    assert 1 <= len(gallery) < 100


def test_model_row_shows_the_demo_checkpoint_and_vae_choices(engine):
    titles, selected = checkpoint_choices(engine)
    assert any(t.startswith("demo-shapes") for t in titles) and selected in titles
    vaes, vae = vae_choices(engine)
    assert vaes[:2] == ["Automatic", "None"] and vae == "Automatic"


def test_a_reload_shows_the_selected_checkpoint_and_its_size_not_the_loaded_one(tmp_path):
    """Generate loads one checkpoint; another is selected (a second tab, the API): the page shows the one Generate
    uses next, with its declared size."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    engine = Engine(AppConfig.from_args(parse_args(["--data-dir", str(tmp_path)])))
    demo = engine.models.find("demo-shapes")
    with safe_open(str(demo.path), "pt") as f:
        tensors, metadata = {key: f.get_tensor(key) for key in f.keys()}, f.metadata()
    wide = engine.config.paths.checkpoint_dirs[0] / "wide.safetensors"
    save_file(tensors, str(wide), {**metadata, "modelspec.resolution": "192x128"})
    engine.models.refresh()
    engine.set_options({"sd_model_checkpoint": engine.models.title(demo)})
    engine.txt2img(GenerationRequest(prompt="a dot", width=64, height=64, steps=1))
    engine.set_options({"sd_model_checkpoint": "wide.safetensors"})
    _titles, shown = checkpoint_choices(engine)
    assert shown.startswith("wide") and engine.models.current.info.name != "wide.safetensors"
    from webui.ui.txt2img import fields_on_load

    *_, width, height, _steps, _cfg, _sampler, _schedule = fields_on_load(engine)
    assert (width["value"], height["value"]) == (192, 128)


def test_gpu_weights_say_they_do_nothing_on_the_cpu(engine, monkeypatch):
    from webui.ui.model_row import gpu_weights_info

    demo = build_ui(engine, JobQueue(engine))
    slider = next(c["props"] for c in demo.config["components"] if c["props"].get("elem_id") == "gpu_weights")
    assert slider["info"].startswith("No effect while running on the CPU")
    monkeypatch.setattr(engine.memory, "limited", True)  # a GPU's budget
    assert gpu_weights_info(engine, 8192).startswith("Out of 8192 MB of ")


def test_a_second_click_on_a_lora_card_takes_its_tag_back():
    from webui.ui.network_browser import toggle_network_tag

    assert toggle_network_tag("lora", "a cat", "styles/b") == "a cat <lora:styles/b:1>"
    assert toggle_network_tag("lora", "a cat <lora:styles/b:1>", "styles/b") == "a cat"
    assert toggle_network_tag("lora", "<lora:a:0.6> a cat, <lora:ab:1>", "a") == "a cat, <lora:ab:1>", \
        "at any weight; another LoRA whose name starts alike stays"
    assert toggle_network_tag("lora", "a cat <lora:a:1>, red", None) == "a cat <lora:a:1>, red"


def test_the_embeddings_browser_adds_and_takes_back_a_name(engine):
    from tests.test_embeddings import write_embedding
    from webui.ui.network_browser import browsers, toggle_word

    write_embedding(engine.config.paths.embeddings_dir, "dusky", "a1111", (32,))
    demo = build_ui(engine, JobQueue(engine))
    ids = {c["props"].get("elem_id") for c in demo.config["components"]}
    assert {"txt2img_textual_inversion_cards", "img2img_textual_inversion_cards"} <= ids
    listing = next(source for key, _, source, _ in browsers(engine) if key == "textual_inversion")
    assert listing.names() == ["dusky"] and listing.path("dusky").name == "dusky.pt"
    assert toggle_word("a cat", "dusky") == "a cat dusky" and toggle_word("a dusky cat", "dusky") == "a cat"
    assert toggle_word("a duskyish cat", "dusky") == "a duskyish cat dusky", "another word that starts alike stays"


def test_storage_and_swap_options_are_dropdowns_of_the_settings_choices(engine):
    from webui.settings import OPTION_CHOICES
    from webui.ui.model_row import CHOICE_LABELS

    demo = build_ui(engine, JobQueue(engine))
    boxes = {c["props"].get("elem_id"): c["props"] for c in demo.config["components"]}
    for key, label in CHOICE_LABELS.items():
        box = boxes[key]
        assert box["label"] == label and box["value"] == engine.options[key]
        assert [choice[1] for choice in box["choices"]] == list(OPTION_CHOICES[key])
    assert {"Diffusion in Low Bits", "T5 storage", "Swap Method", "Swap Location"} == set(CHOICE_LABELS.values())


def test_gpu_weights_are_stored_as_the_inference_reserve(engine):
    total = total_memory_mb(engine)
    set_gpu_weights(engine, total, total - 2048)
    assert engine.options["forge_inference_memory"] == 2048
    assert gpu_weights_mb(engine, total) == total - 2048


def test_progress_line_shows_percent_step_batch_and_eta():
    now = [0.0]
    progress = Progress(clock=lambda: now[0])
    progress.begin("txt2img", job_count=2, steps=10)
    progress.next_batch(1)
    for step in (4, 5):
        now[0] += 2.0
        progress.step(step, None, progress._family)
    running: Future = Future()
    running.set_running_or_notify_cancel()
    text = progress_html(progress, running)
    assert "75% · step 5/10 · batch 2/2 · ETA 10s" in text, "5 steps left at 2 s a step"
    assert "Waiting in the queue" in progress_html(progress, Future())


def test_xyz_tab_runs_a_plot_over_the_txt2img_form(client, engine):
    """The X/Y/Z tab's Generate: the grid first, then the cells, each the plain generation of its values."""
    _preview, gallery, status, infotext, *_plots = client.predict(
        **SMALL, seed=11, sampler_name="Euler", x_type="Steps", x_values="1-2", y_type="Sampler",
        y_values_dropdown=["Euler", "DPM++ 2M"], api_name="/xyz_plot")
    assert "Done: 4 images and 1 grid in" in status, "the grid is not counted as an image"
    assert "X/Y/Z plot: X: Steps = 1, 2; Y: Sampler = Euler, DPM++ 2M" in infotext
    assert (engine.progress.job_count, engine.progress.fraction) == (0, 0.0), "idle again, as /progress reports"
    grid, *cells = [Image.open(item["image"]) for item in gallery]
    assert len(cells) == 4 and grid.width > 128 and grid.height > 128
    plain, _, _ = txt2img(client, seed=11, steps=2, sampler_name="DPM++ 2M")
    assert Image.open(plain[0]["image"]).tobytes() == cells[3].tobytes(), "the last cell: 2 steps, DPM++ 2M"


def test_xyz_tab_plots_over_the_img2img_form(client, tmp_path):
    """"Plot over" img2img: the img2img form's request (its image) is the base, each cell an img2img."""
    from tests.test_img2img import canvas, init_picture

    picture = tmp_path / "init.png"
    init_picture().save(picture)
    _preview, gallery, status, infotext, *_ = client.predict(
        xyz_base="img2img", img2img_prompt="a red circle", img2img_init_images=canvas(picture), img2img_steps=3,
        img2img_width=64, img2img_height=64, x_type="Denoising", x_values="0.3, 0.9", api_name="/xyz_plot")
    assert "Done: 2 images and 1 grid in" in status, status
    assert "Denoising strength: 0.3" in infotext and "X/Y/Z plot: X: Denoising = 0.3, 0.9" in infotext
    assert all(Image.open(item["image"]).size == (64, 64) for item in gallery[1:])
    _preview, gallery, status, *_ = client.predict(xyz_base="img2img", img2img_prompt="no image", x_type="Steps",
                                                   x_values="1, 2", api_name="/xyz_plot")
    assert "init image" in status, status


def test_xyz_tab_names_a_bad_value(client):
    _preview, gallery, status, *_ = client.predict(**SMALL, x_type="Steps", x_values="two", api_name="/xyz_plot")
    assert "X values (x_values)" in status and "two" in status


def test_prompt_scripts_tab_runs_each_line_and_the_matrix(client):
    """The Prompt scripts tab: each line of the text box over the txt2img form (the line's prompt first), each the plain
    generation; the matrix's grid first, counted as a grid."""
    _preview, gallery, status, infotext, *_ = client.predict(
        **SMALL, seed=21, sampler_name="Euler", prompt_txt="small\n--prompt large --steps 3", checkbox_iterate=True,
        api_name="/prompt_scripts")
    assert "Done: 2 images in" in status, status
    assert infotext.startswith("small a red apple\n") and "Seed: 21" in infotext
    plain, _, _ = txt2img(client, prompt="large a red apple", seed=22, steps=3, sampler_name="Euler")
    assert Image.open(plain[0]["image"]).tobytes() == Image.open(gallery[1]["image"]).tobytes()
    _preview, gallery, status, *_ = client.predict(**{**SMALL, "prompt": "a red apple|on a plate"}, seed=21,
                                                   script_name="Prompt matrix", api_name="/prompt_scripts")
    assert "Done: 2 images and 1 grid in" in status, status
    grid = Image.open(gallery[0]["image"])
    assert grid.width == 2 * 64 and grid.height > 64, "two columns under their labels"
    _preview, _gallery, status, *_ = client.predict(**SMALL, prompt_txt="--steps many", api_name="/prompt_scripts")
    assert "line 1: --steps 'many': must be a whole number" in html.unescape(status), status


def test_an_uploaded_prompt_file_fills_the_text_box():
    from webui.ui.prompt_scripts_tab import prompt_file_text

    assert prompt_file_text(b" a cat \r\n--steps 3\xff\n") == "a cat\n--steps 3"


def test_the_merger_tab_merges_and_lists_the_result(client, engine):
    """Merge (No interpolation into bf16: the demo model converted) through the tab; a form without A is named."""
    demo = engine.checkpoint(None).name
    status = client.predict(primary=demo, method="No interpolation", precision="bf16", custom_name="demo-bf16",
                            api_name="/merge_checkpoints")
    assert "Saved demo-bf16.safetensors:" in status and "tensors in" in status, status
    assert "demo-bf16" in [info.model_name for info in engine.models.checkpoints()]
    status = client.predict(method="Weighted sum", api_name="/merge_checkpoints")
    assert "Primary model (A)" in html.unescape(status), status


def test_axis_with_choices_is_picked_from_a_list(engine):
    from webui.extensions import plot_axes
    from webui.ui.xyz_tab import axis_inputs

    axes = plot_axes(engine)
    text, picked, fill = axis_inputs(engine, axes, "Checkpoint name")
    assert not text["visible"] and picked["visible"] and fill["visible"]
    assert picked["choices"] == [c.name for c in engine.models.checkpoints()]
    text, picked, _ = axis_inputs(engine, axes, "CFG Scale")
    assert text["visible"] and not picked["visible"]


def test_png_info_reads_a_generated_image_and_sends_it_to_txt2img(client, engine, tmp_path):
    import gradio as gr
    from gradio_client import handle_file

    from webui.ui.png_info import NOT_AN_IMAGE, form_updates

    saved = engine.txt2img(GenerationRequest(prompt="a red apple", negative_prompt="blurry", steps=3, width=64,
                                             height=64, seed=4321, save_images=True))
    infotext = saved.infotexts[0]
    assert client.predict(handle_file(str(saved.paths[0])), api_name="/png_info") == infotext
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    assert "no generation parameters" in client.predict(handle_file(str(tmp_path / "plain.png")), api_name="/png_info")
    (tmp_path / "notes.png").write_text("not an image")
    said = client.predict(handle_file(str(tmp_path / "notes.png")), api_name="/png_info")
    assert said == NOT_AN_IMAGE, "said in words, not PIL's error with the server's temporary paths"
    assert all(u == gr.update() for u in form_updates({"prompt": None}, said, engine.canonical_sampler))
    with gr.Blocks():
        form = {name: gr.Textbox() for name in ("prompt", "negative_prompt", "steps", "width", "height", "seed",
                                                 "n_iter")}
    updates = dict(zip(form, form_updates(form, infotext, engine.canonical_sampler)))
    assert {k: u.get("value") for k, u in updates.items()} == {
        "prompt": "a red apple", "negative_prompt": "blurry", "steps": 3, "width": 64, "height": 64, "seed": 4321,
        "n_iter": None}, "the batch count is not in the infotext: left alone"


def test_send_to_txt2img_splits_an_old_sampler_name_and_resets_what_the_infotext_lacks():
    """A1111 1.5's "Sampler: DPM++ 2M Karras" is sampler and schedule type; no "Clip skip" means 1, no "Distilled
    CFG Scale" its default, whatever the form held before."""
    from webui.engine.sampling.samplers import SamplerRegistry
    from webui.ui.png_info import form_updates

    registry = SamplerRegistry()
    with gr.Blocks():
        form = {"prompt": gr.Textbox("typed"), "sampler_name": gr.Dropdown(registry.sampler_names(), value="DPM++ 2M"),
                "scheduler": gr.Dropdown(registry.schedule_type_names(), value="Automatic"),
                "distilled_cfg_scale": gr.Slider(0, 30, value=3.5), "clip_skip": gr.Slider(1, 12, value=1),
                "n_iter": gr.Slider(1, 100, value=1)}
    infotext = "a fox\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 128x128"
    values = {name: update.get("value") for name, update in zip(form, form_updates(form, infotext, registry.resolve))}
    assert values == {"prompt": "a fox", "sampler_name": "DPM++ 2M", "scheduler": "Karras",
                      "distilled_cfg_scale": 3.5, "clip_skip": 1, "n_iter": None}
    kept = dict(zip(form, form_updates(form, infotext.replace("DPM++ 2M Karras", "Nonesuch"), registry.resolve)))
    assert kept["sampler_name"] == gr.update() and kept["scheduler"] == gr.update(), "unknown here: left as it is"


def test_settings_tab_applies_all_or_nothing_and_keeps_it(engine):
    from webui.settings import OPTION_SECTIONS, Options
    from webui.ui.settings_tab import apply_settings

    demo = build_ui(engine, JobQueue(engine))
    boxes = {c["props"].get("elem_id"): c["props"] for c in demo.config["components"]}
    for labels in OPTION_SECTIONS.values():
        for key, label in labels.items():
            assert boxes[key]["label"] == label and boxes[key]["value"] == engine.options[key]
    values = {key: engine.options[key] for labels in OPTION_SECTIONS.values() for key in labels}
    message, *shown = apply_settings(engine, {**values, "max_steps": 200, "samples_save": False})
    assert "2 setting(s) changed: samples_save, max_steps" in message
    assert Options(engine.options.path)["max_steps"] == 200, "saved in config.json"
    assert shown[list(values).index("max_steps")] == 200
    message, *shown = apply_settings(engine, {**values, "max_steps": 0, "max_batch_size": 4})
    assert "Most sampling steps: must be between 1 and 1000, got 0. Nothing was changed." in message
    assert engine.options["max_steps"] == 200 and engine.options["max_batch_size"] == 8, "all or nothing"
    assert all(update == gr.skip() for update in shown), "the inputs keep what was typed, to be corrected"
    engine.options.update({"max_steps": 150, "samples_save": True})


def test_the_step_slider_follows_the_steps_limit(engine):
    engine.options.update({"max_steps": 300})
    try:
        demo = build_ui(engine, JobQueue(engine))
        steps = next(c["props"] for c in demo.config["components"] if c["props"].get("elem_id") == "txt2img_steps")
        assert steps["maximum"] == 300
        assert engine.txt2img(GenerationRequest(prompt="a", width=64, height=64, steps=200)).images
    finally:
        engine.options.update({"max_steps": 150})


def test_live_preview_period_keeps_latents_every_n_steps():
    import torch

    from webui.engine.formats.detect import Family

    progress = Progress(preview_every=3)
    progress.begin("txt2img", job_count=1, steps=9)
    latents = [torch.full((1, 4, 2, 2), float(i)) for i in range(10)]
    for step in range(1, 5):
        progress.step(step, latents[step], Family.SD1)
    assert progress.sampling_step == 4 and progress._latents is latents[3], "the preview of step 3 until step 6"


@pytest.mark.parametrize("share_url", [None, "https://abc.gradio.live"])
def test_share_says_where_the_ui_is_or_why_there_is_no_public_link(engine, monkeypatch, caplog, share_url):
    from fastapi import FastAPI

    from webui import server

    launched = {}

    def launch(self, **kwargs):
        launched.update(kwargs)
        return FastAPI(), "http://127.0.0.1:7860/", share_url  # the served app gets the launcher's middlewares

    monkeypatch.setattr(gr.Blocks, "launch", launch)
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    args = parse_args(["--share", "--port", "7860"])
    with caplog.at_level("INFO", logger="webui"):
        server.serve_ui(engine, JobQueue(engine), "127.0.0.1", args)
    assert launched["share"] is True
    if share_url:
        assert f"Public share link: {share_url}" in caplog.text
    else:
        assert "Could not create a public share link" in caplog.text
        assert "still served locally at http://127.0.0.1:7860/" in caplog.text


def test_a_job_refused_before_it_is_queued_is_shown_like_any_refused_job(engine):
    def full_queue(values: tuple) -> Future:
        raise Busy("100 jobs are waiting already (the most is 100, max_queued_jobs in Settings)")

    out = {name: name for name in ("gallery", "infotext", "status", "preview")}
    *_, last = generator(JobQueue(engine), {}, out, full_queue)()
    assert "gen-error" in last["status"] and "max_queued_jobs" in last["status"]


def test_png_info_reads_a_decompression_bombs_text_without_decoding_it(client, tmp_path, monkeypatch):
    """Gradio's own image preprocessing decoded and converted every upload: a 0.4 MB PNG of 12000x12000 cost 432 MB.
    The upload box hands the file on, and its text is read chunk by chunk."""
    from gradio_client import handle_file
    from PIL import ImageFile

    from tests.bombs import png_bomb, png_chunk

    def no_decoding(image):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(png_chunk(b"tEXt", b"parameters\0a bomb\nSteps: 3, Sampler: Euler, Seed: 9")))
    assert client.predict(handle_file(str(path)), api_name="/png_info") == "a bomb\nSteps: 3, Sampler: Euler, Seed: 9"
    cut = tmp_path / "cut.png"
    cut.write_bytes(path.read_bytes()[:20])  # the file ends inside a chunk header
    assert "not an image" in client.predict(handle_file(str(cut)), api_name="/png_info")


def test_a_preview_that_is_a_decompression_bomb_is_not_decoded(tmp_path, monkeypatch):
    """A LoRA's preview beside it in the models folder is a stranger's file too: one of 12000x12000 pixels in 0.4 MB
    was decoded (432 MB) to draw its card; now its size is read from the header and the card shows the name."""
    from PIL import ImageFile

    from tests.bombs import png_bomb
    from webui.ui.network_browser import card_image, placeholder_card

    (tmp_path / "bomb.safetensors").write_bytes(b"")
    (tmp_path / "bomb.preview.png").write_bytes(png_bomb(b""))
    decoded = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda image: decoded.append(image.size))

    class Network:
        @staticmethod
        def path(name: str) -> Path:
            return tmp_path / f"{name}.safetensors"

    assert card_image(Network(), "bomb") == placeholder_card("bomb")
    assert decoded == [], "no pixel decoded"


def test_the_queue_view_shows_where_jobs_run_what_runs_and_what_waits(engine):
    from webui.ui.queue_tab import queue_html

    jobs, release = JobQueue(engine), threading.Event()
    assert "Nothing is running" in queue_html(jobs) and "one engine, in this process" in queue_html(jobs)
    running = jobs.submit_call("a long call", release.wait)
    waiting = jobs.submit_call("next", lambda: None)
    deadline = time.time() + 10
    while not running.running() and time.time() < deadline:
        time.sleep(0.01)
    shown = queue_html(jobs)
    assert "<td>a long call</td><td>0 of 1</td><td>this process</td>" in shown and "<b>Waiting:</b> 1" in shown
    release.set()
    waiting.result(timeout=10)
    while "Nothing is running" not in queue_html(jobs) and time.time() < deadline:
        time.sleep(0.01)
    assert "Nothing is running" in queue_html(jobs)
