"""All I/O through fsspec URIs: plain paths and file:// by default, s3:// and gs:// in production.

Writes are atomic: local files go to a temporary name in the same folder and are renamed; object
stores commit a PUT whole, so a reader never sees half an object.
"""
from __future__ import annotations

import os
import uuid

import fsspec


def filesystem(uri: str):
    """(fs, path) for a URI or a plain local path."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if is_local(fs):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def join(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *(p.strip("/") for p in parts)])
