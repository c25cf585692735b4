"""Few-step presets (issue 28): the files their makers publish are known by name or metadata, the UI sets the fields
for them, and a request that samples far from its model's preset is told what the model wants."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from tests.conftest import make_engine
from tests.test_lora import _lora_components, lora_folder, with_extensions
from webui.engine.fast_presets import FastPreset, fast_preset
from webui.engine.formats.detect import Family
from webui.engine.request import GenerationRequest
from webui.synthetic.lora_export import random_lora, write_lora


@pytest.mark.parametrize("name,expected", [
    ("lcm-lora-sdxl", FastPreset("LCM", 6, 1.5, "LCM", "SGM Uniform")),
    ("pytorch_lora_weights LCM_LoRA_Weights_SD15", FastPreset("LCM", 6, 1.5, "LCM", "SGM Uniform")),
    ("TCD-SDXL-LoRA", FastPreset("TCD", 6, 1.0, "TCD", "SGM Uniform")),
    ("dmd2_sdxl_4step_lora_fp16", FastPreset("DMD2", 4, 1.0, "LCM", "SGM Uniform")),
    ("sdxl_lightning_2step_lora", FastPreset("Lightning", 2, 1.0, "Euler", "SGM Uniform")),
    ("sdxl_lightning_8step_unet", FastPreset("Lightning", 8, 1.0, "Euler", "SGM Uniform")),
    ("juggernautXL_v9Rdphoto2Lightning", FastPreset("Lightning", 4, 1.0, "Euler", "SGM Uniform")),
    ("Hyper-SDXL-8steps-CFG-lora", FastPreset("Hyper-SD", 8, 5.0, "Euler", "SGM Uniform")),
    ("Hyper-SD15-1step-lora", FastPreset("Hyper-SD", 1, 1.0, "Euler", "SGM Uniform")),
    ("sd_xl_turbo_1.0_fp16", FastPreset("Turbo", 6, 2.0, "DPM++ SDE", "Karras")),
    ("dreamshaperXL_v21TurboDPMSDE", FastPreset("Turbo", 6, 2.0, "DPM++ SDE", "Karras")),
    ("flux1-schnell-Q8_0", FastPreset("Flux schnell", 4, 1.0, "Euler", "Simple")),
    ("v1-5-pruned-emaonly", None), ("realcalm_v2", None), ("sd3.5_large_200steps", None),
])
def test_the_makers_names_are_known(name, expected):
    assert fast_preset(name) == expected


def test_far_from_the_preset():
    lcm = fast_preset("lcm-lora")
    assert lcm.far_from(20, 7.0) and lcm.far_from(6, 7.0) and lcm.far_from(20, 1.5)
    assert not lcm.far_from(8, 2.0) and not fast_preset("hyper-sd-cfg").far_from(8, 6.0)


@pytest.fixture
def engine(tmp_path, sd1_file):
    return with_extensions(make_engine(tmp_path, sd1_file))


REQUEST = dict(prompt="a red circle", width=64, height=64, steps=20, cfg_scale=7.0, seed=1, save_images=False)


def test_a_lora_known_by_its_metadata_gets_a_notice_where_the_request_samples_far_from_it(engine):
    engine.txt2img(GenerationRequest(**{**REQUEST, "steps": 1}))
    path = lora_folder(engine) / "my-fast-one.safetensors"
    write_lora(path, random_lora(dict(_lora_components(engine.models.current)), Family.SD1, rank=2, seed=3),
               Family.SD1, "kohya")
    save_file(load_file(path), path, metadata={"ss_output_name": "lcm-lora-sdv1-5"})
    assert engine.network_preset("lora", "my-fast-one") == fast_preset("lcm")
    assert engine.network_preset("lora", "nothing-here") is None and engine.network_preset("hypernet", "x") is None
    slow = engine.txt2img(GenerationRequest(**{**REQUEST, "prompt": "a red circle <lora:my-fast-one:1>"}))
    assert any(notice.startswith("The lora my-fast-one is a LCM model: it draws best with LCM, SGM Uniform, 6 steps, "
                                 "CFG 1.5 (this request: DPM++ 2M, 20 steps, CFG 7).") for notice in slow.notices)
    fast = engine.txt2img(GenerationRequest(**{**REQUEST, "prompt": "a red circle <lora:my-fast-one:1>",
                                               **fast_preset("lcm").fields()}))
    assert not any("LCM model" in notice for notice in fast.notices)


def test_a_few_step_checkpoint_sets_the_forms_fields(tmp_path, sd1_file):
    pytest.importorskip("gradio")
    from webui.ui.txt2img import fields_for_family

    lightning = tmp_path / "sdxl_lightning_4step.safetensors"
    lightning.symlink_to(sd1_file)
    engine = make_engine(tmp_path / "data", lightning, sd1_file)
    *_, steps, cfg, sampler, schedule = fields_for_family(engine, lightning.name)
    assert (steps["value"], cfg["value"], sampler["value"], schedule["value"]) == (4, 1.0, "Euler", "SGM Uniform")
    assert engine.checkpoint_preset(sd1_file.name) is None
    notices = engine.txt2img(GenerationRequest(**REQUEST, checkpoint=lightning.name)).notices
    assert any(n.startswith("The checkpoint sdxl_lightning_4step is a Lightning model") for n in notices)
