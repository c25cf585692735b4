"""Dynamic prompts and wildcards (issue 28) through dynamicprompts: each image its own prompt, drawn from its seed by
the library itself (the reference), the same image as a plain request with that prompt and seed, combinatorial
mode, the templates in the infotext, the setting, and bad wildcards."""
from __future__ import annotations

import numpy as np
import pytest
from dynamicprompts.generators import RandomPromptGenerator
from dynamicprompts.wildcards import WildcardManager

from tests.conftest import make_engine
from webui.engine.infotext import parse_infotext
from webui.engine.request import GenerationRequest
from webui.errors import UserError

REQUEST = dict(prompt="a {red|blue|green} __shape__", negative_prompt="blurry", width=64, height=64, steps=2,
               cfg_scale=5.0, seed=40, sampler_name="Euler", batch_size=2, n_iter=2, save_images=False)


@pytest.fixture
def engine(tmp_path, sd1_file):
    engine = make_engine(tmp_path, sd1_file)
    folder = engine.config.paths.wildcards_dir
    (folder / "sub").mkdir(parents=True)
    (folder / "shape.txt").write_text("circle\nsquare\n# a comment\ntriangle\n")
    (folder / "sub" / "loop.txt").write_text("a __sub/loop__\n")
    return engine


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=int)


def test_each_image_has_its_own_prompt_from_its_seed(engine):
    """The prompts are dynamicprompts' own for the images' seeds; each image is the plain request with its prompt and
    seed; the infotext has the resolved prompt and the template; the same seed makes the same prompts again."""
    result = engine.txt2img(GenerationRequest(**REQUEST))
    seeds = list(range(40, 44))
    expected = RandomPromptGenerator(WildcardManager(engine.config.paths.wildcards_dir)).generate(
        REQUEST["prompt"], 4, seeds=seeds)
    assert result.seeds == seeds and result.prompts == expected and len(set(expected)) > 1
    assert all("{" not in p and "__" not in p for p in result.prompts)
    params = parse_infotext(result.infotexts[1])
    assert params["Prompt"] == expected[1] and params["Template"] == REQUEST["prompt"] and params["Seed"] == "41"
    assert "Negative Template" not in params
    plain = engine.txt2img(GenerationRequest(**{**REQUEST, "prompt": expected[2], "seed": 42, "batch_size": 1,
                                                "n_iter": 1}))
    assert np.array_equal(pixels(result.images[2]), pixels(plain.images[0]))
    again = engine.txt2img(GenerationRequest(**REQUEST))
    assert again.prompts == expected


def test_combinatorial_makes_every_combination_once(engine):
    engine.options.update({"dp_combinatorial": True})
    result = engine.txt2img(GenerationRequest(**{**REQUEST, "prompt": "a {red|blue} __shape__",
                                                 "negative_prompt": "{dark|}"}))
    assert result.prompts == [f"a {c} {s}" for c in ("red", "blue") for s in ("circle", "square", "triangle")]
    assert len(result.images) == 6 and result.seeds == list(range(40, 46))
    assert "6 combinations, one image each" in result.notices[-1]
    assert parse_infotext(result.infotexts[0])["Negative Template"] == "{dark|}"


def test_the_setting_off_leaves_the_prompt_as_written(engine):
    engine.options.update({"dp_enabled": False})
    result = engine.txt2img(GenerationRequest(**{**REQUEST, "n_iter": 1}))
    assert result.prompts == [REQUEST["prompt"]] * 2 and "Template" not in result.infotexts[0]


@pytest.mark.parametrize("prompt,message", [
    ("a __nothing__", "no wildcard file nothing.txt"),
    ("a __sub/loop__", "refers back to itself"),
])
def test_a_missing_or_looping_wildcard_is_named(engine, prompt, message):
    with pytest.raises(UserError, match=message) as raised:
        engine.txt2img(GenerationRequest(**{**REQUEST, "prompt": prompt}))
    assert raised.value.field == "prompt"
    assert engine.txt2img(GenerationRequest(**{**REQUEST, "n_iter": 1})).images, "the app goes on"


def test_an_api_client_gets_every_image_and_its_prompt(engine):
    """webuiapi-style body: the answer's info lists each image's prompt and the template in its infotexts."""
    import json

    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from webui.api import register_api
    from webui.jobs import JobQueue

    app = FastAPI()
    register_api(app, JobQueue(engine))
    body = {"prompt": "a {red|blue} circle", "steps": 2, "width": 64, "height": 64, "batch_size": 3, "seed": 7,
            "sampler_name": "Euler", "cfg_scale": 5}
    reply = TestClient(app).post("/sdapi/v1/txt2img", json=body)
    info = json.loads(reply.json()["info"])
    assert len(reply.json()["images"]) == 3 and info["all_seeds"] == [7, 8, 9]
    assert set(info["all_prompts"]) <= {"a red circle", "a blue circle"}
    assert all("Template: a {red|blue} circle" in text for text in info["infotexts"])
