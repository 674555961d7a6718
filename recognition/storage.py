"""Object keys. The server names every object; an uploaded file's name is never used."""

import uuid


def image_key(*, tenant_id: int) -> str:
    return f"tenants/{tenant_id}/images/{uuid.uuid4().hex}.png"


def dicom_key(*, tenant_id: int) -> str:
    return f"tenants/{tenant_id}/dicom/{uuid.uuid4().hex}.dcm"


def heatmap_key(*, tenant_id: int) -> str:
    return f"tenants/{tenant_id}/heatmaps/{uuid.uuid4().hex}.png"


def model_package_key(*, name: str, version: str, sha256: str) -> str:
    """``sha256`` of the whole package: the key names exactly one content."""
    return f"models/{name}/{version}-{sha256}.zip"
