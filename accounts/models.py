from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

GENESIS_HASH = "0" * 64
# Widths of access-log fields that callers truncate to (so they must name the same number).
ACTOR_LABEL_LENGTH = 150  # Django's username width
TARGET_ID_LENGTH = 64
USER_AGENT_LENGTH = 256
REQUEST_ID_LENGTH = 64
DESCRIPTION_LENGTH = 200  # a service account's description


class Tenant(models.Model):
    """A hospital. Every clinical row belongs to exactly one."""

    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=64, unique=True)
    is_active = models.BooleanField(default=True)
    require_admin_two_factor = models.BooleanField(
        default=False, help_text="Hospital admins must sign in with a one-time code (TOTP)."
    )
    audit_retention_days = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Access-log entries older than this are pruned by `manage.py prune_audit_log`; empty: kept forever.",
    )
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class TenantQuerySet(models.QuerySet):
    def for_tenant(self, tenant: Tenant | int) -> TenantQuerySet:
        return self.filter(tenant=tenant)


class Role(models.TextChoices):
    VIEWER = "viewer", "Viewer"
    CLINICIAN = "clinician", "Clinician"
    TENANT_ADMIN = "tenant_admin", "Hospital admin"
    AUDITOR = "auditor", "Auditor"


class Membership(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships")
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=20, choices=Role.choices)
    is_active = models.BooleanField(default=True)
    created = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(null=True, blank=True)

    objects = TenantQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "tenant"], name="one_membership_per_hospital")]

    def __str__(self) -> str:
        return f"{self.user} @ {self.tenant.slug} ({self.role})"

    def clean(self) -> None:
        """The service-account rule in words for forms (the Django admin); triggers enforce it."""
        from django.core.exceptions import ValidationError

        account = ServiceAccount.objects.filter(user_id=self.user_id).first() if self.user_id else None
        if account is None:
            return
        if self.role == Role.TENANT_ADMIN:
            raise ValidationError({"role": "A service account cannot be a hospital admin."})
        if account.membership_id != self.pk:
            raise ValidationError("A service account has exactly one membership, in its own hospital.")


class Invitation(models.Model):
    """A single-use link that makes its holder a member with ``role``. Only its hash is stored."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="invitations")
    email = models.EmailField()
    role = models.CharField(max_length=20, choices=Role.choices)
    token_hash = models.CharField(max_length=64, unique=True)
    invited_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    accepted_at = models.DateTimeField(null=True, blank=True)
    accepted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    objects = TenantQuerySet.as_manager()

    def __str__(self) -> str:
        return f"invitation to {self.tenant.slug} as {self.role}"

    @property
    def is_usable(self) -> bool:
        return self.accepted_at is None and self.expires_at > timezone.now()


class TenantOwned(models.Model):
    """Base for every tenant-owned row: reached through ``objects.for_tenant(tenant)``."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+")

    objects = TenantQuerySet.as_manager()

    class Meta:
        abstract = True


class AppendOnlyQuerySet(models.QuerySet):
    def update(self, **kwargs):
        raise TypeError("the access log is append-only")

    def delete(self):
        raise TypeError("the access log is append-only")


class AuditChain(models.Model):
    """The head of one hash chain of the access log: one per hospital, and one for the platform.

    ``first_sequence`` and ``anchor_hash`` move only when old entries are pruned: verification
    starts at the first kept entry, whose ``previous_hash`` must be the anchor."""

    key = models.CharField(max_length=32, unique=True)  # "tenant-<id>" or "platform"
    sequence = models.PositiveBigIntegerField(default=0, help_text="Of the last entry written.")
    head_hash = models.CharField(max_length=64, default=GENESIS_HASH)
    first_sequence = models.PositiveBigIntegerField(default=1)
    anchor_hash = models.CharField(max_length=64, default=GENESIS_HASH)

    def __str__(self) -> str:
        return f"{self.key} at {self.sequence}"


class AuditPrunePermit(models.Model):
    """Exists only inside `prune_audit_log`'s transaction: the database triggers let DELETE
    through on the access log while a row is here, and refuse it otherwise."""

    created = models.DateTimeField(default=timezone.now)

    def __str__(self) -> str:
        return f"prune permit {self.pk}"


class AccessEvent(models.Model):
    """One access to patient data or one security event. Append-only (model, queryset and
    database triggers) and tamper-evident: each hospital's entries form a hash chain.

    Targets are named by type and id only: no patient names or identifiers here.
    """

    class Outcome(models.TextChoices):
        SUCCESS = "success"
        DENIED = "denied"
        FAILED = "failed"

    created = models.DateTimeField(default=timezone.now)
    tenant = models.ForeignKey(Tenant, null=True, blank=True, on_delete=models.PROTECT, related_name="+")
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    actor_label = models.CharField(max_length=ACTOR_LABEL_LENGTH, blank=True)
    action = models.CharField(max_length=64)
    target_type = models.CharField(max_length=64, blank=True)
    target_id = models.CharField(max_length=TARGET_ID_LENGTH, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    ip_address = models.GenericIPAddressField(null=True, blank=True)
    user_agent = models.CharField(max_length=USER_AGENT_LENGTH, blank=True)
    request_id = models.CharField(max_length=REQUEST_ID_LENGTH, blank=True)
    chain = models.CharField(max_length=32)
    sequence = models.PositiveBigIntegerField()
    previous_hash = models.CharField(max_length=64)
    entry_hash = models.CharField(max_length=64)

    objects = AppendOnlyQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["chain", "sequence"], name="accessevent_chain_no_forks")]
        indexes = [
            # the auditor's page: newest first per hospital, and the same with each filter
            models.Index(fields=["tenant", "-created", "-id"], name="accessevent_tenant_created"),
            models.Index(fields=["tenant", "actor", "-created", "-id"], name="accessevent_tenant_actor"),
            models.Index(fields=["tenant", "action", "-created", "-id"], name="accessevent_tenant_action"),
            models.Index(fields=["tenant", "outcome", "-created", "-id"], name="accessevent_tenant_outcome"),
            models.Index(fields=["tenant", "target_type", "target_id"], name="accessevent_tenant_target"),
            models.Index(fields=["-created", "-id"], name="accessevent_created"),  # platform auditors
        ]
        permissions = [("audit_all_hospitals", "Can read every hospital's access log (platform auditor)")]

    def __str__(self) -> str:
        return f"{self.created:%Y-%m-%d %H:%M:%S} {self.actor_label} {self.action} {self.outcome}"

    def save(self, *args, **kwargs):
        if not self._state.adding:
            raise TypeError("the access log is append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise TypeError("the access log is append-only")


# --- Second factor and sign-in limits (accounts/two_factor.py, accounts/lockout.py) ---------


class TwoFactorEnrolmentCode(models.Model):
    """A one-time code that lets ``user`` enrol an authenticator where enrolment needs one (an admin
    of a hospital that requires a second factor, platform staff). Issued by another admin of the
    hospital or by platform staff; only its hash is stored; it expires and works once."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    tenant = models.ForeignKey(
        Tenant, null=True, blank=True, on_delete=models.CASCADE, related_name="+", help_text="Empty: platform staff."
    )
    code_hash = models.CharField(max_length=64, unique=True)
    issued_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"enrolment code {self.pk} for user {self.user_id}"


class RecoveryCode(models.Model):
    """One of the codes shown once at enrolment: single use, in place of an authenticator code."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    code_hash = models.CharField(max_length=64)
    created = models.DateTimeField(default=timezone.now)
    used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "code_hash"], name="recoverycode_unique_per_user")]

    def __str__(self) -> str:
        return f"recovery code {self.pk} for user {self.user_id}"


class KnownSignInAddress(models.Model):
    """An address from which the person completed a sign-in: exempt from the per-account limit."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    ip_address = models.GenericIPAddressField()
    first_seen = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "ip_address"], name="knownaddress_unique")]

    def __str__(self) -> str:
        return f"{self.ip_address} for user {self.user_id}"


class AccountSignInLimit(models.Model):
    """Failed sign-ins against one account from addresses it never signed in from, across all
    addresses. ``subject`` is ``user-<id>`` for an account, or a keyed hash of a name that is no
    account, so that a name that does not exist locks exactly like one that does."""

    subject = models.CharField(max_length=80, unique=True)
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    failures = models.PositiveIntegerField(default=0)
    window_started = models.DateTimeField(null=True, blank=True)
    locked_until = models.DateTimeField(null=True, blank=True)
    notified_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"sign-in limit {self.subject}"


def _api_key_default_rate() -> int:
    return settings.SIGHTLINE_API_KEY_RATE_PER_MINUTE


class ServiceAccount(models.Model):
    """A hospital's unattended client (a nightly job, a protocol client): a Django user with an
    unusable password and exactly one Membership, in this hospital, never as its admin (database
    triggers hold both). It signs in with API keys only; pages, passwords and sessions refuse it."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="service_accounts")
    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="service_account")
    membership = models.OneToOneField(Membership, on_delete=models.PROTECT, related_name="service_account")
    name = models.SlugField(max_length=50, help_text="Unique in its hospital; part of the account's username.")
    description = models.CharField(max_length=DESCRIPTION_LENGTH, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(default=timezone.now)
    revoked_at = models.DateTimeField(null=True, blank=True)
    interactive = models.BooleanField(
        default=False,
        help_text="Its protocol reads go to the interactive lane (a person waits on them); otherwise "
        "they go to the bulk lane with the batch jobs.",
    )

    objects = TenantQuerySet.as_manager()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["tenant", "name"], name="service_account_name_per_hospital")]

    def __str__(self) -> str:
        return f"service account {self.name} @ {self.tenant.slug}"


KEY_SCHEME = "slk_"  # every API key starts with it; nothing else may


class ApiKey(models.Model):
    """A service account's long-lived credential, ``slk_<prefix>_<secret>``. Only the SHA-256 of
    the whole key is kept (the secret has 256 bits: no slow hash needed); the prefix finds it and
    names it in the access log. Revoking it takes effect on the next request and closes its sockets."""

    tenant = models.ForeignKey(Tenant, on_delete=models.PROTECT, related_name="+")
    service_account = models.ForeignKey(ServiceAccount, on_delete=models.PROTECT, related_name="keys")
    prefix = models.CharField(max_length=16, unique=True)
    key_hash = models.CharField(max_length=64, unique=True)
    rate = models.PositiveIntegerField(default=_api_key_default_rate, help_text="Requests per minute.")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(default=timezone.now)
    last_used = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = TenantQuerySet.as_manager()

    class Meta:
        constraints = [models.CheckConstraint(condition=models.Q(rate__gte=1), name="api_key_rate_positive")]

    def __str__(self) -> str:
        return f"key slk_{self.prefix} of {self.service_account.name}"

    @property
    def public_id(self) -> str:
        """What the access log and the pages call this key (the key's first part: not a secret)."""
        return f"slk_{self.prefix}"
