"""The model registry, web side: submit immutable versions (a worker runs their checks, in
``workers/registration.py``), move aliases, split and pin hospitals, route an upload."""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.cache import cache
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from accounts.services import access_event_record
from core.errors import Conflict, Invalid, NotFound
from core.model_package import ROLE_READS, ROLE_SCREENING, PackageError, file_sha256, read_manifest

from ..enqueue import task_send
from ..models import (
    SPLIT_PERCENT_MAX,
    SPLIT_PERCENT_MIN,
    AIModel,
    ModelAlias,
    ModelAllowance,
    ModelPin,
    ModelVersion,
    RolloutChange,
    TrafficSplit,
)
from ..storage import model_package_key

logger = logging.getLogger(__name__)


def model_version_submit(
    *,
    package_path: Path,
    registered_by=None,
    alias: str | None = None,
    enqueue: bool = True,
    browser_distribution_allowed: bool = False,
) -> tuple[ModelVersion, bool]:
    """Store a package and create its version ``validating``; a worker runs the registration
    checks (``model_version_validate``, after commit) and makes it ready or refused. Nothing
    here loads the model: this runs in the web process. Returns (version, created).

    Registering the same bytes again changes nothing (a refused version is checked again, for
    a setting may have changed); other bytes under an existing version number are refused,
    since versions are immutable. ``alias`` moves to the version once it is ready.

    A screening package (manifest ``role: screening``) runs in readers' browsers, so its weights
    are sent to them: ``browser_distribution_allowed`` is the operator's confirmation that its
    licence allows that (recorded as ``browser_confirmed_at``), and without it the package is
    refused. A screening version takes no alias, and a model is either a reads model or a
    screening model: a version of the other role is refused.
    """
    if alias and alias not in ModelAlias.Name.values:
        raise Invalid(f"{alias!r} is not an alias; use one of {', '.join(ModelAlias.Name.values)}.", code="bad_alias")
    try:
        manifest = read_manifest(package_path)
    except PackageError as exc:
        raise Invalid(f"The model package was refused: {exc}", code="model_refused") from exc
    _screening_rules(manifest, alias=alias, browser_distribution_allowed=browser_distribution_allowed)
    package_sha256 = file_sha256(package_path)

    existing = ModelVersion.objects.filter(model__name=manifest.name, version=manifest.version).first()
    if existing is not None:
        if existing.weights_sha256 != manifest.weights_sha256 or (
            existing.package_sha256 and existing.package_sha256 != package_sha256
        ):
            raise Invalid(
                f"{manifest.name} {manifest.version} is already registered with other contents; "
                "versions are immutable, register a new version number.",
                code="version_exists",
            )
        if existing.status == ModelVersion.Status.REFUSED:
            _validate_again(existing, registered_by=registered_by, alias=alias, enqueue=enqueue)
        elif existing.status == ModelVersion.Status.VALIDATING and enqueue:
            # its first message may have been lost (a broker outage): ask again; the checks
            # decide once, whichever task runs them first
            transaction.on_commit(lambda: model_validation_enqueue(existing.pk), robust=True)
        return existing, False

    # named by the whole package's checksum: the same bytes are stored once, however often
    # a registration is retried or rolled back
    stored_name = model_package_key(name=manifest.name, version=manifest.version, sha256=package_sha256)
    stored_here = not default_storage.exists(stored_name)
    if stored_here:
        with open(package_path, "rb") as handle:
            stored_name = default_storage.save(stored_name, File(handle))
    try:
        with transaction.atomic():
            model, _ = AIModel.objects.get_or_create(
                name=manifest.name, defaults={"description": manifest.description, "is_demo": manifest.demo}
            )
            version = ModelVersion.objects.create(
                model=model,
                version=manifest.version,
                manifest=manifest.to_dict(),
                package=stored_name,
                weights_sha256=manifest.weights_sha256,
                package_sha256=package_sha256,
                registered_by=registered_by,
                status=ModelVersion.Status.VALIDATING,
                requested_alias=alias or "",
                browser_confirmed_at=timezone.now() if manifest.screening else None,
            )
            access_event_record(
                action="model.register", user=registered_by, target_type="model_version", target_id=version.pk
            )
            if enqueue:
                transaction.on_commit(lambda: model_validation_enqueue(version.pk), robust=True)
    except BaseException:
        if stored_here:
            default_storage.delete(stored_name)
        raise
    return version, True


def _screening_rules(manifest, *, alias: str | None, browser_distribution_allowed: bool) -> None:
    if manifest.screening and not browser_distribution_allowed:
        raise Invalid(
            f"{manifest.name} {manifest.version} is a screening model: it runs in readers' browsers, so its "
            "weights are sent to every reader's computer. Confirm that its licence allows that "
            "(register_model --browser-distribution-allowed); it was not registered.",
            code="browser_distribution_unconfirmed",
        )
    if manifest.screening and alias:
        raise Invalid(
            f"{manifest.name} {manifest.version} is a screening model: it never makes a hospital's reads, "
            f"so it takes no {alias} alias.",
            code="screening_version",
        )
    model = AIModel.objects.filter(name=manifest.name).first()
    if model is not None:
        role = model_role(model)
        if role and role != manifest.role:
            raise Invalid(
                f"{manifest.name} is a {role} model and this package is a {manifest.role} model: a model is either "
                "a reads model or a screening model; register it under a name of its own.",
                code="model_role_mismatch",
            )


def model_role(model: AIModel) -> str:
    """``reads`` or ``screening``: what the model's versions are (all the same, by
    ``model_version_submit``'s rule); "" for a model with no version yet."""
    manifest = ModelVersion.objects.filter(model=model).values_list("manifest", flat=True).first()
    if manifest is None:
        return ""
    return manifest.get("role", ROLE_READS)


def is_screening(version: ModelVersion) -> bool:
    return version.manifest.get("role", ROLE_READS) == ROLE_SCREENING


def refuse_screening(version: ModelVersion | None, what: str) -> None:
    """A screening version is never the model that makes a hospital's reads (409, in words)."""
    if version is not None and is_screening(version):
        raise Conflict(
            f"{version} is a screening model: a preliminary screen in the reader's browser, never the model "
            f"that makes a hospital's reads, so it cannot be given {what}.",
            code="screening_version",
        )


def _validate_again(version: ModelVersion, *, registered_by, alias: str | None, enqueue: bool) -> None:
    with transaction.atomic():
        updated = ModelVersion.objects.filter(pk=version.pk, status=ModelVersion.Status.REFUSED).update(
            status=ModelVersion.Status.VALIDATING, refusal_reason="", validated_at=None, requested_alias=alias or ""
        )
        if updated:
            access_event_record(
                action="model.revalidate", user=registered_by, target_type="model_version", target_id=version.pk
            )
            if enqueue:
                transaction.on_commit(lambda: model_validation_enqueue(version.pk), robust=True)
    version.refresh_from_db()


def model_validation_enqueue(version_id: int) -> None:
    """Ask a worker for the registration checks. With the broker away the version stays
    validating; beat's reconciliation (``workers.tasks.model_validate_reconcile``) asks again."""
    task_send("workers.tasks.model_validate", args=[version_id])


def model_version_require_ready(*, version: ModelVersion | None) -> None:
    """Aliases, splits and pins point only at versions that passed the registration checks."""
    if version is not None and version.status != ModelVersion.Status.READY:
        reason = f" ({version.refusal_reason})" if version.refusal_reason else ""
        raise Conflict(
            f"{version} is {version.status}{reason}: only a version that passed the registration checks "
            "can be given an alias, a split or a pin.",
            code="model_not_ready",
        )


def _version_of(model: AIModel, version: ModelVersion) -> None:
    if version.model_id != model.pk:
        raise Invalid(f"{version} is not a version of {model.name}.", code="wrong_model")


def derived_below_floor(version: ModelVersion) -> str:
    """Why a derived version may not answer as ``production``, in words, or "" when it may: its
    top-label agreement with its parent (measured at registration) is under
    ``SIGHTLINE_DERIVED_AGREEMENT_FLOOR``, or it was never measured."""
    if version.derived_from_id is None and not version.manifest.get("derived_from"):
        return ""
    floor = settings.SIGHTLINE_DERIVED_AGREEMENT_FLOOR
    evaluation = version.evaluation or {}
    agreement = evaluation.get("agreement")
    if agreement is None:
        return f"{version} is derived from another version and was not measured against it"
    if agreement >= floor:
        return ""
    return (
        f"{version} agrees with {evaluation.get('parent', {}).get('version', 'its parent')} on "
        f"{agreement:.1%} of {evaluation.get('images', '?')} held-out images (floor {floor:.0%}; "
        f"mean probability difference {evaluation.get('mean_abs_diff', 0):.3g}, worst "
        f"{evaluation.get('max_abs_diff', 0):.3g})"
    )


def _state(version_id: int | None, percent: int | None = None) -> dict:
    """A RolloutChange's before/after: what answered, or {} for nothing (no alias, split or pin)."""
    if version_id is None:
        return {}
    return {"version": version_id} if percent is None else {"version": version_id, "percent": percent}


def _rollout_record(
    *, model: AIModel, kind: str, before, after, tenant=None, name: str = "", changed_by=None, forced: bool = False
) -> RolloutChange:
    return RolloutChange.objects.create(
        model=model,
        tenant=tenant,
        kind=kind,
        name=name,
        before=before,
        after=after,
        changed_by=changed_by if changed_by is not None and changed_by.is_authenticated else None,
        forced=forced,
    )


def model_alias_move(
    *,
    model: AIModel,
    alias: str,
    version: ModelVersion,
    moved_by=None,
    request=None,
    force: bool = False,
    _undo_of: RolloutChange | None = None,
) -> ModelAlias:
    """Point ``alias`` at ``version``. A derived version under the agreement floor is refused
    the production alias (409, with its numbers) unless ``force``, which is logged as forced."""
    if alias not in ModelAlias.Name.values:
        raise Invalid(f"{alias!r} is not an alias; use one of {', '.join(ModelAlias.Name.values)}.", code="bad_alias")
    _version_of(model, version)
    refuse_screening(version, f"the {alias} alias")
    model_version_require_ready(version=version)
    below = derived_below_floor(version) if alias == ModelAlias.Name.PRODUCTION else ""
    if below and not force:
        raise Conflict(
            f"{below}: it cannot be given the production alias without force.",
            code="below_agreement_floor",
            detail={"evaluation": version.evaluation, "floor": settings.SIGHTLINE_DERIVED_AGREEMENT_FLOOR},
        )
    forced = bool(below)
    with transaction.atomic():
        current = ModelAlias.objects.select_for_update().filter(model=model, name=alias).first()
        before = _state(current.version_id if current else None)
        row, _ = ModelAlias.objects.update_or_create(
            model=model, name=alias, defaults={"version": version, "updated": timezone.now()}
        )
        _rollout_change(
            _undo_of,
            model=model,
            kind=RolloutChange.Kind.ALIAS,
            name=alias,
            before=before,
            after=_state(version.pk),
            changed_by=moved_by,
            forced=forced,
        )
        access_event_record(
            action="model.alias_move_forced" if forced else "model.alias_move",
            request=request,
            user=moved_by,
            target_type="model_alias",
            target_id=row.pk,
        )
    return row


def _rollout_change(undo_of: RolloutChange | None, **fields) -> None:
    """Every change writes its row; an undo marks the change it reverts instead of adding one
    (so that undoing twice goes one step further back, not back and forth)."""
    if undo_of is None:
        _rollout_record(**fields)
    else:
        RolloutChange.objects.filter(pk=undo_of.pk).update(undone_at=timezone.now())


def traffic_split_set(
    *,
    tenant,
    model: AIModel,
    version: ModelVersion | None,
    percent: int,
    changed_by=None,
    request=None,
    _undo_of: RolloutChange | None = None,
) -> TrafficSplit | None:
    """Send ``percent`` of the hospital's images to ``version``; 0 (or no version) ends the split."""
    with transaction.atomic():
        current = TrafficSplit.objects.for_tenant(tenant).select_for_update().filter(model=model).first()
        before = _state(current.version_id, current.percent) if current else {}
        if not percent or version is None:
            if current is not None:
                current.delete()
            split = None
        else:
            if not SPLIT_PERCENT_MIN <= percent <= SPLIT_PERCENT_MAX:
                raise Invalid(
                    f"A split sends {SPLIT_PERCENT_MIN}-{SPLIT_PERCENT_MAX}% of images to the other version.",
                    code="bad_percent",
                )
            _version_of(model, version)
            refuse_screening(version, "a traffic split")
            model_version_require_ready(version=version)
            split, _ = TrafficSplit.objects.update_or_create(
                tenant=tenant,
                model=model,
                defaults={"version": version, "percent": percent, "updated": timezone.now(), "updated_by": changed_by},
            )
        _rollout_change(
            _undo_of,
            model=model,
            tenant=tenant,
            kind=RolloutChange.Kind.SPLIT,
            before=before,
            after=_state(split.version_id, split.percent) if split else {},
            changed_by=changed_by,
        )
        access_event_record(
            action="model.split_change",
            request=request,
            user=changed_by,
            tenant=tenant,
            target_type="model",
            target_id=model.pk,
        )
    return split


def model_pin_set(
    *,
    tenant,
    model: AIModel,
    version: ModelVersion | None,
    changed_by=None,
    request=None,
    _undo_of: RolloutChange | None = None,
):
    """Keep the hospital on ``version`` whatever the aliases say; None removes the pin."""
    with transaction.atomic():
        current = ModelPin.objects.for_tenant(tenant).select_for_update().filter(model=model).first()
        before = _state(current.version_id) if current else {}
        if version is None:
            ModelPin.objects.for_tenant(tenant).filter(model=model).delete()
            pin = None
        else:
            _version_of(model, version)
            refuse_screening(version, "a pin")
            model_version_require_ready(version=version)
            pin, _ = ModelPin.objects.update_or_create(
                tenant=tenant,
                model=model,
                defaults={"version": version, "updated": timezone.now(), "updated_by": changed_by},
            )
        _rollout_change(
            _undo_of,
            model=model,
            tenant=tenant,
            kind=RolloutChange.Kind.PIN,
            before=before,
            after=_state(pin.version_id) if pin else {},
            changed_by=changed_by,
        )
        access_event_record(
            action="model.pin_change",
            request=request,
            user=changed_by,
            tenant=tenant,
            target_type="model",
            target_id=model.pk,
        )
    return pin


def rollout_undo(*, model: AIModel, tenant=None, kind: str = "", undone_by=None, request=None) -> RolloutChange:
    """Revert the latest change not yet undone (of ``kind`` when given: alias, split or pin; of
    ``tenant``'s splits and pins, or the aliases when no tenant) in one step, through the same
    functions that made it (ready checks, the access log); that change is marked undone. An alias
    is put back past the agreement floor without force: it answered before. 409 when nothing
    is left to undo."""
    changes = RolloutChange.objects.filter(model=model, undone_at__isnull=True)
    changes = changes.filter(tenant=tenant) if tenant is not None else changes.filter(tenant__isnull=True)
    if kind:
        if kind not in RolloutChange.Kind.values:
            raise Invalid(f"{kind!r} is not a kind of change; use {', '.join(RolloutChange.Kind.values)}.")
        changes = changes.filter(kind=kind)
    with transaction.atomic():
        change = changes.select_for_update().order_by("-created", "-id").first()
        if change is None:
            where = f" for {tenant.slug}" if tenant is not None else ""
            raise Conflict(
                f"There is no {kind or 'rollout'} change of {model.name}{where} left to undo.", code="nothing_to_undo"
            )
        before = change.before or {}
        target = ModelVersion.objects.filter(pk=before["version"]).first() if before.get("version") else None
        if change.kind == RolloutChange.Kind.ALIAS:
            if target is None:  # the alias did not exist before: it goes
                ModelAlias.objects.filter(model=model, name=change.name).delete()
                RolloutChange.objects.filter(pk=change.pk).update(undone_at=timezone.now())
            else:
                model_alias_move(
                    model=model,
                    alias=change.name,
                    version=target,
                    moved_by=undone_by,
                    request=request,
                    force=True,
                    _undo_of=change,
                )
        elif change.kind == RolloutChange.Kind.SPLIT:
            traffic_split_set(
                tenant=change.tenant,
                model=model,
                version=target,
                percent=before.get("percent", 0),
                changed_by=undone_by,
                request=request,
                _undo_of=change,
            )
        else:
            model_pin_set(
                tenant=change.tenant,
                model=model,
                version=target,
                changed_by=undone_by,
                request=request,
                _undo_of=change,
            )
        access_event_record(
            action="model.rollout_undo",
            request=request,
            user=undone_by,
            tenant=change.tenant,
            target_type="rollout_change",
            target_id=change.pk,
        )
    change.refresh_from_db()
    return change


def model_version_list() -> QuerySet[ModelVersion]:
    """Every registered version, newest first, with its status (platform-wide, not tenant data).
    Kept beside the registry's writes: the registry is one small area with no selectors module
    of its own."""
    return ModelVersion.objects.select_related("model").order_by("-created", "-id")


_BUCKET_BYTES = 4  # of the digest: 32 bits, plenty to spread 0-99 evenly


def split_bucket(image_id: int) -> int:
    """0-99, fixed per image, so a retry of the same image lands on the same version."""
    digest = hashlib.sha256(f"sightline-split:{image_id}".encode()).digest()
    return int.from_bytes(digest[:_BUCKET_BYTES], "big") % 100


@dataclass(frozen=True)
class Routing:
    """Which version reads a hospital's images: read once per upload, asked per image."""

    pin: ModelVersion | None
    split: TrafficSplit | None
    production: ModelVersion | None
    # how the reads it places are queued: the lane (InferenceRequest.Priority; 0 interactive) and
    # the model-server protocol they came by ("" for the platform's own upload)
    priority: int = 0
    protocol: str = ""

    def version_for(self, image_id: int | None) -> ModelVersion | None:
        """Pin, else split (when there is an image to place), else the production alias."""
        if self.pin is not None:
            return self.pin
        if self.split is not None and image_id is not None and split_bucket(image_id) < self.split.percent:
            return self.split.version
        return self.production


# --- the routing, remembered per process ---------------------------------------------------------
# Building model_routing's query (three subqueries, compiled by the ORM on every call) was 23% of
# an upload's web CPU, ~4.6 core-ms, for an answer that changes when an operator moves an alias,
# a split or a pin. Each process keeps the answers it read, tagged with a generation number in the
# shared cache; every change to a routing row clears this process's answers at once and, after
# commit, counts the generation up, so every other web process reads afresh on its next upload.
# A change whose count-up was lost (the process died between commit and count) is read by all
# within ROUTING_REMEMBER_SECONDS. With the shared cache away nothing is remembered. Routing is
# not access: who may upload is still read on every request (accounts.authentication).
ROUTING_GENERATION_KEY = "sightline:routing-generation"
ROUTING_REMEMBER_SECONDS = 30
_routing_remembered: dict[tuple[int, str], tuple[int, float, Routing]] = {}


def _routing_generation() -> int | None:
    try:
        return int(cache.get(ROUTING_GENERATION_KEY, 0))
    except Exception:  # the shared cache away: read the database every time
        logger.warning("routing generation not readable; reading the routing afresh", exc_info=True)
        return None


def routing_changed() -> None:
    """A routing row (alias, split, pin, version, model) changed: this process forgets at once,
    the others after commit (the receivers in recognition/apps.py call it on every save and
    delete; a queryset ``update`` of those rows must call it itself)."""
    _routing_remembered.clear()

    def count_up() -> None:
        _routing_remembered.clear()  # what a thread read before the commit is older too
        try:
            cache.add(ROUTING_GENERATION_KEY, 0, timeout=None)
            cache.incr(ROUTING_GENERATION_KEY)
        except Exception:  # other processes read it within ROUTING_REMEMBER_SECONDS
            logger.warning("routing generation not counted up", exc_info=True)

    transaction.on_commit(count_up, robust=True)


def routing_forget() -> None:
    """This process's remembered routing, gone (tests start each case with none)."""
    _routing_remembered.clear()


def model_routing(*, tenant, model_name: str) -> Routing:
    """The hospital's routing for one model, read once per upload and remembered by the process
    until a routing row changes (above). Read inside a transaction it is not remembered: that
    transaction may still roll back what it read."""
    generation = _routing_generation()
    key = (tenant.pk, model_name)
    if generation is not None:
        remembered = _routing_remembered.get(key)
        if remembered is not None and remembered[0] == generation and remembered[1] > time.monotonic():
            return remembered[2]
    routing = _model_routing_read(tenant=tenant, model_name=model_name)
    if generation is not None and not transaction.get_connection().in_atomic_block:
        _routing_remembered[key] = (generation, time.monotonic() + ROUTING_REMEMBER_SECONDS, routing)
    return routing


def _model_routing_read(*, tenant, model_name: str) -> Routing:
    """One statement in the common case (the production alias, with the hospital's pin and split
    looked up in the same query), a second only when a pin or a split exists (measured: the three
    look-ups were a quarter of an upload's web CPU)."""
    pinned = ModelPin.objects.for_tenant(tenant).filter(model=OuterRef("model")).values("version_id")[:1]
    split = TrafficSplit.objects.for_tenant(tenant).filter(model=OuterRef("model"))
    alias = (
        ModelAlias.objects.select_related("version__model")
        .filter(model__name=model_name, name=ModelAlias.Name.PRODUCTION)
        .annotate(
            pin_id=Subquery(pinned),
            split_version_id=Subquery(split.values("version_id")[:1]),
            split_percent=Subquery(split.values("percent")[:1]),
        )
        .first()
    )
    if alias is None:  # no production alias yet: a pin or a split may still route the hospital
        pin = ModelPin.objects.for_tenant(tenant).select_related("version").filter(model__name=model_name).first()
        split_row = (
            TrafficSplit.objects.for_tenant(tenant).select_related("version").filter(model__name=model_name).first()
        )
        return Routing(pin.version if pin else None, split_row, None)
    if alias.pin_id is None and alias.split_version_id is None:
        return Routing(None, None, alias.version)
    others = ModelVersion.objects.select_related("model").in_bulk([alias.pin_id, alias.split_version_id])
    split_row = None
    if alias.split_version_id is not None:
        split_row = TrafficSplit(
            tenant=tenant,
            model=alias.version.model,
            version=others[alias.split_version_id],
            percent=alias.split_percent,
        )
    return Routing(others.get(alias.pin_id), split_row, alias.version)


def version_for(
    *,
    tenant=None,
    model_name: str = "",
    image_id: int | None = None,
    alias: str = "",
    version: str = "",
    serial: int | None = None,
    routing: Routing | None = None,
    required: bool = False,
) -> ModelVersion | None:
    """The one answer to "which model version" (of ``model_name``, the platform's default model
    when empty):

    - ``version`` (semantic) or ``serial`` (the integer TF Serving and KServe clients name) named:
      that version, which must have passed the registration checks (409);
    - ``alias`` named: the version the alias points at;
    - otherwise the hospital's routing (``routing`` when the caller read it once for an upload,
      else ``model_routing``'s one query): its pin, else its split (when there is an image to
      place), else the production alias; with no hospital, the production alias alone.

    With a hospital, a named version or alias must be one it may use (``version_allowed``): its
    pin if it has one; otherwise the production alias, its split's version, and whatever a
    platform operator has allowed it (``ModelAllowance``). Anything else is a 404
    (``version_not_allowed``), as another hospital's object is.

    None when nothing answers, or, with ``required``, a 404 that says what is missing (no such
    model, version or alias); a named version or alias that is missing is always a 404.
    """
    name = model_name or settings.SIGHTLINE_DEFAULT_MODEL
    if version or serial is not None:
        lookup = {"version": version} if version else {"serial": serial}
        found = ModelVersion.objects.select_related("model").filter(model__name=name, **lookup).first()
        if found is None:
            _require_model(name)
            raise NotFound(f"{name} has no version {version or serial!r}.", code="unknown_version")
        if is_screening(found):  # a screen never reads: as absent as another hospital's object
            raise NotFound(
                f"{found} is a screening model, which never makes a hospital's reads.", code="screening_version"
            )
        if tenant is not None:
            version_allowed(tenant=tenant, version=found, routing=routing)
        model_version_require_ready(version=found)  # 409 for a version still validating or refused
        return found
    if alias:
        row = ModelAlias.objects.select_related("version__model").filter(model__name=name, name=alias).first()
        if row is None:
            _require_model(name)
            raise NotFound(f"{name} has no {alias} alias.", code="unknown_alias")
        if tenant is not None:
            version_allowed(tenant=tenant, version=row.version, alias=alias, routing=routing)
        return row.version
    if routing is None:
        if tenant is not None:
            routing = model_routing(tenant=tenant, model_name=name)
        else:
            production = (
                ModelAlias.objects.select_related("version__model")
                .filter(model__name=name, name=ModelAlias.Name.PRODUCTION)
                .first()
            )
            routing = Routing(None, None, production.version if production else None)
    chosen = routing.version_for(image_id)
    if chosen is None and required:
        _require_model(name)
        raise NotFound(f"{name} has no production alias.", code="unknown_alias")
    return chosen


def _routed_ids(routing: Routing) -> list[int]:
    """The versions the hospital reads with anyway: its pin, else production and its split."""
    if routing.pin is not None:
        return [routing.pin.pk]
    return [v.pk for v in (routing.production, routing.split.version if routing.split else None) if v is not None]


def version_allowed(*, tenant, version: ModelVersion, alias: str = "", routing: Routing | None = None) -> None:
    """Refuse (404, ``version_not_allowed``) a version the hospital may not name: see ``version_for``."""
    routing = routing or model_routing(tenant=tenant, model_name=version.model.name)
    if version.pk in _routed_ids(routing):
        return
    allowances = ModelAllowance.objects.for_tenant(tenant).filter(model_id=version.model_id)
    if allowances.filter(Q(version=version) | (Q(alias=alias) & ~Q(alias=""))).exists():
        return
    uses = f"its pinned version {routing.pin.version}" if routing.pin else "the production alias and its split"
    raise NotFound(
        f"{version.model.name} {version.version} is not available to this hospital: it reads with {uses}; "
        "a platform operator can allow another version or alias for it.",
        code="version_not_allowed",
    )


def versions_available(*, tenant, model: AIModel, routing: Routing | None = None) -> list[ModelVersion]:
    """The ready versions of ``model`` this hospital may name (what ``version_allowed`` lets
    through, aliases resolved), in registration order: what a protocol's model status lists."""
    routing = routing or model_routing(tenant=tenant, model_name=model.name)
    ids = set(_routed_ids(routing))
    allowed = list(ModelAllowance.objects.for_tenant(tenant).filter(model=model))
    ids.update(row.version_id for row in allowed if row.version_id)
    aliases = [row.alias for row in allowed if row.alias]
    if aliases:
        ids.update(ModelAlias.objects.filter(model=model, name__in=aliases).values_list("version_id", flat=True))
    return list(
        ModelVersion.objects.select_related("model")
        .filter(pk__in=ids, status=ModelVersion.Status.READY)
        .order_by("serial")
    )


def model_allowance_set(
    *,
    tenant,
    model: AIModel,
    version: ModelVersion | None = None,
    alias: str = "",
    allowed: bool = True,
    changed_by=None,
) -> ModelAllowance | None:
    """Let the hospital name ``version`` (or ``alias``), or take that back (``allowed=False``); logged."""
    if (version is None) == (not alias):
        raise Invalid("Allow either a version or an alias, not both.", code="bad_allowance")
    if alias and alias not in ModelAlias.Name.values:
        raise Invalid(f"{alias!r} is not an alias; use one of {', '.join(ModelAlias.Name.values)}.", code="bad_alias")
    if version is not None:
        _version_of(model, version)
    if allowed and model_role(model) == ROLE_SCREENING:
        raise Conflict(
            f"{model.name} is a screening model: a hospital never reads with it, so there is nothing to allow; "
            "a hospital chooses its screening model on its settings page.",
            code="screening_version",
        )
    with transaction.atomic():
        rows = ModelAllowance.objects.for_tenant(tenant).filter(model=model, version=version, alias=alias)
        row = None
        if allowed:
            row = rows.first() or ModelAllowance.objects.create(
                tenant=tenant, model=model, version=version, alias=alias, created_by=changed_by
            )
        else:
            rows.delete()
        access_event_record(
            action="model.allowance_change", user=changed_by, tenant=tenant, target_type="model", target_id=model.pk
        )
    return row


def _require_model(name: str) -> None:
    if not AIModel.objects.filter(name=name).exists():
        raise NotFound(f"There is no model called {name!r}.", code="unknown_model")
