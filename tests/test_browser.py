"""The UI in a real browser: headless Chromium (Debian's, /usr/bin/chromium) driven through Playwright against the
real launcher (CPU, the embedded demo model, 128x128). A person's steps: type a prompt and press Generate or
Ctrl+Enter, move GPU Weights, plot X/Y/Z, read a PNG's parameters and send them to txt2img; and what they see.

A full-page screenshot of each test, passed or failed, and the server's log land in $TEST_ARTIFACTS/browser
(test-artifacts/browser by default)."""
from __future__ import annotations

import io
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urljoin

import pytest
import requests
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.live import ROOT, Server, start_server

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"browser tests need Chromium at {CHROMIUM} (Debian: apt-get install chromium)",
                allow_module_level=True)
try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
except ImportError:
    pytest.skip("browser tests need Playwright (pip install -e '.[test]')", allow_module_level=True)

# Debian's Chromium, not a browser Playwright downloads; nothing but the local server is reached.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
TIMEOUT_MS = 60_000  # any one wait; a generation here takes a second or two, the first one loads the model
SIZE = 128  # the demo model's declared resolution

PROMPT = "#txt2img_prompt textarea"
NEGATIVE = "#txt2img_neg_prompt textarea"
STATUS = "#txt2img_status"
INFOTEXT = "#txt2img_infotext textarea"
ERROR_TOASTS = "[data-testid=toast-body].error"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    live = start_server(tmp_path_factory.mktemp("browser"), "--api")  # --api: the tests read the options store
    try:
        yield live
    finally:
        live.stop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(live.log_path, ARTIFACTS / "server.log")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        # rebind.example resolves to 127.0.0.1, as a DNS-rebinding attacker's name would
        chromium = p.chromium.launch(executable_path=str(CHROMIUM),
                                     args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP rebind.example 127.0.0.1"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def page(browser, server) -> Iterator[Page]:
    expect.set_options(timeout=TIMEOUT_MS)
    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
    tab.set_default_timeout(TIMEOUT_MS)
    tab.goto(server.url, wait_until="load")
    wait_for_the_demo_size(tab)
    yield tab
    tab.close()


@pytest.fixture(autouse=True)
def screenshot(page, request) -> Iterator[None]:
    """The page as it was when the test ended, however it ended."""
    yield
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True, timeout=TIMEOUT_MS)
    except Exception as e:  # a screenshot that fails must not hide the test's own outcome
        print(f"no screenshot of {request.node.name}: {e}")


def wait_for_the_demo_size(page: Page) -> None:
    """The page has loaded its settings: the sliders show the demo model's declared size (set on load)."""
    for side in ("width", "height"):
        expect(page.locator(f"#txt2img_{side} input[type=number]")).to_have_value(str(SIZE))


def set_slider(page: Page, elem_id: str, value: float) -> None:
    """Type into a slider's number box and press Enter, as a person does; the slider itself follows."""
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    expect(page.locator(f"#{elem_id} input[type=range]")).to_have_value(str(value))


def generations(server: Server) -> list[tuple[int, int]]:
    """(steps, seed) of each txt2img generation the server logged, in order."""
    return [(int(steps), int(seed)) for steps, seed in
            re.findall(r"INFO webui\.engine\.engine: txt2img: \d+ image\(s\) \d+x\d+, (\d+) steps, [^,]+, seed (\d+)",
                       server.log)]


def wait_until(condition: Callable[[], bool], what: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting until {what}"
        time.sleep(0.1)


def fetched_image(server: Server, src: str | None) -> Image.Image:
    """The image an <img> shows, fetched over HTTP as the browser did."""
    assert src, "the <img> has no src"
    reply = requests.get(urljoin(server.url + "/", src), timeout=60)
    assert reply.status_code == 200, f"{src}: HTTP {reply.status_code}"
    image = Image.open(io.BytesIO(reply.content))
    image.load()
    return image


def natural_sizes(page: Page, selector: str) -> list[tuple[int, int]]:
    """The decoded size of every <img> under ``selector``, once all have loaded."""
    page.wait_for_function("s => [...document.querySelectorAll(s)].every(i => i.complete && i.naturalWidth > 0)",
                           arg=selector)
    return [tuple(size) for size in page.locator(selector).evaluate_all(
        "imgs => imgs.map(i => [i.naturalWidth, i.naturalHeight])")]


def test_generate_shows_the_image_its_parameters_and_done(page, server):
    page.locator(PROMPT).fill("a red circle")
    set_slider(page, "txt2img_steps", 3)
    page.locator("#txt2img_generate").click()

    expect(page.locator(INFOTEXT)).to_have_value(re.compile(r"^a red circle\nSteps: 3, .*Seed: \d+, .*Size: 128x128"))
    expect(page.locator(STATUS)).to_contain_text(re.compile(r"Done: 1 image in \d+s, seed \d+\."))
    seed = re.search(r"Seed: (\d+)", page.locator(INFOTEXT).input_value())[1]
    assert f"seed {seed}." in page.locator(STATUS).inner_text(), "the status and the infotext tell one seed"
    assert generations(server)[-1] == (3, int(seed))

    shown = page.locator("#txt2img_gallery img")
    expect(shown).to_have_count(1)
    image = fetched_image(server, shown.get_attribute("src"))
    assert image.format == "PNG" and image.size == (SIZE, SIZE)
    assert len(set(image.convert("L").getdata())) > 10, "a picture, not a blank"
    assert natural_sizes(page, "#txt2img_gallery img") == [(SIZE, SIZE)]
    assert image.info.get("parameters") == page.locator(INFOTEXT).input_value(), "a download keeps its parameters"
    assert page.locator(ERROR_TOASTS).count() == 0, page.locator(ERROR_TOASTS).all_inner_texts()

    panel = page.locator("#txt2img_memory")  # memory over time, weights resident vs streamed, where the time went
    for plot, legend in (("timeline", "RAM (this process)"), ("weights", "resident"), ("time", None)):
        chart = panel.locator(f"#txt2img_memory_{plot}")
        expect(chart.locator("canvas, svg").first).to_be_visible()
        if legend:
            expect(chart).to_contain_text(legend)


def test_will_it_fit_is_told_beside_generate_and_follows_the_form(page, server):
    """After a job the forecast knows this machine's rates: more steps, a longer time (on the CPU: no VRAM)."""
    forecast = page.locator("#txt2img_forecast")
    set_slider(page, "txt2img_steps", 3)
    page.locator("#txt2img_generate").click()
    expect(page.locator(STATUS)).to_contain_text("Done")
    told = re.compile(r"Will it fit\? RAM \+\d+\.\d of [\d.]+ GB free · ~(\d+\.\d) s")
    expect(forecast).to_contain_text(told)
    three_steps = float(told.search(forecast.inner_text())[1])

    def seconds() -> float:
        shown = told.search(forecast.inner_text())
        return float(shown[1]) if shown else 0.0

    set_slider(page, "txt2img_steps", 30)
    try:
        wait_until(lambda: seconds() > three_steps, "the forecast follows the steps")
    finally:
        set_slider(page, "txt2img_steps", 3)


def test_ctrl_enter_in_either_prompt_box_generates(page, server):
    before = len(generations(server))
    page.locator(PROMPT).fill("a green square")
    page.locator(PROMPT).press("Control+Enter")
    expect(page.locator(INFOTEXT)).to_have_value(re.compile(r"^a green square\nSteps: "))
    expect(page.locator(STATUS)).to_contain_text("Done: 1 image in")
    expect(page.locator("#txt2img_gallery img")).to_have_count(1)

    page.locator(NEGATIVE).fill("blurry")
    page.locator(NEGATIVE).press("Control+Enter")
    expect(page.locator(INFOTEXT)).to_have_value(re.compile(r"^a green square\nNegative prompt: blurry\nSteps: "))
    expect(page.locator(STATUS)).to_contain_text("Done: 1 image in")
    assert len(generations(server)) == before + 2, "one generation per key press"


def test_gpu_weights_go_to_the_settings_store_and_stay_after_a_reload(page, server):
    total = int(page.locator("#gpu_weights input[type=range]").get_attribute("max"))
    original = server.api("GET", "options").json()["forge_inference_memory"]
    weights = total - 1536 if original != 1536 else total - 2048  # a value the store does not hold yet

    def stored() -> int:
        return server.api("GET", "options").json()["forge_inference_memory"]

    try:
        set_slider(page, "gpu_weights", weights)
        wait_until(lambda: stored() == total - weights, f"the store holds inference memory {total - weights} MB")
        page.reload(wait_until="load")
        wait_for_the_demo_size(page)
        expect(page.locator("#gpu_weights input[type=number]")).to_have_value(str(weights))
        expect(page.locator("#gpu_weights input[type=range]")).to_have_value(str(weights))
        assert int(page.locator("#gpu_weights input[type=range]").get_attribute("max")) == total
    finally:
        server.api("POST", "options", json={"forge_inference_memory": original})


def test_xyz_plot_shows_the_grid_then_each_cell(page, server):
    wait_for_the_demo_size(page)
    page.locator(PROMPT).fill("a yellow triangle")
    page.get_by_role("tab", name="X/Y/Z plot").click()
    expect(page.locator("#xyz_x_type input")).to_have_value("Seed")
    page.locator("#xyz_x_values textarea").fill("1, 2")

    # Picking an axis type clears its values: that round trip done, the values typed next are kept.
    y_values = page.locator("#xyz_y_values textarea")
    y_values.fill("left from before")
    page.locator("#xyz_y_type input").click()
    page.get_by_role("option", name="Steps", exact=True).click()
    expect(page.locator("#xyz_y_type input")).to_have_value("Steps")
    expect(y_values).to_have_value("")
    y_values.fill("2, 3")

    before = len(generations(server))
    page.locator("#xyz_generate").click()
    expect(page.locator("#xyz_status")).to_contain_text("Done: 4 images and 1 grid in")
    expect(page.locator("#xyz_infotext textarea")).to_have_value(
        re.compile(r"^a yellow triangle\nSteps: 2, .*Seed: 1, .*\nX/Y/Z plot: X: Seed = 1, 2; Y: Steps = 2, 3$", re.S))

    thumbnails = page.locator("#xyz_gallery img")
    expect(thumbnails).to_have_count(5)  # the grid, then its 4 cells
    grid, *cells = natural_sizes(page, "#xyz_gallery img")
    assert cells == [(SIZE, SIZE)] * 4
    assert grid[0] >= 2 * SIZE and grid[1] >= 2 * SIZE, f"a 2x2 grid of {SIZE}px cells, not {grid}"
    assert sorted(generations(server)[before:]) == [(2, 1), (2, 2), (3, 1), (3, 2)]


def test_png_info_reads_the_parameters_and_sends_them_to_txt2img(page, tmp_path):
    """An older A1111 infotext: its combined sampler name is split, its missing Clip skip (1) replaces the form's 2,
    and Generate runs with what was sent. A file that is not an image is said to be one."""
    page.get_by_role("tab", name="txt2img").click()
    set_slider(page, "txt2img_clip_skip", 2)
    infotext = ("a blue square\nNegative prompt: blurry\nSteps: 7, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 99, "
                "Size: 128x128")
    chunk = PngInfo()
    chunk.add_text("parameters", infotext)
    path = tmp_path / "with-parameters.png"
    Image.new("RGB", (SIZE, SIZE), "blue").save(path, pnginfo=chunk)

    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(path)
    expect(page.locator("#pnginfo_parameters textarea")).to_have_value(infotext)
    page.locator("#pnginfo_send_txt2img").click()

    expect(page.get_by_role("tab", name="txt2img")).to_have_attribute("aria-selected", "true")
    expect(page.locator(PROMPT)).to_be_visible()
    expect(page.locator(PROMPT)).to_have_value("a blue square")
    expect(page.locator(NEGATIVE)).to_have_value("blurry")
    expect(page.locator("#txt2img_steps input[type=number]")).to_have_value("7")
    expect(page.locator("#txt2img_seed input")).to_have_value("99")
    expect(page.locator("#txt2img_cfg_scale input[type=number]")).to_have_value("6.5")
    expect(page.locator("#txt2img_sampling input")).to_have_value("DPM++ 2M")
    expect(page.locator("#txt2img_scheduler input")).to_have_value("Karras")
    expect(page.locator("#txt2img_clip_skip input[type=number]")).to_have_value("1")
    expect(page.locator("#txt2img_width input[type=number]")).to_have_value(str(SIZE))
    page.locator("#txt2img_generate").click()
    expect(page.locator(INFOTEXT)).to_have_value(re.compile(r"Sampler: DPM\+\+ 2M, Schedule type: Karras, .*Seed: 99"))
    assert page.locator(ERROR_TOASTS).count() == 0, page.locator(ERROR_TOASTS).all_inner_texts()

    notes = tmp_path / "notes.png"
    notes.write_text("a text file named like an image")
    page.get_by_role("tab", name="PNG Info").click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(notes)
    expect(page.locator("#pnginfo_parameters textarea")).to_have_value(re.compile(r"^\(this is not an image"))
    assert page.locator(ERROR_TOASTS).count() == 0, page.locator(ERROR_TOASTS).all_inner_texts()


def test_a_controlnet_units_preprocessor_relabels_its_sliders_and_previews_its_map(page, server, tmp_path):
    """In txt2img's ControlNet accordion: choosing canny shows its resolution and thresholds under their names, and
    ▶ shows the edges it detects in the unit's picture (white lines on black)."""
    picture = tmp_path / "shapes.png"
    image = Image.new("RGB", (SIZE, SIZE), "white")
    image.paste((20, 20, 20), (32, 32, 96, 96))
    image.save(picture)
    page.get_by_role("tab", name="txt2img").click()
    page.locator("#txt2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
    unit = "#txt2img_controlnet_0"
    expect(page.locator(f"{unit}_threshold_a")).to_be_hidden()
    page.locator(f"{unit}_module input").click()
    page.get_by_role("option", name="canny", exact=True).click()
    expect(page.locator(f"{unit}_threshold_a")).to_contain_text("Low Threshold")
    expect(page.locator(f"{unit}_threshold_b")).to_contain_text("High Threshold")
    expect(page.locator(f"{unit}_processor_res")).to_contain_text("Resolution")
    page.locator(f"{unit}_image input[type=file]").set_input_files(picture)
    page.locator(f"{unit}_preview_button").click()
    shown = page.locator(f"{unit}_preview img")
    expect(shown).to_be_visible()
    edges = fetched_image(server, shown.get_attribute("src")).convert("L")
    values = sorted(set(edges.getdata()))
    assert values[0] == 0 and values[-1] == 255 and sum(1 for v in edges.getdata() if v > 127) < edges.width * 40
    assert page.locator(ERROR_TOASTS).count() == 0, page.locator(ERROR_TOASTS).all_inner_texts()


def test_a_reload_shows_the_selected_checkpoint_not_the_loaded_one(page, server):
    """Another tab (here the API) selects the dusk checkpoint while demo-shapes is loaded: a reload shows what the
    next Generate uses."""
    titles = {m["model_name"]: m["title"] for m in server.api("GET", "sd-models").json()}
    assert server.api("POST", "options", json={"sd_model_checkpoint": titles["demo-shapes"]}).ok
    assert server.api("POST", "txt2img", json={"prompt": "a dot", "steps": 1, "width": 64, "height": 64}).ok
    try:
        assert server.api("POST", "options", json={"sd_model_checkpoint": titles["demo-shapes-dusk"]}).ok
        page.reload(wait_until="load")
        wait_for_the_demo_size(page)
        expect(page.locator("#sd_model_checkpoint input")).to_have_value(re.compile(r"^demo-shapes-dusk\.safetensors"))
    finally:
        server.api("POST", "options", json={"sd_model_checkpoint": titles["demo-shapes"]})
        page.reload(wait_until="load")
        wait_for_the_demo_size(page)


def test_the_small_buttons_draw_their_symbols_without_an_emoji_font(page):
    """Each symbol drawn in the button's own font differs from what a character no font has draws (the empty box):
    emoji drew that box where no emoji font is installed."""
    page.get_by_role("tab", name="txt2img").click()
    buttons = ["#refresh_checkpoints", "#txt2img_random_seed", "#txt2img_reuse_seed", "#txt2img_lora_refresh",
               "#txt2img_controlnet_0_preview_button", "#txt2img_controlnet_0_refresh"]
    if not page.locator(buttons[-1]).is_visible():  # the ControlNet accordion draws its units when opened
        page.locator("#txt2img_controlnet").get_by_text("ControlNet", exact=True).first.click()
        expect(page.locator(buttons[-1])).to_be_visible()
    drawn = page.evaluate("""ids => {
        const draw = (text, family) => {
            const canvas = document.createElement("canvas");
            canvas.width = canvas.height = 64;
            const context = canvas.getContext("2d");
            context.font = `40px ${family}`;
            context.fillText(text, 8, 48);
            return canvas.toDataURL();
        };
        return ids.map(id => {
            const button = document.querySelector(id);
            const family = getComputedStyle(button).fontFamily;
            const text = button.innerText.trim();
            return [id, text, text !== "" && draw(text, family) !== draw("\\u{10FFFD}", family)];
        });
    }""", buttons)
    missing = [(id_, text) for id_, text, ok in drawn if not ok]
    assert not missing, f"drawn as an empty box: {missing}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.locator("#txt2img_seed").scroll_into_view_if_needed()
    seed, reuse = (page.locator(id_).bounding_box() for id_ in ("#txt2img_seed", "#txt2img_reuse_seed"))
    page.screenshot(path=str(ARTIFACTS / "seed_buttons.png"), clip={
        "x": seed["x"], "y": seed["y"], "width": reuse["x"] + reuse["width"] - seed["x"], "height": seed["height"]})


def test_a_page_opened_after_a_generation_loads_without_an_error(page, server):
    assert server.api("POST", "txt2img", json={"prompt": "a dot", "steps": 1, "width": 64, "height": 64}).ok
    errors = page.locator(ERROR_TOASTS)
    for _ in range(2):  # a race: twice gives it more chances to show
        page.goto(server.url, wait_until="load")
        wait_for_the_demo_size(page)
        expect(page.locator("#sd_model_checkpoint input")).to_have_value(re.compile(r"\[[0-9a-f]{10}\]$"))
        try:  # the page's load events are done by now; an error they met shows at once
            errors.first.wait_for(state="visible", timeout=2_500)
        except PlaywrightTimeout:
            continue
        pytest.fail(f"the page loaded with an error: {errors.first.inner_text()}")


def test_a_lora_card_adds_its_tag_and_the_image_uses_it(page, server):
    page.get_by_role("tab", name="txt2img").click()
    page.locator(PROMPT).fill("a red circle")
    page.locator("#txt2img_lora_search input, #txt2img_lora_search textarea").first.fill("outline")
    cards = page.locator("#txt2img_lora_cards .thumbnail-item")
    expect(cards).to_have_count(1)
    expect(cards.first).to_contain_text("demo-outline")
    cards.first.click()
    expect(page.locator(PROMPT)).to_have_value("a red circle <lora:demo-outline:1>")
    cards.first.click()
    expect(page.locator(PROMPT)).to_have_value("a red circle")  # a second click takes it back, as in A1111
    cards.first.click()
    expect(page.locator(PROMPT)).to_have_value("a red circle <lora:demo-outline:1>")
    set_slider(page, "txt2img_steps", 3)
    page.locator("#txt2img_generate").click()
    expect(page.locator(INFOTEXT)).to_have_value(re.compile(r"^a red circle <lora:demo-outline:1>\n.*Lora hashes: "
                                                            r'"demo-outline: [0-9a-f]+"', re.S))


def test_settings_apply_all_or_nothing_and_the_form_follows(page, server):
    def stored(key: str):
        return server.api("GET", "options").json()[key]

    page.get_by_role("tab", name="Settings").click()
    max_steps = page.locator("#max_steps input")
    try:
        max_steps.fill("0")
        page.locator("#settings_apply").click()
        expect(page.locator("#settings_message")).to_contain_text(
            "Most sampling steps: must be between 1 and 1000, got 0. Nothing was changed.")
        assert stored("max_steps") == 150
        max_steps.fill("200")
        page.locator("#settings_apply").click()
        expect(page.locator("#settings_message")).to_contain_text("1 setting(s) changed: max_steps.")
        assert stored("max_steps") == 200
        page.reload(wait_until="load")
        wait_for_the_demo_size(page)
        expect(page.locator("#txt2img_steps input[type=range]")).to_have_attribute("max", "200")
        page.get_by_role("tab", name="Settings").click()
        expect(page.locator("#max_steps input")).to_have_value("200")
    finally:
        server.api("POST", "options", json={"max_steps": 150})


def test_gradio_auth_asks_for_a_login_before_the_ui(browser, tmp_path_factory):
    login = start_server(tmp_path_factory.mktemp("login"), "--gradio-auth", "carol:s3cret")
    tab = browser.new_page(viewport={"width": 1000, "height": 700})
    try:
        tab.goto(login.url, wait_until="load")
        expect(tab.locator("input[type=password]")).to_be_visible(timeout=TIMEOUT_MS)
        assert tab.locator(PROMPT).count() == 0, "no UI before the login"
        tab.locator("input[type=text]").first.fill("carol")
        tab.locator("input[type=password]").fill("wrong")
        tab.locator("input[type=password]").press("Enter")
        expect(tab.get_by_text(re.compile("Incorrect Credentials", re.I))).to_be_visible(timeout=TIMEOUT_MS)
        tab.locator("input[type=text]").first.fill("carol")  # the failed attempt emptied the form
        tab.locator("input[type=password]").fill("s3cret")
        tab.locator("input[type=password]").press("Enter")
        expect(tab.locator(PROMPT)).to_be_visible(timeout=TIMEOUT_MS)
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(ARTIFACTS / "gradio_auth_after_login.png"))
        tab.close()
        login.stop()


ATTACKER_PAGE = """<!doctype html><title>attacker</title><script>
async function attack(target) {
  const tries = {};
  const simple = {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"}};
  const sent = async (name, request) => {
    try { await request; tries[name] = "sent"; } catch (e) { tries[name] = "failed: " + e; }
  };
  await sent("options", fetch(target + "/sdapi/v1/options", {...simple, body: JSON.stringify({samples_format: "jpg"})}));
  await sent("txt2img", fetch(target + "/sdapi/v1/txt2img",
                              {...simple, body: JSON.stringify({prompt: "from another site", steps: 7, seed: 7007})}));
  const form = new FormData();
  form.append("files", new Blob(["x".repeat(5000)]), "planted.png");
  await sent("upload", fetch(target + "/gradio_api/upload", {method: "POST", mode: "no-cors", body: form}));
  try {
    const flags = await fetch(target + "/sdapi/v1/cmd-flags");
    tries.read = "read: " + (await flags.text()).slice(0, 40);
  } catch (e) { tries.read = "unreadable"; }
  return tries;
}
</script>"""


def test_another_sites_page_and_a_rebound_name_cannot_drive_the_server(browser, server, tmp_path):
    """The browser as the attacker: a page of another origin sends the server the requests a form or fetch may send
    without asking (options, txt2img, an upload) and tries to read /cmd-flags; a page whose name was rebound to
    127.0.0.1 (Chromium's resolver mapped) loads from the server's port. Nothing changes, nothing is generated or
    read, and the rebound name gets a 403 for the page and the API alike."""
    import http.server
    import threading

    (tmp_path / "index.html").write_text(ATTACKER_PAGE)
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(tmp_path))  # noqa: E731
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    before = (server.api("GET", "options").json()["samples_format"], len(generations(server)))
    tab = browser.new_page()
    try:
        tab.goto(f"http://127.0.0.1:{site.server_address[1]}/index.html", wait_until="load")
        tries = tab.evaluate("target => attack(target)", server.url)
        assert tries["read"] == "unreadable", tries
        assert all(tries[name] == "sent" for name in ("options", "txt2img", "upload")), tries
        assert server.log.count("Refused POST") >= 3, "the three changes reached the server and were refused"
        assert (server.api("GET", "options").json()["samples_format"], len(generations(server))) == before
    finally:
        tab.close()
        site.shutdown()

    tab = browser.new_page()
    try:
        answer = tab.goto(f"http://rebind.example:{server.url.rsplit(':', 1)[1]}/", wait_until="load")
        assert answer.status == 403 and "rebind.example" in tab.content()
        assert tab.evaluate("async () => (await fetch('/sdapi/v1/cmd-flags')).status") == 403
    finally:
        tab.screenshot(path=str(ARTIFACTS / "rebound_name_refused.png"))
        tab.close()


def test_a_closed_tab_stops_its_job(browser, server):
    """A job whose page went away is not worked on: the tab is closed while its long job runs, and the job is
    interrupted (it went on to its last step for nobody)."""
    tab = browser.new_page(viewport={"width": 1400, "height": 1000})
    tab.set_default_timeout(TIMEOUT_MS)
    tab.goto(server.url, wait_until="load")
    wait_for_the_demo_size(tab)
    tab.locator(PROMPT).fill("a long job nobody waits for")
    set_slider(tab, "txt2img_steps", 150)
    set_slider(tab, "txt2img_width", 512)
    set_slider(tab, "txt2img_height", 512)
    tab.locator("#txt2img_generate").click()
    expect(tab.locator(STATUS)).to_contain_text(re.compile(r"\d+%"))
    tab.close()
    wait_until(lambda: "its job was interrupted" in server.log, "the job of the closed tab is interrupted")
    wait_until(lambda: not server.api("GET", "progress").json()["state"]["job"], "the queue is idle again", 30)
