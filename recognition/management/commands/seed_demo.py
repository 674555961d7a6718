"""Two demo hospitals, a user for every role, and sample images. Running it twice changes nothing."""

import datetime

import numpy as np
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from django.core.management.base import BaseCommand
from django.db import transaction

from accounts.models import Role, Tenant
from accounts.services import membership_grant, user_get_or_create
from recognition.models import Study
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
        created = self._samples(memberships)
        self.stdout.write(self.style.SUCCESS(f"Demo seeded: {len(USERS)} users, {created} new sample images."))

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
        return created
