"""All I/O through fsspec URIs: plain paths and file:// by default, s3:// and gs:// in production.

Writes are atomic: local files go to a temporary name in the same folder and are renamed; object
stores commit a PUT whole, so a reader never sees half an object.

Uploads (the Serve app's input_reference, input_video, input_audio, elements) are content-addressed:
`<storage_uri>/uploads/<sha256 of the bytes>`, written once (write_once: only if absent), so the same
bytes are one object however many jobs name them; names_upload tells such a name from any other URI.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import posixpath
import re
import uuid
from urllib.parse import urlsplit

import fsspec

from .canonical import canonical_json


def filesystem(uri: str):
    """(fs, path) for a URI or a plain local path."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def is_local(fs) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    if not is_local(fs):
        fs.pipe_file(path, data)              # one PUT
        return
    with open_write(uri) as f:
        f.write(data)


@contextlib.contextmanager
def open_write(uri: str):
    """A binary file to write `uri` in pieces, committed whole when the block ends and dropped if it
    raises: a local temporary name in the same folder, renamed; an object store's upload, completed
    or discarded."""
    fs, path = filesystem(uri)
    if is_local(fs):
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    else:
        f = fs.open(path, "wb")
        try:
            yield f
        except BaseException:
            f.discard()
            raise
        f.close()


def write_once(uri: str, data: bytes) -> bool:
    """Writes `data` unless the object exists: for content-addressed names, where the same name
    means the same bytes (two writers racing write equal bytes). True if this call wrote it."""
    if exists(uri):
        return False
    write_bytes(uri, data)
    return True


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def modified(uri: str) -> float:
    """When the object was last written, in unix seconds."""
    fs, path = filesystem(uri)
    return fs.modified(path).timestamp()


def join(prefix: str, *parts: str) -> str:
    return "/".join([prefix.rstrip("/"), *(p.strip("/") for p in parts)])


def delete(uri: str) -> None:
    """Remove an object or file; a missing one is fine."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def list_prefix(uri: str) -> list[str]:
    """Full URIs of the objects directly under a prefix (empty when it does not exist)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    protocol = uri.split("://", 1)[0] + "://" if "://" in uri else ""
    return sorted(protocol + p if protocol and not p.startswith(protocol) else p
                  for p in fs.ls(path, detail=False))


# ---- uploads, stored once (content-addressed) ------------------------------------------------

UPLOADS = "uploads"
_UPLOAD_NAME = re.compile(r"^[0-9a-f]{64}$")


def uploads_prefix(storage_uri: str) -> str:
    """Where an app's uploads live: `<storage_uri>/uploads`."""
    return join(storage_uri, UPLOADS)


def upload_uri(storage_uri: str, data: bytes) -> str:
    """The one name of these bytes in the upload store: `<storage_uri>/uploads/<sha256 hex>`."""
    return join(uploads_prefix(storage_uri), hashlib.sha256(data).hexdigest())


def names_upload(uri: str, prefix: str | None = None) -> bool:
    """Whether `uri` names a stored upload: any `.../uploads/<sha256 hex>` object (whatever the
    host or bucket, so an alias of the store is caught too), or anything under `prefix` (an app's
    uploads_prefix), compared after normalizing the path ("a//b", "a/./b", "a/x/../b")."""
    parts = urlsplit(uri)
    path = posixpath.normpath(parts.path or "/")
    head, name = posixpath.split(path)
    if posixpath.basename(head) == UPLOADS and _UPLOAD_NAME.match(name.lower()):
        return True
    if prefix is None:
        return False
    store = urlsplit(prefix)
    if store.scheme in ("", "file"):               # a local store: a path, or a file:// URI
        if parts.scheme not in ("", "file"):
            return False
        path, root = os.path.normpath(os.path.abspath(parts.path)), os.path.normpath(os.path.abspath(store.path))
    elif parts.scheme != store.scheme or parts.netloc.lower() != store.netloc.lower():
        return False
    else:
        root = posixpath.normpath(store.path or "/")
    return path == root or path.startswith(root.rstrip("/") + "/")


# ---- the trust boundary (DESIGN.md §4) --------------------------------------------------------

class URINotAllowed(ValueError):
    """A URI from a request or manifest that the allow-list refuses; the message names why."""


def check_allowed(uri: str, schemes: tuple[str, ...] = ("s3", "gs", "https"),
                  buckets: tuple[str, ...] | None = None) -> str:
    """Refuse URIs outside the allow-list: other schemes (file:// above all), buckets not listed,
    and hosts that are IP literals in loopback, private or link-local ranges."""
    import ipaddress
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in schemes:
        raise URINotAllowed(f"scheme {parts.scheme or '(none)'!r} is not allowed; allowed: {list(schemes)}")
    host = parts.hostname or ""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None and (address.is_private or address.is_loopback or address.is_link_local
                                or address.is_reserved or address.is_unspecified):
        raise URINotAllowed(f"host {host} is a private, loopback or link-local address")
    if host in ("localhost", "") or host.endswith(".localhost") or host.endswith(".internal"):
        raise URINotAllowed(f"host {host or '(none)'!r} is not allowed")
    if buckets is not None and parts.scheme in ("s3", "gs") and host not in buckets:
        raise URINotAllowed(f"bucket {host!r} is not in the allow-list {list(buckets)}")
    return uri


# ---- the artifact layout shared by batch rows and online jobs (DESIGN.md §4) ------------------

def artifact_uri(prefix: str, key: str, extension: str = "mp4") -> str:
    """Deterministic location of a rendered artifact: key = request_key(request, checkpoint digest)."""
    return join(prefix, "artifacts", key[:2], f"{key}.{extension}")


def sidecar_uri(prefix: str, key: str) -> str:
    """The small JSON record written after the artifact; artifact + sidecar present = done."""
    return join(prefix, "artifacts", key[:2], f"{key}.json")


def artifact_done(prefix: str, key: str, extension: str) -> bool:
    """Done iff the artifact and its sidecar both exist (the sidecar is written last)."""
    return exists(sidecar_uri(prefix, key)) and exists(artifact_uri(prefix, key, extension))


def write_artifact(prefix: str, key: str, extension: str, data: bytes, record: dict) -> dict:
    """Writes the artifact, then its sidecar (the commit), each atomically; returns the sidecar record,
    which gains the artifact's `key`, `uri`, `bytes` and `created`."""
    import time

    uri = artifact_uri(prefix, key, extension)
    write_bytes(uri, data)
    record = {**record, "key": key, "uri": uri, "bytes": len(data), "created": time.time()}
    write_bytes(sidecar_uri(prefix, key), canonical_json(record))
    return record
