"""Two demo hospitals, a user for every role, and sample images. Running it twice changes nothing."""

import datetime
import io

import numpy as np
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management.base import BaseCommand
from django.db import transaction

from accounts.models import Role, Tenant
from accounts.services import access_event_record, membership_grant, user_get_or_create
from core.model_package import SCREENING_MODEL_NAME
from dicomnet.models import DicomNode, HospitalAETitle
from dicomnet.nodes import dicom_node_create, hospital_ae_title_assign
from recognition.models import HospitalSettings, ModelVersion, Study
from recognition.services.images import StudyFields, image_upload
from workers.engine import synthetic

HOSPITALS = {
    "demo-general": "Demo General",
    "demo-childrens": "Demo Children's",
}
USERS = [
    ("clinician", "demo-general", Role.CLINICIAN),
    ("viewer", "demo-general", Role.VIEWER),
    ("hospital-admin", "demo-general", Role.TENANT_ADMIN),
    ("auditor", "demo-general", Role.AUDITOR),
    ("clinician-b", "demo-childrens", Role.CLINICIAN),
]
# DICOM (issue 15): each demo hospital's called AE title, and Demo General's one sending node, a
# modality on this machine (send to it: storescu -aet DEMO_MODALITY -aec SL_GENERAL 127.0.0.1 11112 FILE)
AE_TITLES = {"demo-general": "SL_GENERAL", "demo-childrens": "SL_CHILDRENS"}
DEMO_NODE = {"name": "Demo modality", "ae_title": "DEMO_MODALITY", "host": "127.0.0.1"}
SAMPLE_COUNT = 6
SAMPLE_SIZE = 512


class Command(BaseCommand):
    help = "Seed the demo hospitals, users and sample images."

    def handle(self, *args, **options):
        password = settings.SIGHTLINE_DEMO_PASSWORD
        with transaction.atomic():
            tenants = {
                slug: Tenant.objects.get_or_create(slug=slug, defaults={"name": name})[0]
                for slug, name in HOSPITALS.items()
            }
            memberships = {}
            for username, slug, role in USERS:
                user = user_get_or_create(username=username, password=password)
                memberships[username] = membership_grant(tenant=tenants[slug], user=user, role=role)
            self._dicom(tenants, memberships["hospital-admin"])
            screening = self._screening(tenants["demo-general"])
        created = self._samples(memberships)
        self.stdout.write(self.style.SUCCESS(f"Demo seeded: {len(USERS)} users, {created} new sample images."))
        if screening:
            self.stdout.write(f"Demo General screens uploads in the browser with {screening}.")

    def _dicom(self, tenants, admin) -> None:
        for slug, ae_title in AE_TITLES.items():
            if not HospitalAETitle.objects.filter(tenant=tenants[slug]).exists():
                hospital_ae_title_assign(tenant=tenants[slug], ae_title=ae_title)
        if not DicomNode.objects.for_tenant(admin.tenant).filter(ae_title=DEMO_NODE["ae_title"]).exists():
            dicom_node_create(actor=admin, **DEMO_NODE)

    def _screening(self, tenant) -> ModelVersion | None:
        """Demo General screens in the browser (build_screening_model registered the model) so a
        new user sees it at once. Only a hospital with no settings row yet: a tenant admin's own
        choice, made on the settings page, is never overwritten by a second seeding."""
        version = (
            ModelVersion.objects.filter(
                model__name=SCREENING_MODEL_NAME, status=ModelVersion.Status.READY, browser_confirmed_at__isnull=False
            )
            .order_by("-serial")
            .first()
        )
        if version is None or HospitalSettings.objects.for_tenant(tenant).exists():
            return None
        row = HospitalSettings.objects.create(tenant=tenant, screening_enabled=True, screening_version=version)
        access_event_record(
            action="hospital.settings_update", tenant=tenant, target_type="hospital_settings", target_id=row.pk
        )
        return version

    def _samples(self, memberships) -> int:
        rng = np.random.default_rng(2026)
        created = 0
        for number, (membership, opacity) in enumerate(
            [(memberships["clinician"], i % 2 == 1) for i in range(SAMPLE_COUNT)]
            + [(memberships["clinician-b"], True)],
            start=1,
        ):
            png = synthetic.render_png(rng, SAMPLE_SIZE, opacity)  # drawn every time: same images each run
            accession = f"DEMO-{number:04d}"
            if Study.objects.for_tenant(membership.tenant).filter(accession_number=accession).exists():
                continue
            image_upload(
                membership=membership,
                upload=SimpleUploadedFile(f"sample-{number}.png", png),
                study=StudyFields(
                    patient_pseudonym=f"PSEUDO-{number:04d}",
                    accession_number=accession,
                    modality="DX",
                    description="Generated demo image (not a patient)",
                    study_date=datetime.date(2026, 1, number),
                ),
            )
            created += 1
        accession = "DEMO-CT-0001"
        clinician = memberships["clinician"]
        if not Study.objects.for_tenant(clinician.tenant).filter(accession_number=accession).exists():
            image_upload(membership=clinician, upload=SimpleUploadedFile("ct.dcm", demo_ct(accession)))
            created += 1
        return created


def demo_ct(accession: str, frames: int = 3, size: int = 256) -> bytes:
    """A generated chest-CT-like DICOM (a phantom, not a patient): three slices in Hounsfield
    units, with a window in the file, so the viewer's window/level and presets have work to do."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    slices = []
    for index in range(frames):
        hu = np.full((size, size), -1000.0)
        hu[(x / 0.85) ** 2 + (y / 0.65) ** 2 < 1] = 40  # soft tissue
        for side in (-0.38, 0.38):
            hu[((x - side) / 0.3) ** 2 + (y / 0.45) ** 2 < 1] = -820  # lungs
        hu[x**2 + (y - 0.48) ** 2 < 0.012] = 700  # spine
        if index == 1:
            hu[(x - 0.35) ** 2 + (y + 0.1) ** 2 < 0.01] = 30  # a round opacity in one slice
        hu += np.random.default_rng(index).normal(0, 12, hu.shape)
        slices.append(np.clip(hu + 1024, 0, 4095).astype(np.uint16))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = "Demo^Phantom", "DEMO-PHANTOM"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.AccessionNumber, ds.StudyDate, ds.Modality = accession, "20260110", "CT"
    ds.StudyDescription, ds.SeriesNumber, ds.InstanceNumber = "Generated phantom (not a patient)", 1, 1
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, size, size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 1, -1024, 40, 400
    ds.PixelData = np.stack(slices).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
