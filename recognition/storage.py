"""Object keys. The server names every object; an uploaded file's name is never used.

Keys that come from outside (a bulk import's storage prefix, and every key listed under it) are
vouched for by one function, `storage_key_for_tenant`, before anything is listed or read.
"""

import os
import re
import uuid

from django.core.files.storage import FileSystemStorage, default_storage

from core.errors import Invalid


def image_key(*, tenant_id: int, extension: str = "png") -> str:
    """An image's display copy: the only stored form of it a browser is sent."""
    return f"tenants/{tenant_id}/images/{uuid.uuid4().hex}.{extension}"


def original_key(*, tenant_id: int, extension: str) -> str:
    """A PNG/JPEG upload as it came, metadata and all: read by the worker, never served, and
    deleted once the display copy exists."""
    return f"tenants/{tenant_id}/originals/{uuid.uuid4().hex}.{extension}"


def pixels_key(*, tenant_id: int) -> str:
    """A grayscale DICOM frame's modality values (float32), stored when it is rendered."""
    return f"tenants/{tenant_id}/pixels/{uuid.uuid4().hex}.f32"


def dicom_key(*, tenant_id: int) -> str:
    return f"tenants/{tenant_id}/dicom/{uuid.uuid4().hex}.dcm"


def archive_key(*, tenant_id: int) -> str:
    return f"tenants/{tenant_id}/archives/{uuid.uuid4().hex}.zip"


def import_prefix(*, tenant_id: int) -> str:
    """Where a hospital puts files for bulk import: a job may import only under its own prefix."""
    return f"tenants/{tenant_id}/imports/"


def heatmap_key(*, tenant_id: int) -> str:
    return f"tenants/{tenant_id}/heatmaps/{uuid.uuid4().hex}.png"


def model_package_key(*, name: str, version: str, sha256: str) -> str:
    """``sha256`` of the whole package: the key names exactly one content."""
    return f"models/{name}/{version}-{sha256}.zip"


class ForeignStorageKey(Invalid):
    """A storage key that is not plainly inside the hospital's own area: refused, never read."""

    status, code = 400, "foreign_prefix"


# The characters AWS calls safe in object keys (letters, digits and ! - _ . * ' ( )), with "/" only
# as the separator. Everything else is refused, not normalised: a backslash, "%", a space, a control
# character or any non-ASCII character (U+2215, U+FF0F and U+2044 look like "/") is something a layer
# between here and the bytes may rewrite (django-storages turns "\" into "/" and resolves "..", a
# proxy may percent-decode), so the only key vouched for is one that no layer can change.
_SEGMENT = re.compile(r"[A-Za-z0-9!_.*'()-]+")
MAX_KEY_BYTES = 1024  # S3's own limit on a key
SHOWN_NAME_CHARS = 60  # of a refused key in the message


def storage_key_for_tenant(*, tenant_id: int, key: str, under: str = "", storage=None) -> str:
    """``key`` itself when it is a canonical key inside ``tenants/<tenant_id>/<under>/``; otherwise
    `ForeignStorageKey`, with the reason in words. A key that ends in "/" names a folder.

    Canonical: only the safe characters, single "/" between names, no leading "/", no "." or ".."
    (or other all-dots) name, so no storage backend's normalisation can turn it into another key.
    On local files the key must also be the very path it spells: a symbolic link on the way (to
    another hospital's folder, or a loop back up) is refused. This is the one place that decides;
    the prefix import asks it about the prefix, and again about every key it lists before reading."""
    area = f"tenants/{int(tenant_id)}/" + (f"{under.strip('/')}/" if under else "")
    if not isinstance(key, str) or not key:
        raise ForeignStorageKey(f"Give a storage key under {area}")
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        raise ForeignStorageKey(f"A storage key is at most {MAX_KEY_BYTES} bytes long.")
    for name in (key[:-1] if key.endswith("/") else key).split("/"):
        if not _SEGMENT.fullmatch(name) or not name.strip("."):
            raise ForeignStorageKey(
                "Storage keys here are plain: names of letters, digits and ! - _ . * ' ( ) joined by single "
                f'"/", not starting with "/", with no "." or ".." names; {_shown(name)} is not such a name.'
            )
    if not key.startswith(area):
        raise ForeignStorageKey(f"This is outside your hospital's storage: use a key under {area}")
    _spelled_path(storage if storage is not None else default_storage, key)
    return key


def _shown(name: str) -> str:
    if not name:
        return 'an empty name (a leading "/" or two in a row)'
    return ascii(name[:SHOWN_NAME_CHARS])  # control and look-alike characters shown as escapes, not as themselves


def _spelled_path(storage, key: str) -> None:
    """Local files only: the key's real path (every link resolved) is the path it spells."""
    if not isinstance(storage, FileSystemStorage):
        return  # an object store: a key is only a name, there are no links to follow
    root = os.path.realpath(storage.location)
    spelled = os.path.join(root, *key.rstrip("/").split("/"))
    if os.path.realpath(spelled) != spelled:
        raise ForeignStorageKey("This storage key passes through a link; only plain files and folders are read.")
