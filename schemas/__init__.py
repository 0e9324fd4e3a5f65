"""schemas: the versioned Arrow schemas of everything psp-pipeline writes, with readers.

`output_schema(n_styles)` / `rows_to_table` build output schema v3; `read_outputs` and `read_latents`
read the output Delta table back (local paths or fsspec URIs, current version or `as_of`).
`image_id_for` and the run-id helpers are the keys every module uses. Names resolve lazily so that
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
    "is_transient": "schemas.status",
    "output_schema": "schemas.outputs",
    "rows_to_table": "schemas.outputs",
    "columns_to_table": "schemas.outputs",
    "w_plus_to_numpy": "schemas.outputs",
    "schema_to_json": "schemas.outputs",
    "schema_version": "schemas.outputs",
    "tensor_shapes": "schemas.outputs",
    "edits_schema": "schemas.edits",
    "read_edits": "schemas.edits",
    "edits_w_plus_to_numpy": "schemas.edits",
    "image_id_for": "schemas.ids",
    "make_run_id": "schemas.ids",
    "check_run_id": "schemas.ids",
    "read_outputs": "schemas.table",
    "read_latents": "schemas.table",
    "read_runs": "schemas.table",
    "open_table": "schemas.table",
    "open_dataset": "schemas.table",
    "arrow_filesystem": "schemas.table",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'schemas' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
