"""Clinical records, shaped after DICOM: Study → Series → Image; and the model registry.

Every clinical row is tenant-owned and reached through ``objects.for_tenant(tenant)``.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from accounts.models import TenantOwned


class Study(TenantOwned):
    patient_pseudonym = models.CharField(
        max_length=64, blank=True, help_text="Pseudonymous patient id; never a name or MRN."
    )
    accession_number = models.CharField(max_length=64, blank=True)
    modality = models.CharField(max_length=16, blank=True)
    description = models.CharField(max_length=200, blank=True)
    study_date = models.DateField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "studies"
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "accession_number"],
                condition=~Q(accession_number=""),
                name="study_accession_unique_per_hospital",
            )
        ]
        indexes = [models.Index(fields=["tenant", "-created"], name="study_tenant_created")]


class Series(TenantOwned):
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="series")
    number = models.PositiveIntegerField(default=1)
    modality = models.CharField(max_length=16, blank=True)
    description = models.CharField(max_length=200, blank=True)

    class Meta:
        verbose_name_plural = "series"
        constraints = [models.UniqueConstraint(fields=["study", "number"], name="series_number_unique")]


class Image(TenantOwned):
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="images")
    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="images")
    file = models.FileField(max_length=255)
    sha256 = models.CharField(max_length=64, help_text="Of the stored (re-encoded) bytes.")
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    format = models.CharField(max_length=16, help_text="The format that was uploaded.")
    byte_size = models.PositiveBigIntegerField()
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["tenant", "-created", "-id"], name="image_tenant_created")]


class AIModel(models.Model):
    """A model family (platform-wide, not a tenant's): versions and movable aliases."""

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    is_demo = models.BooleanField(default=False)
    created = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.name


class ModelVersion(models.Model):
    """An immutable model package; its weights' sha256 is checked every time it loads."""

    model = models.ForeignKey(AIModel, on_delete=models.PROTECT, related_name="versions")
    version = models.CharField(max_length=50)
    manifest = models.JSONField()
    package = models.FileField(max_length=255)
    weights_sha256 = models.CharField(max_length=64)
    package_sha256 = models.CharField(max_length=64, blank=True, help_text="Of the whole zip, as registered.")
    registered_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["model", "version"], name="model_version_unique")]

    def __str__(self) -> str:
        return f"{self.model.name} {self.version}"

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.get("labels", []))


class ModelAlias(models.Model):
    class Name(models.TextChoices):
        PRODUCTION = "production"
        CANARY = "canary"

    model = models.ForeignKey(AIModel, on_delete=models.CASCADE, related_name="aliases")
    name = models.CharField(max_length=20, choices=Name.choices)
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    updated = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["model", "name"], name="model_alias_unique")]

    def __str__(self) -> str:
        return f"{self.model.name}@{self.name}"


class TrafficSplit(TenantOwned):
    """A share of one hospital's images goes to another version of a model (A/B or canary)."""

    model = models.ForeignKey(AIModel, on_delete=models.CASCADE, related_name="+")
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    percent = models.PositiveSmallIntegerField(help_text="Share of the hospital's images, 1-99.")
    updated = models.DateTimeField(default=timezone.now)
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "model"], name="one_split_per_hospital_and_model"),
            models.CheckConstraint(condition=Q(percent__gte=1, percent__lte=99), name="split_percent_1_to_99"),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id}: {self.percent}% to {self.version}"


class ModelPin(TenantOwned):
    """A hospital that must stay on one version, whatever the aliases say."""

    model = models.ForeignKey(AIModel, on_delete=models.CASCADE, related_name="+")
    version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    updated = models.DateTimeField(default=timezone.now)
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "model"], name="one_pin_per_hospital_and_model")]

    def __str__(self) -> str:
        return f"{self.tenant_id} pinned to {self.version}"


class InferenceRequest(TenantOwned):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    class Priority(models.IntegerChoices):
        INTERACTIVE = 0  # a person is waiting: always claimed first
        BULK = 1  # batch jobs: claimed round-robin across hospitals

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="inference_requests")
    priority = models.PositiveSmallIntegerField(choices=Priority.choices, default=Priority.INTERACTIVE)
    claimed_by = models.CharField(max_length=200, blank=True, help_text="host:pid of the worker running it")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    error = models.CharField(max_length=500, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    batch_size = models.PositiveIntegerField(null=True, blank=True)
    wait_ms = models.PositiveIntegerField(null=True, blank=True, help_text="From queued to claimed.")
    inference_ms = models.PositiveIntegerField(null=True, blank=True, help_text="From claimed to stored.")
    created = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            # the worker's claim: queued requests of one model version, oldest first
            models.Index(fields=["model_version", "status", "priority", "id"], name="inference_claim"),
            models.Index(fields=["status", "claimed_by"], name="inference_running"),
        ]


class Result(TenantOwned):
    request = models.OneToOneField(InferenceRequest, on_delete=models.CASCADE, related_name="result")
    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="results")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    probabilities = models.JSONField()
    top_label = models.CharField(max_length=100)
    top_probability = models.FloatField()
    positive_labels = models.JSONField(default=list, help_text="Multi-label models: labels above their threshold.")
    heatmap = models.FileField(max_length=255, blank=True, help_text="Grad-CAM overlay (PNG), when the model has one.")
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["image", "model_version"], name="one_result_per_image_and_version")
        ]
