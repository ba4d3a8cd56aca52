"""Validate an InferencePool against the CRD's own schema: OpenAPI types/bounds/enums, then the CEL rules.

The API server does this before the operator ever sees a pool; the operator repeats it (a pool can predate a CRD
upgrade, and test clusters may not validate) so a bad spec becomes a clear condition instead of a crash.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import jsonschema

from .crd import Schema, open_api_schema, with_defaults


def _openapi_to_jsonschema(schema: Any) -> Any:
    """Kubernetes' OpenAPI v3 dialect as draft-4 JSON Schema (int-or-string becomes a type union)."""
    if isinstance(schema, list):
        return [_openapi_to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _openapi_to_jsonschema(v) for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if schema.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["type"] = ["integer", "string"]
    if "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        # structural schemas prune unknown fields; reject them here instead, so a typo is reported
        out.setdefault("additionalProperties", False)
    return out


@cache
def _program(rule: str) -> Any:
    import celpy

    env = celpy.Environment()
    return env.program(env.compile(rule))


def _cel_errors(schema: Schema, value: Any, path: str) -> list[str]:
    import celpy

    errors: list[str] = []
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                errors += _cel_errors(sub, value[name], f"{path}.{name}")
        for rule in schema.get("x-kubernetes-validations", []):
            result = _program(rule["rule"]).evaluate({"self": celpy.json_to_cel(value)})
            if isinstance(result, Exception) or not bool(result):
                errors.append(f"{path.lstrip('.') or '(root)'}: {rule.get('message', rule['rule'])}")
    elif isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += _cel_errors(schema["items"], item, f"{path}[{i}]")
    return errors


def validation_errors(pool: dict[str, Any], schema: Schema | None = None) -> list[str]:
    """Every problem with the pool, each naming its field; [] when valid. `schema`: the CRD's openAPIV3Schema."""
    schema = schema if schema is not None else open_api_schema()
    pool = with_defaults(schema, pool)
    validator = jsonschema.Draft4Validator(_openapi_to_jsonschema(schema))
    errors = [
        f"{'.'.join(str(p) for p in err.absolute_path) or '(root)'}: {err.message}"
        for err in sorted(validator.iter_errors(pool), key=lambda e: list(map(str, e.absolute_path)))
    ]
    if errors:  # CEL runs on well-typed objects only, as in the API server
        return errors
    return _cel_errors(schema, pool, "")
