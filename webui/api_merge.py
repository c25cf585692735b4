"""``POST /sdapi/v1/merge-checkpoints``: the checkpoint merger's body, with the names of A1111's merger form
(``primary_model_name`` … ``bake_in_vae``, ``discard_weights``), and this app's additions (``precision``,
``gguf_type``, ``loras``, ``overwrite``). A1111 has no such route (its merger is a UI tab); a script that drives the
tab's function by its argument names finds them here."""
from __future__ import annotations

from typing import Any

from webui.engine.merge.merger import FORMATS, GGUF_TYPES, METHODS, PRECISIONS, MergeRequest, lora_entry
from webui.errors import UserError

# A1111's form field -> the request's field
FIELDS = {"primary_model_name": "primary", "secondary_model_name": "secondary", "tertiary_model_name": "tertiary",
          "interp_method": "method", "multiplier": "multiplier", "custom_name": "custom_name",
          "checkpoint_format": "file_format", "bake_in_vae": "bake_in_vae", "discard_weights": "discard_weights",
          "precision": "precision", "gguf_type": "gguf_type", "overwrite": "overwrite"}
API_NAMES = {ours: theirs for theirs, ours in FIELDS.items()} | {"loras": "loras"}
# A1111's form fields that change nothing here: the result's config is inferred from its tensors (no .yaml), and its
# metadata is always the primary's ModelSpec with the merge recipe. Named in ignored_fields.
IGNORED = ("config_source", "save_metadata", "add_merge_recipe", "copy_metadata_fields", "metadata_json")

MERGE_BODY_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["primary_model_name"], "additionalProperties": True,
    "properties": {
        "primary_model_name": {"type": "string", "description": "checkpoint A"},
        "secondary_model_name": {"type": ["string", "null"], "description": "checkpoint B"},
        "tertiary_model_name": {"type": ["string", "null"], "description": "checkpoint C (Add difference)"},
        "interp_method": {"enum": list(METHODS), "default": "Weighted sum"},
        "multiplier": {"type": "number", "minimum": -1, "maximum": 2, "default": 0.3},
        "save_as_half": {"type": "boolean", "default": False, "description": "fp16 (else fp32; precision wins)"},
        "precision": {"enum": list(PRECISIONS), "description": "of the float tensors"},
        "checkpoint_format": {"enum": list(FORMATS), "default": "safetensors"},
        "gguf_type": {"enum": list(GGUF_TYPES), "default": "Q8_0"},
        "custom_name": {"type": "string", "default": ""},
        "bake_in_vae": {"type": ["string", "null"], "description": "a file of models/VAE, or None"},
        "loras": {"type": "array", "items": {"type": "string"}, "description": 'LoRAs baked in: "name:weight"'},
        "discard_weights": {"type": "string", "description": "a regular expression: matching tensors are left out"},
        "overwrite": {"type": "boolean", "default": False},
    },
}


def read_merge(body: Any) -> tuple[MergeRequest, list[str]]:
    """The merge a body asks for (types checked here, the rest by ``MergeRequest.checked``), and the fields ignored."""
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object", field="body")
    if not isinstance(body.get("primary_model_name"), str) or not body["primary_model_name"]:
        raise UserError("name the checkpoint to merge (A)", field="primary_model_name")
    fields: dict[str, Any] = {}
    for theirs, ours in FIELDS.items():
        value = body.get(theirs)
        if value is None or value == "":
            continue
        expected, words = {"multiplier": ((int, float), "a number"), "overwrite": (bool, "true or false")}.get(
            ours, (str, "text"))
        if not isinstance(value, expected) or (ours == "multiplier" and isinstance(value, bool)):
            raise UserError(f"must be {words}, got {value!r}", field=theirs)
        fields[ours] = value
    if fields.get("bake_in_vae") == "None":
        del fields["bake_in_vae"]
    if "precision" not in fields and body.get("save_as_half") is not None:
        if not isinstance(body["save_as_half"], bool):
            raise UserError(f"must be true or false, got {body['save_as_half']!r}", field="save_as_half")
        fields["precision"] = "fp16" if body["save_as_half"] else "fp32"
    fields["loras"] = tuple(lora_entry(entry) for entry in body.get("loras") or [])
    ignored = [key for key in IGNORED if key in body]
    return MergeRequest(**fields), ignored


def api_field(field: str | None) -> str | None:
    """A refusal's field under the name the body gave it."""
    return API_NAMES.get(field, field) if field else field
