"""schemas: the versioned Arrow schemas of everything psp-pipeline writes, with readers.

`output_schema(n_styles)` / `rows_to_table` build output schema v1; `read_outputs` and `read_latents`
read it back (local paths or fsspec URIs, latest row per image_id). Names resolve lazily so that
`import schemas` stays cheap. `python -m schemas export` regenerates the committed JSON exports.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "SCHEMA_VERSION": "schemas.outputs",
    "COLUMNS": "schemas.outputs",
    "STATUSES": "schemas.status",
    "FINAL_STATUSES": "schemas.status",
    "is_final": "schemas.status",
    "output_schema": "schemas.outputs",
    "rows_to_table": "schemas.outputs",
    "columns_to_table": "schemas.outputs",
    "image_id_for": "schemas.outputs",
    "read_outputs": "schemas.outputs",
    "read_latents": "schemas.outputs",
    "w_plus_to_numpy": "schemas.outputs",
    "list_output_files": "schemas.outputs",
    "schema_to_json": "schemas.outputs",
    "schema_version": "schemas.outputs",
    "tensor_shapes": "schemas.outputs",
    "edits_schema": "schemas.edits",
    "read_edits": "schemas.edits",
    "edits_w_plus_to_numpy": "schemas.edits",
}
# schemas/manifest.py (nightly manifest) adds its names here, e.g. "manifest_schema": "schemas.manifest".

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'schemas' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
