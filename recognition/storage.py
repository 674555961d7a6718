"""Object keys. The server names every object; an uploaded file's name is never used."""

import uuid


def image_key(*, tenant_id: int) -> str:
    return f"tenants/{tenant_id}/images/{uuid.uuid4().hex}.png"


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
