"""LoRA, as a built-in extension: the ``<lora:name:weight>`` prompt network and A1111's LoRA routes.

The work is in ``webui.engine.lora.network`` (adapters the memory manager places, exact removal); this file
only registers it through the public extension API.
"""
from __future__ import annotations

from webui.engine.loading.demo import LORA_DIR
from webui.engine.lora.network import LoraLibrary, LoraNetwork, compile_kernels


def setup(api) -> None:
    engine = api.engine
    library = LoraLibrary(engine.config.paths.lora_dir, engine.models.hashes.sha256, builtin=LORA_DIR)
    api.add_network("lora", LoraNetwork(library, engine.memory))
    api.on("model_loaded", lambda model, **_: compile_kernels(model, engine.memory.device))
    api.add_api_route("/sdapi/v1/loras", library.describe, methods=("GET",))
    api.add_api_route("/sdapi/v1/refresh-loras", library.refresh, methods=("POST",))
