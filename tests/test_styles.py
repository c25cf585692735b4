"""Prompt styles (issue 28): A1111's styles.csv read as A1111 reads it, applied to a request's prompts by name in
the engine (the picture is the one of the styled prompt, whose text the infotext keeps), listed and honoured by the
API, saved back; a row without a name is skipped and the log names its line."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from webui.api import register_api
from webui.engine.infotext import parse_infotext
from webui.engine.request import GenerationRequest
from webui.engine.styles import PromptStyle, PromptStyles, merge_prompts
from webui.errors import UserError
from webui.jobs import JobQueue

CSV = '''name,prompt,negative_prompt
Dusk,"{prompt}, at dusk, (warm light:1.2)",blurry
Framed,"oil painting, framed","lowres, watermark"
,"a row without a name",
'''
REQUEST = dict(width=64, height=64, steps=3, cfg_scale=5.0, sampler_name="Euler a", seed=7, batch_size=1,
               save_images=False)


def images(result) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=int) for image in result.images])


@pytest.fixture
def styled(engine):
    engine.config.paths.styles_file.write_text(CSV)
    return engine


def test_a_style_takes_the_prompt_at_its_placeholder_or_after_a_comma():
    assert merge_prompts("{prompt}, at dusk", "a cat") == "a cat, at dusk"
    assert merge_prompts("oil painting", "a cat ") == "a cat, oil painting"
    assert merge_prompts("oil painting", "") == "oil painting" and merge_prompts("", "a cat") == "a cat"


def test_the_file_is_read_as_a1111_writes_it(tmp_path, caplog):
    path = tmp_path / "styles.csv"
    styles = PromptStyles(path)
    assert styles.all() == {}, "no file: no styles"
    path.write_text(CSV)
    with caplog.at_level(logging.WARNING):
        assert list(styles.all()) == ["Dusk", "Framed"]
    assert "styles.csv line 4 has no style name" in caplog.text
    assert styles.all()["Dusk"] == PromptStyle("Dusk", "{prompt}, at dusk, (warm light:1.2)", "blurry")
    assert styles.apply("a cat", "ugly", ["Dusk", "Framed", "Nope"]) == (
        "a cat, at dusk, (warm light:1.2), oil painting, framed", "ugly, blurry, lowres, watermark", ["Nope"])
    path.write_text("name,text\nOld,an old style's prompt\n")  # A1111's oldest column name; read again when changed
    assert styles.all() == {"Old": PromptStyle("Old", "an old style's prompt", "")}
    path.write_text('name,prompt\nFine,ok\nHuge,"' + "x" * 200_000 + '"\n')
    with caplog.at_level(logging.WARNING):
        assert styles.all() == {"Fine": PromptStyle("Fine", "ok", "")}, "the styles before a line that cannot be read"
    assert "styles.csv cannot be read at line 3" in caplog.text


def test_saving_a_style_adds_or_replaces_it(tmp_path):
    styles = PromptStyles(tmp_path / "styles.csv")
    styles.save(PromptStyle("Mine", 'a "quoted", prompt', "bad"))
    styles.save(PromptStyle("Other", "x"))
    styles.save(PromptStyle("Mine", "{prompt}, new"))
    assert PromptStyles(tmp_path / "styles.csv").all() == {"Mine": PromptStyle("Mine", "{prompt}, new", ""),
                                                           "Other": PromptStyle("Other", "x", "")}
    saved = (tmp_path / "styles.csv").read_bytes()
    with pytest.raises(UserError, match="type a name"):
        styles.save(PromptStyle("  ", "x"))
    (tmp_path / "blocked").write_text("a file where the folder would be")
    with pytest.raises(UserError, match="cannot write .*the styles there are as they were"):
        PromptStyles(tmp_path / "blocked" / "styles.csv").save(PromptStyle("A", "x"))
    assert (tmp_path / "styles.csv").read_bytes() == saved, "nothing lost"


def test_a_request_with_styles_draws_the_styled_prompt(styled):
    result = styled.txt2img(GenerationRequest(prompt="a red circle", negative_prompt="ugly",
                                              styles=["Dusk", "Framed", "Missing"], **REQUEST))
    prompt, negative = "a red circle, at dusk, (warm light:1.2), oil painting, framed", "ugly, blurry, lowres, watermark"
    plain = styled.txt2img(GenerationRequest(prompt=prompt, negative_prompt=negative, **REQUEST))
    assert np.array_equal(images(result), images(plain))
    fields = parse_infotext(result.infotexts[0])
    assert fields["Prompt"] == prompt and fields["Negative prompt"] == negative
    assert any("'Missing'" in notice for notice in result.notices)


def test_the_api_lists_the_styles_and_applies_them(styled):
    client = TestClient(FastAPI())
    register_api(client.app, JobQueue(styled))
    assert client.get("/sdapi/v1/prompt-styles").json() == [
        {"name": "Dusk", "prompt": "{prompt}, at dusk, (warm light:1.2)", "negative_prompt": "blurry"},
        {"name": "Framed", "prompt": "oil painting, framed", "negative_prompt": "lowres, watermark"}]
    body = {"prompt": "a red circle", "width": 64, "height": 64, "steps": 3, "seed": 7, "sampler_name": "Euler a"}
    reply = client.post("/sdapi/v1/txt2img", json={**body, "styles": ["Framed"]}).json()
    same = client.post("/sdapi/v1/txt2img", json={**body, "prompt": "a red circle, oil painting, framed",
                                                  "negative_prompt": "lowres, watermark"}).json()
    assert reply["images"] == same["images"] and json.loads(reply["info"])["ignored_fields"] == []
