"""A1111's "Prompts from file or textbox" and "Prompt matrix" scripts (issue 28): each line's or combination's image is
the plain request with that line's fields or that combination's prompt (the reference: the engine's own generation
of the request A1111's script builds), the prompts are A1111's to the character, the matrix grid is laid out and
labelled as A1111's, and bad lines or arguments are refused before any image is made."""
from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.conftest import make_engine
from webui.api import register_api
from webui.engine.grid import INACTIVE
from webui.engine.infotext import parse_infotext
from webui.engine.prompt_lines import PromptLines, read_line
from webui.engine.prompt_matrix import PromptMatrix, matrix_prompts
from webui.engine.request import GenerationRequest
from webui.errors import UserError
from webui.jobs import JobQueue

BASE = dict(prompt="on a white background", negative_prompt="", width=64, height=64, steps=2, cfg_scale=5.0,
            seed=50, sampler_name="Euler", save_images=False)


@pytest.fixture
def engine(tmp_path, sd1_file, sdxl_file):
    return make_engine(tmp_path, sd1_file, sdxl_file)


def same(a, b) -> bool:
    return np.array_equal(np.asarray(a), np.asarray(b))


def test_a_line_is_read_as_a1111_reads_it():
    assert read_line(1, "a cat -- on a mat").fields == {"prompt": "a cat -- on a mat"}, "no option first: a prompt"
    line = read_line(2, '--prompt a red  cat --negative_prompt "blurry, dark" --steps 7 --cfg_scale 4.5 '
                        '--sampler_name "Euler a" --do_not_save_samples true --styles "one, two" --outpath_grids /x')
    assert line.fields == {"prompt": "a red cat", "negative_prompt": "blurry, dark", "steps": 7, "cfg_scale": 4.5,
                           "sampler_name": "Euler a", "save_images": False, "styles": ["one", "two"]}
    assert line.ignored == ("outpath_grids",)
    assert read_line(3, "--tiling false --width 128").fields == {"width": 128}


@pytest.mark.parametrize("line,words", [
    ("--steps many", "line 4: --steps 'many'"),
    ("--frobnicate 3", "line 4: unknown option --frobnicate"),
    ("--steps", "line 4: --steps has no value"),
    ('--prompt "unclosed', "line 4: cannot be split"),
    ("--steps 3 oops", "line 4: 'oops' is no option"),
    ("--tiling true", "cannot do tiling"),
])
def test_a_line_of_options_that_cannot_be_read_is_named(line, words):
    with pytest.raises(UserError) as e:
        read_line(4, line)
    assert words in e.value.message and e.value.field == "script_args"


def test_each_line_is_the_plain_request_with_its_fields(engine):
    """Plain lines go before the form's prompt (or after it), option lines change their own request only, "Iterate
    seed every line" counts the seed up by the images a line makes, and every image is the plain request's."""
    text = "a red circle\n\n--prompt a blue square --steps 3 --seed 7 --n_iter 2\n--sd_model sdxl-1 --width 72"
    base = GenerationRequest(**BASE, batch_size=1, n_iter=1)
    result = PromptLines(text, iterate_seed=True).run(engine, base)
    assert result.prompts == ["a red circle on a white background", *["a blue square on a white background"] * 2,
                              "on a white background"]
    assert result.seeds == [50, 7, 8, 52], "a line's own seed is its own; the next line counts on from the form's"
    assert [image.size for image in result.images] == [(64, 64)] * 3 + [(72, 64)]
    assert parse_infotext(result.infotexts[1])["Steps"] == "3"
    assert parse_infotext(result.infotexts[3])["Model"] == "sdxl-1"
    plain = engine.txt2img(GenerationRequest(**{**BASE, "prompt": "a blue square on a white background", "steps": 3,
                                                "seed": 8}))
    assert same(result.images[2], plain.images[0])
    last = engine.txt2img(GenerationRequest(**{**BASE, "seed": 52, "width": 72, "checkpoint": "sdxl-1"}))
    assert same(result.images[3], last.images[0])
    ended = PromptLines("a red circle", position="end").run(engine, base)
    assert ended.prompts == ["on a white background a red circle"]


def test_seeds_are_the_forms_drawn_once_or_each_lines_own(engine):
    base = GenerationRequest(**{**BASE, "seed": -1})
    same_seed = PromptLines("a\nb\nc", same_seed=True).run(engine, base)
    assert len(set(same_seed.seeds)) == 1, "one random seed for all lines"
    own = PromptLines("a\nb\nc").run(engine, base)
    assert len(set(own.seeds)) == 3, "each line its own random seed"


def test_a_bad_line_is_refused_before_any_image(engine, monkeypatch):
    made = []
    monkeypatch.setattr(engine, "txt2img", lambda request: made.append(request))
    base = GenerationRequest(**BASE)
    for text, words in [("a\n--sd_model nothing-here", "line 2: sd_model_checkpoint: no checkpoint named"),
                        ("a\n\n--width 65", "line 3: width: must be a multiple of 8"),
                        ("a\n--sampler_name Nope", "line 2: sampler_name: unknown sampler"), ("\n \n", "is empty")]:
        with pytest.raises(UserError) as e:
            PromptLines(text).run(engine, base)
        assert words in e.value.message, e.value.message
    assert made == []
    engine.options.update({"max_plot_cells": 2})
    with pytest.raises(UserError, match="3 lines; the most is 2"):
        PromptLines("a\nb\nc").run(engine, base)


def test_matrix_prompts_are_a1111s_to_the_character():
    parts, prompts = matrix_prompts("a cat |red, | on a mat|,hat")
    assert parts == ["red,", "on a mat", ",hat"]
    assert prompts == ["a cat ", "a cat , red", "a cat , on a mat", "a cat , red, on a mat", "a cat , hat",
                       "a cat , red, hat", "a cat , on a mat, hat", "a cat , red, on a mat, hat"]
    assert matrix_prompts("x|y", put_at_start=True, delimiter=" ")[1] == ["x", "y x"]
    assert matrix_prompts("no parts") == ([], ["no parts"])


def test_the_matrix_draws_each_combination_and_a_labelled_grid(engine):
    base = GenerationRequest(**{**BASE, "prompt": "a circle|red|large|blurry"})
    result = PromptMatrix(different_seeds=True).run(engine, base)
    assert result.grids == 1 and len(result.images) == 9
    assert result.seeds[1:] == list(range(50, 58)) and result.seeds[0] == 50
    assert result.prompts[1:] == matrix_prompts(base.prompt)[1]
    plain = engine.txt2img(GenerationRequest(**{**BASE, "prompt": "a circle, red, blurry", "seed": 55}))
    assert same(result.images[6], plain.images[0]), "combination 5 (red and blurry) is the plain request's image"
    grid = np.asarray(result.images[0].convert("RGB"))
    # 4 columns (red x large), 2 rows (blurry): the images sit right of the row labels, under the column labels
    assert grid.shape[1] > 4 * 64 and 2 * 64 < grid.shape[0] < 4 * 64
    bottom_right = grid[-64:, -64:]
    assert same(bottom_right, np.asarray(result.images[8].convert("RGB"))), "the last combination at the bottom right"
    grey = np.all(grid[: grid.shape[0] - 2 * 64] == INACTIVE, axis=-1)
    assert grey.any(), "the parts a column has not are drawn grey"
    assert result.infotexts[0] == result.infotexts[1]
    one_seed = PromptMatrix(prompt_type="negative").run(engine, GenerationRequest(**{**BASE, "negative_prompt": "a|b"}))
    assert one_seed.seeds == [50, 50, 50] and one_seed.negative_prompts[1:] == ["a", "a, b"]


def test_bad_matrix_arguments_are_refused(engine):
    base = GenerationRequest(**{**BASE, "prompt": "a|b|c"})
    with pytest.raises(UserError, match="prompt_type must be one of positive, negative"):
        PromptMatrix(prompt_type="both").run(engine, base)
    with pytest.raises(UserError, match="variations_delimiter must be one of comma, space"):
        PromptMatrix(variations_delimiter="tab").run(engine, base)
    engine.options.update({"max_plot_cells": 3})
    with pytest.raises(UserError, match="2 optional parts, 4 combinations; the most is 3"):
        PromptMatrix().run(engine, base)


@pytest.fixture
def client(engine):
    app = FastAPI()
    register_api(app, JobQueue(engine))
    return TestClient(app)


BODY = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 2, "sampler_name": "Euler", "seed": 9}


def test_the_api_runs_the_scripts_by_their_titles(client, engine):
    reply = client.post("/sdapi/v1/txt2img", json={**BODY, "script_name": "prompts from file or textbox",
                                                   "script_args": [True, False, "end",
                                                                   "small\n--steps 3 --prompt big"]})
    assert reply.status_code == 200, reply.text[:300]
    info = json.loads(reply.json()["info"])
    assert info["all_prompts"] == ["a red circle small", "a red circle big"] and info["all_seeds"] == [9, 10]
    old = client.post("/sdapi/v1/txt2img", json={**BODY, "script_name": "Prompts from file or textbox",
                                                 "script_args": [False, False, "tiny"]})
    assert json.loads(old.json()["info"])["all_prompts"] == ["tiny a red circle"]
    assert any("before 1.6" in note for note in json.loads(old.json()["info"])["notices"])
    matrix = client.post("/sdapi/v1/txt2img", json={**BODY, "prompt": "a circle|red", "script_name": "Prompt matrix",
                                                    "script_args": ["False", 1, "positive", "comma", "4"]})
    info = json.loads(matrix.json()["info"])
    assert len(matrix.json()["images"]) == 3 and info["index_of_first_image"] == 1 and info["all_seeds"] == [9, 9, 10]
    bad = client.post("/sdapi/v1/txt2img", json={**BODY, "script_name": "Prompt matrix",
                                                 "script_args": [False, False, "positive", "comma", 0, "extra"]})
    assert bad.status_code == 422 and bad.json()["field"] == "script_args"
    assert "at most 5 values" in bad.json()["detail"]
    line = client.post("/sdapi/v1/txt2img", json={**BODY, "script_name": "Prompts from file or textbox",
                                                  "script_args": [False, False, "start", "ok\n--steps x"]})
    assert line.status_code == 422 and "line 2: --steps 'x': must be a whole number" in line.json()["detail"]
    forecast = client.post("/sdapi/v1/estimate", json={**BODY, "script_name": "Prompts from file or textbox",
                                                       "script_args": [False, False, "start", "a\nb"]})
    assert forecast.status_code == 200 and forecast.json()["summary"].startswith("2 lines")
