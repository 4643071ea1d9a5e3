"""Canonical JSON: the one byte encoding that keys, digests and persisted records are computed over.

Its own module because both config.py (request keys) and storage.py (artifact sidecars) need it, and
storage.py must not import config.py (config.py validates references against storage's allow-list).
"""
from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    """UTF-8 JSON with sorted keys and no whitespace: equal values give equal bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")
