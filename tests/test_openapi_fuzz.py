"""A bounded, schemathesis-style fuzz of the app's own /openapi.json: no request gets a 5xx.

For every operation the schema documents (path, method, parameters, request body per content
type), cases are generated from the schemas themselves, seeded so that a failure replays: mostly
valid values (types, enums, bounds), the rest broken on purpose (wrong types, out of range, missing
required fields, odd strings, null, absent or wrong API key). 200 requests in all, against the
session's shared app. Every answer must be below 500; an error answer must be the API's error
shape naming what was wrong; a 2xx JSON answer must match its documented response schema.

Cost fields of a *valid* create (size, seconds, fps, steps) are drawn small, so an accepted job is
a tiny render, and every video the fuzz creates is deleted (cancelled) at once; out-of-range values
of those fields are generated as for any other field.
"""
from __future__ import annotations

import json
import random
import string
import urllib.parse

import httpx
import jsonschema

from serve_support import KEY

CASES = 200
SEED = 19
SMALL = {"size": ["32x32", "64x32", "32x64"], "seconds": ["0.5", "1", 0.5], "fps": [8], "steps": [1, 2],
         "n": [1]}
ODD_STRINGS = ["", " ", "\x00", "é" * 3, "😀", "../../etc/passwd", "%00", "' OR 1=1 --", "a" * 5000,
               "null", "-1", "1e309", "NaN", "{}", "[]", "video_" + "0" * 32]
BAD_VALUES = [None, True, -1, 0, 10**18, -1e308, 1.5, "", "x" * 3000, [], {}, [None], {"a": {"b": []}}]


class Schemas:
    """JSON Schema helpers over one OpenAPI document: `$ref`s into components, and the `$defs` of
    an inlined pydantic schema (the create body's)."""

    def __init__(self, document: dict):
        self.document = document

    def resolve(self, schema: dict, root: dict | None) -> tuple[dict, dict | None]:
        while isinstance(schema, dict) and "$ref" in schema:
            ref = schema["$ref"]
            if ref.startswith("#/$defs/") and root is not None:
                schema = root["$defs"][ref.rsplit("/", 1)[-1]]
            else:
                node = self.document
                for part in ref.lstrip("#/").split("/"):
                    node = node[part]
                schema = node
        return schema, root

    def value(self, rng: random.Random, schema: dict, root: dict | None, name: str = "", depth: int = 0,
              bad: float = 0.15):
        """A value for `schema`: valid, or (with probability `bad`) deliberately not."""
        schema, root = self.resolve(schema or {}, root)
        if rng.random() < bad or depth > 4:
            return rng.choice(BAD_VALUES + ODD_STRINGS)
        if name in SMALL and rng.random() < 0.85:
            return rng.choice(SMALL[name])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = [s for s in schema[key] if self.resolve(s, root)[0].get("type") != "null"] or schema[key]
                return self.value(rng, rng.choice(options), root, name, depth + 1, bad)
        if "allOf" in schema:
            return self.value(rng, schema["allOf"][0], root, name, depth + 1, bad)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return rng.choice(schema["enum"])
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = rng.choice([k for k in kind if k != "null"] or kind)
        if kind == "object" or "properties" in schema:
            properties = schema.get("properties", {})
            required = set(schema.get("required", []))
            out = {}
            for key, sub in properties.items():
                if key in required and rng.random() > 0.05 or rng.random() < 0.3:
                    out[key] = self.value(rng, sub, root, key, depth + 1, bad)
            return out
        if kind == "array":
            items = schema.get("items", {})
            count = rng.randint(schema.get("minItems", 0), min(schema.get("maxItems", 3), 3))
            return [self.value(rng, items, root, name, depth + 1, bad) for _ in range(count)]
        if kind == "integer":
            low, high = schema.get("minimum", -5), schema.get("maximum", 200)
            return rng.randint(int(low), int(high))
        if kind == "number":
            low, high = schema.get("minimum", -5.0), schema.get("maximum", 100.0)
            return round(rng.uniform(low, high), 3)
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "string":
            if rng.random() < 0.3:
                return rng.choice(ODD_STRINGS)
            length = rng.randint(max(1, schema.get("minLength", 1)), min(schema.get("maxLength", 40), 40))
            return "".join(rng.choice(string.ascii_letters + string.digits + " -_") for _ in range(length))
        return rng.choice([1, "x", None, {"k": "v"}, [1, 2]])


def operations(document: dict) -> list[tuple[str, str, dict]]:
    return [(path, method.upper(), operation) for path, methods in sorted(document["paths"].items())
            for method, operation in sorted(methods.items())]


def build_case(rng: random.Random, schemas: Schemas, path: str, method: str, operation: dict) -> dict:
    """One request: url, params, headers and a JSON, form or raw body."""
    url, params = path, {}
    for parameter in operation.get("parameters", []):
        value = schemas.value(rng, parameter.get("schema", {}), None, parameter["name"], bad=0.25)
        if parameter["in"] == "path":
            text = value if isinstance(value, str) and value else rng.choice(ODD_STRINGS[3:] + ["video_x"])
            url = url.replace("{" + parameter["name"] + "}", urllib.parse.quote(str(text), safe=""))
        elif parameter["in"] == "query" and (parameter.get("required") or rng.random() < 0.6):
            params[parameter["name"]] = value if isinstance(value, (str, int, float)) else json.dumps(value)
    headers = {"Authorization": f"Bearer {KEY}"} if rng.random() < 0.9 else rng.choice(
        [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic x"}])
    if rng.random() < 0.15:
        headers["Idempotency-Key"] = rng.choice([s for s in ODD_STRINGS if s.isprintable() and s.isascii()
                                               and s == s.strip() and s] + ["fuzz-key"])
    case = {"method": method, "url": url, "params": params, "headers": headers}
    content = operation.get("requestBody", {}).get("content", {})
    if method == "POST" and not content:          # a body the schema does not describe (images): JSON
        content = {"application/json": {"schema": {"type": "object", "properties": {
            "prompt": {"type": "string"}, "size": {"type": "string"}, "n": {"type": "integer"},
            "response_format": {"enum": ["b64_json", "url"]}, "output_format": {"enum": ["png", "jpeg"]},
            "model": {"type": "string"}, "seed": {"type": "integer"}, "steps": {"type": "integer"}},
            "required": ["prompt"]}}}
    if content:
        media_type = rng.choice(sorted(content))
        schema = content[media_type].get("schema", {})
        body = schemas.value(rng, schema, schema if "$defs" in schema else None)
        if media_type == "application/json":
            if rng.random() < 0.05:
                case["content"], headers["Content-Type"] = rng.choice([b"{", b"\xff\xfe", b"[1,2]", b""]), media_type
            else:
                case["json"] = body
        else:                                     # multipart: every field a form part, some as files
            parts = {}
            for key, value in (body.items() if isinstance(body, dict) else [("prompt", body)]):
                text = value if isinstance(value, str) else json.dumps(value)
                parts[key] = ("blob.bin", rng.randbytes(rng.randint(0, 64)), "application/octet-stream") \
                    if key in ("file", "input_reference", "input_video", "input_audio") else (None, text)
            case["files"] = parts or {"prompt": (None, "")}
    return case


def response_schema(operation: dict, status: int) -> dict | None:
    content = operation.get("responses", {}).get(str(status), {}).get("content", {})
    return content.get("application/json", {}).get("schema")


def test_a_bounded_fuzz_of_the_openapi_schema_finds_no_5xx(served):
    with served.http() as http:
        document = http.get("/openapi.json").json()
    schemas = Schemas(document)
    ops = operations(document)
    assert len(ops) >= 14
    rng = random.Random(SEED)
    failures, statuses, created = [], {}, []
    with httpx.Client(base_url=served.url, timeout=120) as http:
        for i in range(CASES):
            path, method, operation = ops[i % len(ops)]
            case = build_case(rng, schemas, path, method, operation)
            request = {k: v for k, v in case.items() if k not in ("method", "url")}
            try:
                response = http.request(case["method"], case["url"], **request)
            except httpx.HTTPError as exc:
                failures.append((i, case["method"], case["url"], f"{type(exc).__name__}: {exc}"))
                continue
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                failures.append((i, case["method"], case["url"], response.status_code, response.text[:300]))
            elif response.status_code >= 400:
                error = response.json().get("error") if "json" in response.headers.get("content-type", "") else None
                if not (isinstance(error, dict) and error.get("message")):
                    failures.append((i, case["method"], case["url"], response.status_code,
                                     "not the API's error shape", response.text[:300]))
            elif "json" in response.headers.get("content-type", ""):
                schema = response_schema(operation, response.status_code)
                if schema is not None:
                    try:
                        jsonschema.validate(response.json(), {**schema, "components": document["components"]})
                    except jsonschema.ValidationError as exc:
                        failures.append((i, case["method"], case["url"], "response off its schema", exc.message))
                if path == "/v1/videos" and method == "POST":
                    created.append(response.json()["id"])
            if created:                           # cancel what the fuzz made at once: tiny, but not free
                http.delete(f"/v1/videos/{created.pop()}", headers={"Authorization": f"Bearer {KEY}"})
    print(f"{CASES} requests over {len(ops)} operations: statuses {dict(sorted(statuses.items()))}")
    assert not failures, failures[:10]
    assert sum(n for s, n in statuses.items() if 200 <= s < 300) >= 20       # the fuzz got past validation too
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) >= 40
