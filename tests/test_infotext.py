import io

import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from webui.engine.infotext import build_infotext, format_value, parse_infotext, read_png_infotext, request_fields

A1111_TEXT = (
    "a cat\n"
    "Negative prompt: ugly, blurry\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 123, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "x: 0123456789ab, y: ba9876543210", '
    "Version: v1.10.1"
)
PARAMS = {
    "Steps": 20,
    "Sampler": "Euler a",
    "Schedule type": "Automatic",
    "CFG scale": 7.0,
    "Seed": 1,
    "Size": "512x512",
    "Model hash": "abcdef1234",
    "Model": "name",
    "Clip skip": 2,
    "Version": "v0.1.0",
}


def test_parses_a_real_a1111_infotext():
    assert parse_infotext(A1111_TEXT) == {
        "Prompt": "a cat",
        "Negative prompt": "ugly, blurry",
        "Steps": "30",
        "Sampler": "DPM++ 2M",
        "Schedule type": "Karras",
        "CFG scale": "7.5",
        "Seed": "123",
        "Size": "512x768",
        "Size-1": "512",
        "Size-2": "768",
        "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly",
        "Lora hashes": "x: 0123456789ab, y: ba9876543210",
        "Version": "v1.10.1",
    }



def test_request_fields_of_an_infotext():
    assert request_fields(A1111_TEXT) == {"prompt": "a cat", "negative_prompt": "ugly, blurry", "steps": 30,
                                          "sampler_name": "DPM++ 2M", "scheduler": "Karras", "cfg_scale": 7.5,
                                          "seed": 123, "width": 512, "height": 768}
    assert request_fields("a dog\nSteps: many, Seed: 5, Clip skip: 2") == \
        {"prompt": "a dog", "negative_prompt": "", "seed": 5, "clip_skip": 2}, "an unreadable value is left out"


def test_builds_a1111_text():
    text = build_infotext("a cat", "ugly", {**PARAMS, "Denoising strength": None, "Lora hashes": "x: 01, y: 02"})
    assert text == (
        "a cat\nNegative prompt: ugly\n"
        "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 1, Size: 512x512, "
        'Model hash: abcdef1234, Model: name, Clip skip: 2, Version: v0.1.0, Lora hashes: "x: 01, y: 02"'
    )


def test_negative_prompt_line_left_out_when_empty():
    text = build_infotext("a dog", "", PARAMS)
    assert text.split("\n")[0] == "a dog" and len(text.split("\n")) == 2
    parsed = parse_infotext(text)
    assert parsed["Prompt"] == "a dog" and parsed["Negative prompt"] == ""


@pytest.mark.parametrize("value, text", [(7.0, "7"), (7.5, "7.5"), (0.35, "0.35"), (20, "20"), (True, "True"), ("a, b", '"a, b"')])
def test_format_value(value, text):
    assert format_value(value) == text


NASTY_PROMPTS = [
    ("(masterpiece:1.2), a cat, <lora:x:0.8>", 'bad, "quoted", worst quality:1.4'),
    ("line one,\nline two: with colon\n\nafter a blank line", "neg\nSteps: 1, Seed: 2, Size: 3x4"),
    ('quotes " and \\ backslash', ""),
    ("日本語のプロンプト、猫 🐱, ünïcødé", "Ωmega: ≠"),
    ("Steps: 5, Sampler: Euler, Seed: 9", "x"),
    ("", "only negative"),
]


@pytest.mark.parametrize("prompt, negative", NASTY_PROMPTS)
def test_round_trip(prompt, negative):
    params = {**PARAMS, "CFG scale": 7.5, "Model": 'weird, "name": v2', "Extra key": "a\nb", "Hires prompt": " lead, trail "}
    parsed = parse_infotext(build_infotext(prompt, negative, params))
    assert parsed["Prompt"] == prompt and parsed["Negative prompt"] == negative
    assert {k: parsed[k] for k in params} == {k: str(v) for k, v in params.items()}


def test_unknown_keys_and_multiline_prompt_parse():
    parsed = parse_infotext("first\nsecond\nNegative prompt: n1\nn2\nSteps: 4, Foo Bar: baz, Seed: 5, Hires resize: 1024x1536")
    assert parsed["Prompt"] == "first\nsecond"
    assert parsed["Negative prompt"] == "n1\nn2"
    assert parsed["Foo Bar"] == "baz"
    assert (parsed["Hires resize-1"], parsed["Hires resize-2"]) == ("1024", "1536")


def test_text_without_parameters_is_all_prompt():
    assert parse_infotext("just a prompt, with: a colon") == {"Prompt": "just a prompt, with: a colon", "Negative prompt": ""}


def test_rejects_keys_that_would_not_parse_back():
    with pytest.raises(ValueError):
        build_infotext("p", "", {"Bad: key": 1})


def _user_comment_exif(data: bytes) -> Image.Exif:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = data
    return exif


def test_reads_png_parameters_chunk(tmp_path):
    info = PngInfo()
    info.add_text("parameters", A1111_TEXT + " ✓")  # non-Latin-1 text goes into an iTXt chunk
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    assert read_png_infotext(path) == A1111_TEXT + " ✓"
    with Image.open(path) as image:
        assert read_png_infotext(image) == A1111_TEXT + " ✓"


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
@pytest.mark.parametrize("encoding", ["utf-16-be", "utf-16-le"])
def test_reads_exif_user_comment(fmt, encoding):
    text = "猫, a cat\nSteps: 20, Seed: 1, Size: 8x8"
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, fmt, exif=_user_comment_exif(b"UNICODE\0" + text.encode(encoding)))
    buffer.seek(0)
    assert read_png_infotext(buffer) == text


def test_no_infotext_gives_none(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(path)
    assert read_png_infotext(path) is None


def test_png_text_chunks_of_every_kind_are_read_without_the_pixels(tmp_path):
    """tEXt, zTXt and iTXt (compressed or not), before or after the pixels, as PIL itself reads them once loaded."""
    from webui.engine.infotext import png_text

    info = PngInfo()
    info.add_text("plain", "a")
    info.add_text("squeezed", "b" * 500, zip=True)
    info.add_itxt("parameters", "ein Fuchs\nSteps: 2, Sampler: Euler, Seed: 5", zip=True)
    info.add_itxt("open", "ü", zip=False)
    path = tmp_path / "texts.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    with open(path, "rb") as f:
        f.read(8)
        texts = png_text(f)
    with Image.open(path) as image:
        image.load()
        assert texts == {k: str(v) for k, v in image.text.items()}
    assert read_png_infotext(path) == "ein Fuchs\nSteps: 2, Sampler: Euler, Seed: 5"
