"""Sightline as a DICOM node: the hospital's called AE title, its registered sending nodes, every
instance held (received or made here) as the DICOMweb index, and the PACS destinations that
findings go back to, with one delivery row per object and destination.

Image rows (recognition) stay one per frame, what the worker reads; ``Instance`` is one per SOP
instance, what DICOM and DICOMweb speak of, images and non-image objects (SR, PR, KO) alike.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from accounts.models import ServiceAccount, Tenant, TenantOwned, TenantQuerySet

AE_TITLE_LENGTH = 16  # PS3.5 AE value representation: at most 16 characters
UID_LENGTH = 64
REASON_LENGTH = 500


class HospitalAETitle(models.Model):
    """The AE title a modality or PACS calls to send to this hospital. Platform staff assign it;
    it is unique across the platform, so the called AE title alone names the hospital."""

    tenant = models.OneToOneField(Tenant, on_delete=models.CASCADE, related_name="dicom_ae_title")
    ae_title = models.CharField(max_length=AE_TITLE_LENGTH, unique=True)
    assigned_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"{self.ae_title} → {self.tenant.slug}"


class DicomNode(TenantOwned):
    """A sending node (modality, PACS) a tenant admin registered: its calling AE title and host.
    It acts through its own service account (a clinician-role member that uploads), so every
    scoping, role rule and access-log entry applies to it as to any member."""

    name = models.CharField(max_length=64)
    ae_title = models.CharField(max_length=AE_TITLE_LENGTH, help_text="The calling AE title it sends with.")
    host = models.CharField(max_length=255, help_text="Its IP address or host name.")
    bind_host = models.BooleanField(
        default=True, help_text="Accept its AE title only from this host (off: from any address)."
    )
    tls_client_fingerprint = models.CharField(
        max_length=95,
        blank=True,
        help_text="Mutual TLS: the SHA-256 fingerprint of the client certificate it must present (hex).",
    )
    service_account = models.OneToOneField(ServiceAccount, on_delete=models.PROTECT, related_name="dicom_node")
    is_active = models.BooleanField(default=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(null=True, blank=True)

    objects = TenantQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "ae_title"], name="dicom_node_ae_per_hospital"),
            models.UniqueConstraint(fields=["tenant", "name"], name="dicom_node_name_per_hospital"),
        ]

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}"


class Instance(TenantOwned):
    """One DICOM SOP instance the hospital holds: received (C-STORE, STOW-RS, upload) or made here
    (an SR, a map). The SOP Instance UID is unique per hospital: a second copy creates nothing."""

    class Origin(models.TextChoices):
        RECEIVED = "received"
        CREATED = "created", "made by Sightline"

    study = models.ForeignKey("recognition.Study", on_delete=models.CASCADE, related_name="dicom_instances")
    series = models.ForeignKey("recognition.Series", on_delete=models.CASCADE, related_name="dicom_instances")
    sop_instance_uid = models.CharField(max_length=UID_LENGTH)
    sop_class_uid = models.CharField(max_length=UID_LENGTH)
    transfer_syntax_uid = models.CharField(max_length=UID_LENGTH, blank=True)
    modality = models.CharField(max_length=16, blank=True)
    instance_number = models.IntegerField(null=True, blank=True)
    frames = models.PositiveIntegerField(default=0, help_text="Number of frames; 0 for a non-image object.")
    rows = models.PositiveIntegerField(null=True, blank=True)
    columns = models.PositiveIntegerField(null=True, blank=True)
    file = models.FileField(max_length=255, help_text="The Part 10 file: as received (preamble zeroed) or made.")
    byte_size = models.PositiveBigIntegerField(default=0)
    origin = models.CharField(max_length=16, choices=Origin.choices, default=Origin.RECEIVED)
    received_from = models.ForeignKey(DicomNode, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # what a made object is of: the result or the review it reports, the image it references
    source_image = models.ForeignKey(
        "recognition.Image", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    result = models.ForeignKey("recognition.Result", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    review = models.ForeignKey("recognition.Review", null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    kind = models.CharField(
        max_length=16,
        blank=True,
        help_text="A made object's kind: ai_sr (the finding), review_sr (the verdict), map (the heatmap).",
    )
    created = models.DateTimeField(default=timezone.now)

    objects = TenantQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "sop_instance_uid"], name="instance_uid_unique_per_hospital"),
        ]
        indexes = [
            models.Index(fields=["study", "series", "instance_number", "id"], name="instance_in_study"),
            models.Index(fields=["result", "kind"], name="instance_of_result"),
        ]

    def __str__(self) -> str:
        return f"instance {self.pk} ({self.sop_class_uid})"


class Destination(TenantOwned):
    """Where a hospital's findings go back: a DICOM node (C-STORE SCU) or a STOW-RS URL."""

    class Kind(models.TextChoices):
        DIMSE = "dimse", "DICOM C-STORE"
        STOW = "stow", "DICOMweb STOW-RS"

    class SendOn(models.TextChoices):
        RESULT = "result", "every AI result"
        SIGNOFF = "signoff", "only after sign-off"

    name = models.CharField(max_length=64)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    host = models.CharField(max_length=255, blank=True)
    port = models.PositiveIntegerField(null=True, blank=True)
    ae_title = models.CharField(max_length=AE_TITLE_LENGTH, blank=True, help_text="The PACS's (called) AE title.")
    url = models.URLField(max_length=500, blank=True, help_text="STOW-RS: the studies endpoint.")
    username = models.CharField(max_length=200, blank=True)
    secret_encrypted = models.TextField(blank=True, help_text="STOW-RS password or token, encrypted at rest.")
    send_on = models.CharField(max_length=8, choices=SendOn.choices, default=SendOn.SIGNOFF)
    is_active = models.BooleanField(default=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(default=timezone.now)
    last_test_ok = models.BooleanField(null=True, blank=True)
    last_test_message = models.CharField(max_length=REASON_LENGTH, blank=True)
    last_tested_at = models.DateTimeField(null=True, blank=True)

    objects = TenantQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="destination_name_per_hospital")]

    def __str__(self) -> str:
        return f"destination {self.name}"


class Delivery(TenantOwned):
    """One made object sent (or to be sent) to one destination: its visible status."""

    class Status(models.TextChoices):
        PENDING = "pending"
        SENDING = "sending"
        SENT = "sent"
        RETRYING = "retrying"
        FAILED = "failed"

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="deliveries")
    destination = models.ForeignKey(Destination, on_delete=models.CASCADE, related_name="deliveries")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    error = models.CharField(max_length=REASON_LENGTH, blank=True)
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(default=timezone.now)

    objects = TenantQuerySet.as_manager()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["instance", "destination"], name="delivery_once_per_destination"),
        ]
        indexes = [models.Index(fields=["status", "next_attempt_at"], name="delivery_due")]

    def __str__(self) -> str:
        return f"delivery {self.pk} ({self.status})"
