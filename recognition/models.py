"""Clinical records, shaped after DICOM: Study → Series → Image; and the model registry.

Every clinical row is tenant-owned and reached through ``objects.for_tenant(tenant)``.
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from accounts.models import TenantOwned

# Widths of the text fields that services cut a message down to (so both name the same number).
REASON_LENGTH = 300  # Image.unprocessable_reason, Result.heatmap_error, BatchUpload.error: a sentence
ERROR_LENGTH = 500  # InferenceRequest.error, BatchItem.error
IDEMPOTENCY_KEY_LENGTH = 128
JOB_NAME_LENGTH = 200
# The model servers' protocols a read may arrive by (protocols/): their studies stay out of
# clinicians' worklists unless asked for.
PROTOCOL_CHOICES = [("kserve", "KServe v2"), ("tfserving", "TF Serving"), ("torchserve", "TorchServe")]

# A traffic split sends 1-99 per cent to the candidate: 0 or 100 is no split but a pin.
SPLIT_PERCENT_MIN, SPLIT_PERCENT_MAX = 1, 99
SHADOW_PERCENT_DEFAULT = 5  # the default share of shadow reads


class Study(TenantOwned):
    class AIStatus(models.TextChoices):
        NONE = "none", "no AI read"
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"
        UNPROCESSABLE = "unprocessable"

    class ReviewState(models.TextChoices):
        UNREVIEWED = "unreviewed"
        IN_REVIEW = "in_review", "in review"  # a draft is saved, not yet signed
        SIGNED_OFF = "signed_off", "signed off"

    patient_pseudonym = models.CharField(
        max_length=64, blank=True, help_text="Pseudonymous patient id; never a name or MRN."
    )
    protocol = models.CharField(
        max_length=16,
        choices=PROTOCOL_CHOICES,
        blank=True,
        help_text="Made by a model-server protocol read (KServe v2, TF Serving, TorchServe): in the worklist "
        "only under the 'protocol reads' filter. Empty for studies people uploaded.",
    )
    accession_number = models.CharField(max_length=64, blank=True)
    study_instance_uid = models.CharField(max_length=64, blank=True)
    modality = models.CharField(max_length=16, blank=True)
    description = models.CharField(max_length=200, blank=True)
    study_date = models.DateField(null=True, blank=True)
    created = models.DateTimeField(default=timezone.now)
    # the worklist's columns, kept current by the services that change them (study_summary_refresh)
    ai_status = models.CharField(max_length=16, choices=AIStatus.choices, default=AIStatus.NONE)
    top_label = models.CharField(max_length=100, blank=True)
    top_probability = models.FloatField(null=True, blank=True)
    review_state = models.CharField(max_length=16, choices=ReviewState.choices, default=ReviewState.UNREVIEWED)
    image_count = models.PositiveIntegerField(default=0)
    updated = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name_plural = "studies"
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "accession_number"],
                condition=~Q(accession_number=""),
                name="study_accession_unique_per_hospital",
            ),
            models.UniqueConstraint(
                fields=["tenant", "study_instance_uid"],
                condition=~Q(study_instance_uid=""),
                name="study_uid_unique_per_hospital",
            ),
        ]
        indexes = [
            # the worklist: newest first, keyset-paginated on (created, id), one per common filter
            models.Index(fields=["tenant", "-created", "-id"], name="study_worklist"),
            models.Index(fields=["tenant", "ai_status", "-created", "-id"], name="study_worklist_ai"),
            models.Index(fields=["tenant", "review_state", "-created", "-id"], name="study_worklist_review"),
            models.Index(fields=["tenant", "top_label", "-created", "-id"], name="study_worklist_finding"),
            models.Index(fields=["tenant", "modality", "-created", "-id"], name="study_worklist_modality"),
            models.Index(fields=["tenant", "study_date", "id"], name="study_worklist_date"),
            models.Index(fields=["tenant", "patient_pseudonym", "id"], name="study_worklist_patient"),
            models.Index(fields=["tenant", "accession_number", "id"], name="study_worklist_accession"),
        ]


class Series(TenantOwned):
    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="series")
    number = models.PositiveIntegerField(default=1)
    series_instance_uid = models.CharField(max_length=64, blank=True)
    modality = models.CharField(max_length=16, blank=True)
    description = models.CharField(max_length=200, blank=True)

    class Meta:
        verbose_name_plural = "series"
        constraints = [models.UniqueConstraint(fields=["study", "number"], name="series_number_unique")]


class Image(TenantOwned):
    class State(models.TextChoices):
        """The one state machine of an image's pixels: received → rendered (the PNG for display and
        the model is stored; only now is its AI read queued) or failed (in words, in
        ``unprocessable_reason``). The request renders what is cheap; the rest is received, and
        the worker step (``images_render``) renders it."""

        RECEIVED = "received", "received, not yet rendered"
        RENDERED = "rendered"
        FAILED = "failed"

    study = models.ForeignKey(Study, on_delete=models.CASCADE, related_name="images")
    series = models.ForeignKey(Series, on_delete=models.CASCADE, related_name="images")
    file = models.FileField(
        max_length=255, blank=True, help_text="PNG for display and the model; none if unprocessable."
    )
    original = models.FileField(max_length=255, blank=True, help_text="DICOM: the file as received, preamble zeroed.")
    sop_instance_uid = models.CharField(max_length=64, blank=True)
    instance_number = models.IntegerField(null=True, blank=True)
    frame_number = models.PositiveIntegerField(default=0, help_text="Multi-frame DICOM: this frame's index.")
    photometric = models.CharField(max_length=16, blank=True)
    window_center = models.FloatField(null=True, blank=True, help_text="DICOM default window, modality units.")
    window_width = models.FloatField(null=True, blank=True)
    unprocessable_reason = models.CharField(
        max_length=REASON_LENGTH,
        blank=True,
        help_text="Kept but not readable here (e.g. a transfer syntax without decoder).",
    )
    state = models.CharField(max_length=16, choices=State.choices, default=State.RENDERED)
    read_on_render = models.BooleanField(default=False, help_text="Queue the AI read once rendered.")
    render_attempts = models.PositiveSmallIntegerField(default=0)
    render_queued_at = models.DateTimeField(null=True, blank=True, help_text="The latest render wake-up sent.")
    pixels = models.FileField(
        max_length=255, blank=True, help_text="Grayscale DICOM: the frame's modality values, little-endian float32."
    )
    sha256 = models.CharField(max_length=64, help_text="Of the stored (re-encoded) bytes.")
    width = models.PositiveIntegerField()
    height = models.PositiveIntegerField()
    format = models.CharField(max_length=16, help_text="The format that was uploaded.")
    byte_size = models.PositiveBigIntegerField()
    uploaded_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [
            models.Index(fields=["tenant", "-created", "-id"], name="image_tenant_created"),
            models.Index(fields=["study", "series", "instance_number", "frame_number", "id"], name="image_in_study"),
            # reconciliation: received images whose render wake-up is old
            models.Index(fields=["state", "render_queued_at"], name="image_render_pending"),
        ]

    @property
    def is_dicom(self) -> bool:
        return self.format == "DICOM"  # a PNG/JPEG upload has an original too, until it is rendered

    @property
    def has_modality_pixels(self) -> bool:
        """Grayscale DICOM: the viewer windows the modality values itself."""
        return (
            self.is_dicom
            and self.state == self.State.RENDERED
            and not self.unprocessable_reason
            and self.photometric.startswith("MONOCHROME")
        )


class UploadKey(TenantOwned):
    """A single upload's ``Idempotency-Key``: a client that retries after a dropped connection
    gets the image(s) of its first try, never a second copy. One per key and hospital."""

    key = models.CharField(max_length=128)
    fingerprint = models.CharField(max_length=64, help_text="sha256 of the file and its study fields.")
    image_ids = models.JSONField(default=list)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "key"], name="upload_key_unique_per_hospital")]


class AIModel(models.Model):
    """A model family (platform-wide, not a tenant's): versions and movable aliases."""

    name = models.SlugField(max_length=100, unique=True)
    description = models.TextField(blank=True)
    is_demo = models.BooleanField(default=False)
    created = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return self.name


class ModelVersion(models.Model):
    """An immutable model package; its weights' sha256 is checked every time it loads.

    Registration stores the bytes and creates the row ``validating``; a worker task runs the
    registration checks and makes it ``ready`` or ``refused`` (with the reason in words). Only
    a ready version can be given an alias, a split or a pin, or be loaded for inference."""

    class Status(models.TextChoices):
        VALIDATING = "validating"
        READY = "ready"
        REFUSED = "refused"

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
    status = models.CharField(max_length=12, choices=Status.choices, default=Status.VALIDATING)
    refusal_reason = models.TextField(blank=True, help_text="Why the registration checks refused it, in words.")
    validated_at = models.DateTimeField(null=True, blank=True)
    requested_alias = models.CharField(
        max_length=20, blank=True, help_text="The alias to point at this version once it is ready."
    )
    serial = models.PositiveIntegerField(
        help_text="Its registration order within the model (1, 2, …): the integer version TF Serving "
        "and KServe clients name; stable, never reused."
    )
    derived_from = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="derived",
        help_text="The version of the same model this one was made from (optimise_model).",
    )
    evaluation = models.JSONField(
        default=dict,
        blank=True,
        help_text="A derived version measured against its parent on a held-out set, by the worker "
        "(agreement, probability differences, accuracy, sizes, speed); empty until measured.",
    )
    browser_confirmed_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="A screening model: when the registering operator confirmed that its licence allows "
        "shipping its weights to readers' browsers; a screening version without it is refused.",
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["model", "version"], name="model_version_unique"),
            models.UniqueConstraint(fields=["model", "serial"], name="model_version_serial_unique"),
            models.CheckConstraint(
                condition=~models.Q(status="refused") | ~models.Q(refusal_reason=""),
                name="model_version_refused_says_why",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model.name} {self.version}"

    def save(self, *args, **kwargs) -> None:
        if self.serial is None:  # the next in the model's registration order; the constraint guards a race
            latest = ModelVersion.objects.filter(model_id=self.model_id).aggregate(n=models.Max("serial"))["n"]
            self.serial = (latest or 0) + 1
        super().save(*args, **kwargs)

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.get("labels", []))

    @property
    def label(self) -> str:
        """How a version is shown to people: its integer serial beside its semantic version."""
        return f"v{self.serial} · {self.version}"


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
    shadow_percent = models.PositiveSmallIntegerField(
        default=SHADOW_PERCENT_DEFAULT,
        help_text="Share of each arm's images also read by the other arm in the bulk lane (shadow reads, "
        "never shown to clinicians), so the two versions can be compared on live traffic; 0-100.",
    )
    updated = models.DateTimeField(default=timezone.now)
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "model"], name="one_split_per_hospital_and_model"),
            models.CheckConstraint(
                condition=Q(percent__gte=SPLIT_PERCENT_MIN, percent__lte=SPLIT_PERCENT_MAX),
                name="split_percent_1_to_99",
            ),
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


class ModelAllowance(TenantOwned):
    """A version or an alias of a model that a platform operator lets one hospital ask for by
    name (a protocol URL, the upload API's ``version``/``alias``), beyond what it gets anyway: its
    pin, the ``production`` alias and its split. ``registry.version_for`` is the one place that
    reads it."""

    model = models.ForeignKey(AIModel, on_delete=models.CASCADE, related_name="+")
    version = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    alias = models.CharField(max_length=20, blank=True, choices=ModelAlias.Name.choices)
    created = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(Q(version__isnull=False) & Q(alias="")) | (Q(version__isnull=True) & ~Q(alias="")),
                name="allowance_version_or_alias",
            ),
            models.UniqueConstraint(
                fields=["tenant", "model", "version", "alias"], name="allowance_unique", nulls_distinct=False
            ),
        ]

    def __str__(self) -> str:
        return f"{self.tenant_id} may use {self.version or self.alias}"


class RolloutChange(models.Model):
    """One change to which version answers (an alias moved, a split or a pin set or ended), with
    the state before it, so that it can be undone in one step (``registry.rollout_undo``)."""

    class Kind(models.TextChoices):
        ALIAS = "alias"
        SPLIT = "split"
        PIN = "pin"

    model = models.ForeignKey(AIModel, on_delete=models.CASCADE, related_name="+")
    tenant = models.ForeignKey(
        "accounts.Tenant", null=True, blank=True, on_delete=models.CASCADE, related_name="+",
        help_text="The hospital a split or a pin belongs to; empty for an alias.",
    )  # fmt: skip
    kind = models.CharField(max_length=8, choices=Kind.choices)
    name = models.CharField(max_length=20, blank=True, help_text="The alias moved.")
    before = models.JSONField(help_text="The state before: version id and percent, or null for none.")
    after = models.JSONField(help_text="The state after, the same way.")
    changed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    forced = models.BooleanField(default=False, help_text="Made with --force past the agreement floor.")
    created = models.DateTimeField(default=timezone.now)
    undone_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["model", "tenant", "kind", "-id"], name="rollout_change_latest")]

    def __str__(self) -> str:
        return f"{self.kind} change of {self.model_id} at {self.created:%Y-%m-%d %H:%M}"


class InferenceRequest(TenantOwned):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"
        CANCELLED = "cancelled"  # its bulk job was cancelled before it ran

    class Priority(models.IntegerChoices):
        INTERACTIVE = 0  # a person is waiting: always claimed first
        BULK = 1  # batch jobs: claimed round-robin across hospitals

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="inference_requests")
    priority = models.PositiveSmallIntegerField(choices=Priority.choices, default=Priority.INTERACTIVE)
    claimed_by = models.CharField(max_length=200, blank=True, help_text="host:pid of the worker running it")
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)
    error = models.CharField(max_length=ERROR_LENGTH, blank=True)
    attempts = models.PositiveIntegerField(default=0)
    batch_size = models.PositiveIntegerField(null=True, blank=True)
    wait_ms = models.PositiveIntegerField(null=True, blank=True, help_text="From queued to claimed.")
    inference_ms = models.PositiveIntegerField(null=True, blank=True, help_text="From claimed to stored.")
    created = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # a transient error (a storage or network blip) sent it back to the queue this many times;
    # it is not claimed again before retry_after (backoff), and fails at SIGHTLINE_TRANSIENT_RETRIES
    transient_retries = models.PositiveIntegerField(default=0)
    retry_after = models.DateTimeField(null=True, blank=True)
    shadow = models.BooleanField(
        default=False,
        help_text="A shadow read: the other arm of an A/B split reading the same image, in the bulk lane; "
        "its result is compared, never shown to clinicians.",
    )
    protocol = models.CharField(
        max_length=16, choices=PROTOCOL_CHOICES, blank=True, help_text="The model-server protocol it came by."
    )
    # the browser's screen (untrusted) may reorder work only inside its hospital's own turns:
    # SCREEN_FIRST runs before the hospital's other requests of its priority, never before another
    # hospital's turn; a confident negative sent to the bulk lane is read anyway at read_by
    screen_order = models.PositiveSmallIntegerField(
        default=1,
        db_default=1,
        help_text="0: the browser's screen called it suspicious (first within its hospital's turns).",
    )
    read_by = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Screened confidently negative and sent to the bulk lane: moved to the interactive lane at "
        "this time if it still waits.",
    )

    class Meta:
        indexes = [
            # the worker's claim: queued requests of one model version, oldest first
            models.Index(fields=["model_version", "status", "priority", "id"], name="inference_claim"),
            models.Index(fields=["status", "claimed_by"], name="inference_running"),
            # /metrics reads the requests finished in its window, never the whole history
            models.Index(fields=["finished_at"], name="inference_finished"),
            # beat moves screened negatives whose wait is over to the interactive lane
            models.Index(fields=["status", "read_by"], name="inference_read_by"),
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
    # Grad-CAM is made on request (recognition/services/heatmaps.py), never on the read path: when
    # it was last asked of a worker (a request older than SIGHTLINE_HEATMAP_STALL_SECONDS is sent
    # again: its message may be lost), and why it cannot be made, in words, once a worker gave up
    heatmap_requested_at = models.DateTimeField(null=True, blank=True)
    heatmap_error = models.CharField(max_length=REASON_LENGTH, blank=True)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["image", "model_version"], name="one_result_per_image_and_version")
        ]


class Review(TenantOwned):
    """A clinician's reading of an AI finding. Drafts may change; once signed off a review never
    does: an amendment is a new review pointing at the one it amends, and the history stays."""

    class Verdict(models.TextChoices):
        AGREE = "agree"
        DISAGREE = "disagree"
        CORRECT = "correct", "corrected label"

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="reviews")
    result = models.ForeignKey(Result, null=True, blank=True, on_delete=models.PROTECT, related_name="reviews")
    model_version = models.ForeignKey(ModelVersion, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    ai_label = models.CharField(max_length=100, blank=True, help_text="The AI's top label that was reviewed.")
    verdict = models.CharField(max_length=16, choices=Verdict.choices)
    label = models.CharField(max_length=100, blank=True, help_text="The clinician's label.")
    comment = models.TextField(blank=True, max_length=2000)
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    amends = models.ForeignKey("self", null=True, blank=True, on_delete=models.PROTECT, related_name="amendments")
    created = models.DateTimeField(default=timezone.now)
    updated = models.DateTimeField(default=timezone.now)
    signed_off_at = models.DateTimeField(null=True, blank=True)
    signed_off_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )

    class Meta:
        indexes = [
            models.Index(fields=["image", "-created", "-id"], name="review_history"),
            models.Index(fields=["model_version", "signed_off_at"], name="review_agreement"),
        ]

    @property
    def is_signed(self) -> bool:
        return self.signed_off_at is not None

    def save(self, *args, **kwargs):
        if self.pk is not None and Review.objects.filter(pk=self.pk, signed_off_at__isnull=False).exists():
            raise ValueError("a signed-off review is never changed; amend it with a new review")
        super().save(*args, **kwargs)


class BatchJob(TenantOwned):
    """A bulk job: many images read by one model version at bulk priority, with progress,
    cancel, retry and results for the whole job."""

    class Status(models.TextChoices):
        OPEN = "open"  # taking items, not started
        RUNNING = "running"
        CANCELLED = "cancelled"

    name = models.CharField(max_length=JOB_NAME_LENGTH)
    model_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    idempotency_key = models.CharField(max_length=IDEMPOTENCY_KEY_LENGTH, blank=True)
    created = models.DateTimeField(default=timezone.now)
    started_at = models.DateTimeField(null=True, blank=True)
    # the latest start or retry: the pace and time left are measured from here
    resumed_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "created_by", "idempotency_key"],
                condition=~Q(idempotency_key=""),
                name="batchjob_idempotency_key_unique",
            )
        ]
        indexes = [models.Index(fields=["tenant", "-created", "-id"], name="batchjob_tenant_created")]

    def __str__(self) -> str:
        return f"job {self.pk} ({self.name})"


class BatchUpload(TenantOwned):
    """One archive (or storage prefix) added to a job: expanded into items by a worker task.
    A job cannot start while one of its uploads is still being expanded."""

    class Status(models.TextChoices):
        RECEIVING = "receiving"  # the archive is being stored under `source`; a crash leaves it so
        RECEIVED = "received"
        EXPANDING = "expanding"
        COMPLETE = "complete"
        REFUSED = "refused"

    SOURCE_MAX_LENGTH = 255

    job = models.ForeignKey(BatchJob, on_delete=models.CASCADE, related_name="uploads")
    kind = models.CharField(max_length=16, choices=[("zip", "zip archive"), ("prefix", "storage prefix")])
    source = models.CharField(
        max_length=SOURCE_MAX_LENGTH, help_text="The stored archive's key, or the storage prefix."
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RECEIVED)
    error = models.CharField(max_length=REASON_LENGTH, blank=True)
    entries = models.PositiveIntegerField(default=0)
    created = models.DateTimeField(default=timezone.now)
    # the last sign of life of whoever is storing or expanding it; reconciliation takes over
    # an upload that has shown none for SIGHTLINE_UPLOAD_STALL_SECONDS
    touched_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # unpacking attempts in a row that made no new item; at SIGHTLINE_UPLOAD_MAX_ATTEMPTS it is refused
    attempts = models.PositiveSmallIntegerField(default=0)
    # raised by every claim: an expander writes only while the claim it took is still the upload's
    claim = models.PositiveIntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.kind} upload {self.pk} of job {self.job_id}"


class BatchItem(TenantOwned):
    """One image of a job, or one entry that could not become an image (failed, with why)."""

    class Status(models.TextChoices):
        PENDING = "pending"  # added, the job not started
        QUEUED = "queued"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"
        CANCELLED = "cancelled"

    job = models.ForeignKey(BatchJob, on_delete=models.CASCADE, related_name="items")
    upload = models.ForeignKey(BatchUpload, null=True, blank=True, on_delete=models.CASCADE, related_name="items")
    position = models.PositiveIntegerField(help_text="Its place in the upload (zip entry or file index).")
    image = models.ForeignKey(Image, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    request = models.ForeignKey(
        InferenceRequest, null=True, blank=True, on_delete=models.SET_NULL, related_name="batch_items"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    error = models.CharField(max_length=ERROR_LENGTH, blank=True)
    created = models.DateTimeField(default=timezone.now)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            # an archive expanded twice (a worker died half-way) never makes an entry twice
            models.UniqueConstraint(
                fields=["upload", "position"], condition=Q(upload__isnull=False), name="batchitem_once_per_entry"
            )
        ]
        indexes = [
            models.Index(fields=["job", "status"], name="batchitem_job_status"),
            models.Index(fields=["job", "id"], name="batchitem_job_order"),
        ]


# a hospital's defaults for screened negatives (both off until it turns the routing on): a screen
# that sure of "no finding" is wrong rarely enough to wait (the agreement page says how rarely), and
# a quarter of an hour keeps the bulk lane's wait within a clinician's session
SCREEN_NEGATIVE_THRESHOLD = 0.95
SCREEN_NEGATIVE_MAX_WAIT_SECONDS = 15 * 60


class HospitalSettings(TenantOwned):
    """The settings that are a hospital's own, changed by its tenant admins on the hospital
    settings page (platform staff's settings live elsewhere); every change is access-logged.
    One row per hospital; a hospital without one has the defaults."""

    screening_enabled = models.BooleanField(
        default=False, help_text="Screen PNG and JPEG files in the reader's browser before upload."
    )
    screening_version = models.ForeignKey(
        ModelVersion,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="The screening model the browser runs: a ready version whose manifest says role: screening.",
    )
    route_negatives_to_bulk = models.BooleanField(
        default=False,
        help_text="Send images the screen calls confidently negative to the bulk lane (read anyway after the "
        "maximum wait).",
    )
    negative_threshold = models.FloatField(
        default=SCREEN_NEGATIVE_THRESHOLD,
        help_text="The screen's probability of its negative label (the manifest's first) at or above which an "
        "image counts as confidently negative.",
    )
    negative_max_wait_seconds = models.PositiveIntegerField(
        default=SCREEN_NEGATIVE_MAX_WAIT_SECONDS,
        help_text="The longest a screened negative waits in the bulk lane before it is read anyway.",
    )
    updated = models.DateTimeField(default=timezone.now)
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        verbose_name_plural = "hospital settings"
        constraints = [
            models.UniqueConstraint(fields=["tenant"], name="hospital_settings_one_per_tenant"),
            models.CheckConstraint(
                condition=models.Q(negative_threshold__gt=0) & models.Q(negative_threshold__lt=1),
                name="hospital_settings_threshold_between_0_and_1",
            ),
        ]


class PreliminaryResult(TenantOwned):
    """The browser's screen of an image, made before upload: untrusted input from the client.
    Shown as preliminary beside the server's read, used to order work within the hospital's
    share, compared with the server's read on the agreement page; never exported, sent to a
    PACS or counted as a finding."""

    class Route(models.TextChoices):
        FIRST = "first", "suspicious: first in its hospital's turns"
        NORMAL = "normal", "in order"
        BULK = "bulk", "confidently negative: bulk lane"

    image = models.OneToOneField(Image, on_delete=models.CASCADE, related_name="preliminary")
    screening_version = models.ForeignKey(ModelVersion, on_delete=models.PROTECT, related_name="+")
    probabilities = models.JSONField()
    top_label = models.CharField(max_length=100)
    top_probability = models.FloatField()
    quality_flags = models.JSONField(
        default=list, help_text="The browser's quality heuristics that fired: blank, saturated, unfamiliar."
    )
    ood_score = models.FloatField(null=True, blank=True, help_text="The screen's out-of-distribution score, 0-1.")
    latency_ms = models.PositiveIntegerField(null=True, blank=True, help_text="Decode to label, in the browser.")
    route = models.CharField(max_length=8, choices=Route.choices, default=Route.NORMAL)
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        indexes = [models.Index(fields=["tenant", "screening_version"], name="preliminary_by_version")]
