"""Registration's checks, on a worker: the package fetched and checked against its checksum,
loaded on the CPU, asked for an answer; the version ends ready (its requested alias moved) or
refused with the reason. The web process only submits (``recognition.services.registry``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.services import access_event_record
from core.errors import Conflict, Invalid
from core.model_package import (
    CHANNELS,
    ONNX_NAME,
    ROLE_SCREENING,
    SHORT_HASH_CHARS,
    TORCHSCRIPT_REFUSED,
    PackageError,
)
from core.transient import is_transient
from recognition.models import ModelAlias, ModelVersion
from recognition.services.registry import model_alias_move, model_validation_enqueue, model_version_submit
from workers.engine import backends, optimise, screening
from workers.engine.handler import Handler
from workers.model_cache import local_package

logger = logging.getLogger(__name__)
REFUSAL_CHARS = 2000  # of a refusal (a traceback's last lines) kept on the version


def model_version_register(
    *,
    package_path: Path,
    registered_by=None,
    alias: str | None = ModelAlias.Name.PRODUCTION,
    browser_distribution_allowed: bool = False,
) -> tuple[ModelVersion, bool]:
    """Submit and validate in this process, for shell tools and tests (never the web process):
    the synchronous path of the same service. Returns (version, created); a refused package
    raises ``Invalid`` with the reason, and its version stays recorded as refused. A screening
    package takes no alias (pass ``alias=None``) and needs ``browser_distribution_allowed``."""
    version, created = model_version_submit(
        package_path=package_path,
        registered_by=registered_by,
        alias=alias,
        enqueue=False,
        browser_distribution_allowed=browser_distribution_allowed,
    )
    if version.status == ModelVersion.Status.VALIDATING:
        version = model_version_validate(version_id=version.pk)
    if version.status == ModelVersion.Status.REFUSED:
        raise Invalid(f"The model package was refused: {version.refusal_reason}", code="model_refused")
    return version, created


# --- registration checks -------------------------------------------------------------------------


class Refused(Exception):
    """A registration check says no; the message is the reason, in words."""


@dataclass
class Candidate:
    """What the registration checks look at: the version row, its package as a local file
    (fetched from storage and checked against the registered checksum), and the model loaded
    on the CPU by the check that loads it, for the checks after it."""

    version: ModelVersion
    package: Path | None = None
    handler: Handler | None = None
    agreement: dict | None = None  # backend → max abs difference from eager PyTorch


def check_framework_allowed(candidate: Candidate) -> None:
    if candidate.version.manifest.get("framework") == "torchscript" and not settings.SIGHTLINE_ALLOW_TORCHSCRIPT:
        raise Refused(TORCHSCRIPT_REFUSED)


def check_stored_package(candidate: Candidate) -> None:
    """The stored bytes are the ones registered (the whole package's sha256)."""
    candidate.package = local_package(candidate.version)


def check_loads_and_answers(candidate: Candidate) -> None:
    """The weights match their checksum, fit the architecture, the manifest is the registered
    one, and a dummy batch answers one output per label."""
    candidate.handler = Handler.initialize(
        candidate.package,
        candidate.version.weights_sha256,
        device=torch.device("cpu"),
        expected_manifest=candidate.version.manifest,
        allow_torchscript=settings.SIGHTLINE_ALLOW_TORCHSCRIPT,
    )


def check_backends_agree(candidate: Candidate) -> None:
    """The backends the manifest requires agree with eager PyTorch within the stated tolerance,
    and a shipped ``model.onnx`` with the weights; an optional backend that disagrees is only
    never used (workers pick among those that agree when they load the model)."""
    candidate.agreement = backends.verify(candidate.handler)  # PackageError refuses, in words
    logger.info("%s: backends agree with eager PyTorch: %s", candidate.version, candidate.agreement)


def check_derived_against_parent(candidate: Candidate) -> None:
    """A derived version (``optimise_model``): its parent is the registered, ready version its
    manifest names (same weights); it is measured against that parent on a held-out set, here
    on the worker, and the numbers stored on the version (``ModelVersion.evaluation``). The
    held-out set is the one the package carries (``--holdout``), or for the demo model the demo
    generator's (a seed of its own, away from training and calibration). Low agreement does not
    refuse it: it only keeps it from the production alias (``registry.model_alias_move``)."""
    version = candidate.version
    source = version.manifest.get("derived_from")
    if not source:
        return
    parent = ModelVersion.objects.filter(model=version.model, version=source["version"]).first()
    if parent is None or parent.weights_sha256 != source["weights_sha256"]:
        raise Refused(
            f"it says it was made from {version.model.name} {source['version']} with weights "
            f"{source['weights_sha256'][:SHORT_HASH_CHARS]}…, which is not a registered version of this model"
        )
    if parent.status != ModelVersion.Status.READY:
        raise Refused(f"the version it was made from, {parent}, is {parent.status}")
    handler, package = candidate.handler, candidate.package
    if handler is None or package is None:  # check_loads_and_answers runs first
        raise Refused("the model was not loaded before it could be measured")
    holdout = handler.manifest.holdout
    if holdout:
        images, labels = optimise.package_holdout(handler, package)
    elif handler.manifest.demo:
        images, labels = optimise.demo_images(
            optimise.DEMO_HOLDOUT_SEED, optimise.DEMO_HOLDOUT_IMAGES, handler.manifest.input_size
        )
        holdout = f"demo generator, seed {optimise.DEMO_HOLDOUT_SEED}"
    else:
        raise Refused("a derived version needs a held-out set to be measured on: optimise_model --holdout CSV")
    parent_package = local_package(parent)
    parent_handler = Handler.initialize(
        parent_package,
        parent.weights_sha256,
        device=torch.device("cpu"),
        expected_manifest=parent.manifest,
        allow_torchscript=settings.SIGHTLINE_ALLOW_TORCHSCRIPT,
        backend=settings.SIGHTLINE_INFERENCE_BACKEND,  # as this worker would serve it
    )
    evaluation = optimise.evaluate(
        handler,
        parent_handler,
        images,
        labels,
        derived_package=package,
        parent_package=parent_package,
        holdout=holdout,
    )
    evaluation["measured_at"] = timezone.now().isoformat()
    ModelVersion.objects.filter(pk=version.pk).update(derived_from=parent, evaluation=evaluation)
    version.derived_from, version.evaluation = parent, evaluation
    logger.info("%s measured against %s: %s", version, parent, evaluation)


def check_screening(candidate: Candidate) -> None:
    """A screening version: the operator confirmed browser distribution, its ``model.onnx``
    (checked against the manifest by ``check_backends_agree``) takes ``pixels`` uint8 N×3×H×W and
    answers ``probabilities`` then ``logits``, one per label each; measured here and stored on
    the version (``ModelVersion.evaluation``): held-out accuracy (the demo generator's held-out
    set for a demo model; an operator's model keeps the accuracy its manifest states, marked so)
    and the bytes a browser downloads."""
    version = candidate.version
    if version.manifest.get("role") != ROLE_SCREENING:
        return
    if version.browser_confirmed_at is None:
        raise Refused(
            "a screening model's weights go to readers' browsers, and no operator confirmed its licence allows it"
        )
    if candidate.package is None:  # check_stored_package runs first
        raise Refused("the package was not fetched before it could be checked")
    graph = screening.read_onnx(candidate.package)  # PackageError refuses, in words
    onnx_session = screening.session(graph)
    inputs, outputs = onnx_session.get_inputs(), onnx_session.get_outputs()
    names = [output.name for output in outputs]
    if [i.name for i in inputs] != [backends.ONNX_INPUT] or inputs[0].type != "tensor(uint8)":
        raise Refused(f"its {ONNX_NAME} must take one uint8 input named {backends.ONNX_INPUT!r}")
    if names[:2] != [backends.ONNX_OUTPUT, screening.ONNX_LOGITS]:
        raise Refused(
            f"its {ONNX_NAME} answers {names}; a screening graph answers {backends.ONNX_OUTPUT!r} then "
            f"{screening.ONNX_LOGITS!r} (the browser's out-of-distribution score)"
        )
    manifest = candidate.handler.manifest if candidate.handler else None
    size = manifest.input_size if manifest else version.manifest["input_size"]
    probabilities, logits = screening.run_graph(onnx_session, np.zeros((1, CHANNELS, size, size), dtype=np.uint8))
    labels = len(version.manifest["labels"])
    if probabilities.shape != (1, labels) or logits.shape != (1, labels):
        raise Refused(f"its {ONNX_NAME} answers {probabilities.shape[1:]} and {logits.shape[1:]} for {labels} labels")
    stated = version.manifest.get("metrics", {})
    if version.manifest.get("demo") and size == screening.SCREEN_INPUT_SIZE:
        accuracy = screening.held_out_accuracy(onnx_session, seed=stated.get("seed", screening.SCREEN_SEED))
        source, images = "measured: demo generator's held-out set", screening.SCREEN_HELD_OUT_IMAGES
    else:
        accuracy, source, images = stated.get("accuracy"), "stated in the manifest", stated.get("held_out_images")
    evaluation = {
        "kind": "screening",
        "held_out_accuracy": round(accuracy, SCREENING_DIGITS) if isinstance(accuracy, float) else accuracy,
        "held_out_images": images,
        "accuracy_source": source,
        "onnx_bytes": len(graph),
        "package_bytes": candidate.package.stat().st_size,
        "measured_at": timezone.now().isoformat(),
    }
    ModelVersion.objects.filter(pk=version.pk).update(evaluation=evaluation)
    version.evaluation = evaluation
    logger.info("%s checked as a screening model: %s", version, evaluation)


SCREENING_DIGITS = 4  # decimals of a stored accuracy


# In order; each raises Refused or PackageError to refuse, a transient error to be tried again.
# Later checks (agreement across backends, derived-version measurements, screening models)
# are appended here and find the loaded model on ``candidate.handler``.
REGISTRATION_CHECKS: list[Callable[[Candidate], None]] = [
    check_framework_allowed,
    check_stored_package,
    check_loads_and_answers,
    check_backends_agree,
    check_derived_against_parent,
    check_screening,
]


def model_version_validate(*, version_id: int) -> ModelVersion:
    """Run the registration checks on a validating version: ready (and its requested alias
    moved) or refused with the reason. A version already decided is returned as it is, so a
    redelivered task changes nothing. Transient errors (storage away) are raised, for the task
    to try again; any other error refuses the version, in words."""
    version = ModelVersion.objects.select_related("model", "registered_by").get(pk=version_id)
    if version.status != ModelVersion.Status.VALIDATING:
        return version
    candidate = Candidate(version=version)
    for check in REGISTRATION_CHECKS:
        try:
            check(candidate)
        except (Refused, PackageError) as exc:
            return _decide(version, refusal=str(exc))
        except Exception as exc:
            if is_transient(exc):
                raise
            logger.exception("registration check %s failed on %s", check.__name__, version)
            return _decide(version, refusal=f"the check {check.__name__} failed unexpectedly ({type(exc).__name__})")
    return _decide(version, refusal="")


def model_version_reconcile() -> int:
    """Periodic (Celery beat): a version still validating after
    ``SIGHTLINE_MODEL_VALIDATION_STALL_SECONDS`` lost its task (Redis keeps nothing, a worker
    died mid-check): send it again. The checks decide once, whichever task runs them first."""
    before = timezone.now() - timedelta(seconds=settings.SIGHTLINE_MODEL_VALIDATION_STALL_SECONDS)
    stalled = list(
        ModelVersion.objects.filter(status=ModelVersion.Status.VALIDATING, created__lt=before).values_list(
            "pk", flat=True
        )
    )
    for version_id in stalled:
        model_validation_enqueue(version_id)
    return len(stalled)


def model_version_give_up(*, version_id: int, reason: str) -> ModelVersion:
    """The checks could not run (storage away on every attempt): refused, saying so."""
    version = ModelVersion.objects.select_related("model", "registered_by").get(pk=version_id)
    if version.status != ModelVersion.Status.VALIDATING:
        return version
    return _decide(version, refusal=f"the registration checks could not run: {reason}")


def _decide(version: ModelVersion, *, refusal: str) -> ModelVersion:
    status = ModelVersion.Status.REFUSED if refusal else ModelVersion.Status.READY
    with transaction.atomic():
        updated = ModelVersion.objects.filter(pk=version.pk, status=ModelVersion.Status.VALIDATING).update(
            status=status, refusal_reason=refusal[:REFUSAL_CHARS], validated_at=timezone.now()
        )
        if updated:
            access_event_record(
                action="model.ready" if status == ModelVersion.Status.READY else "model.refused",
                user=version.registered_by,
                target_type="model_version",
                target_id=version.pk,
            )
            version.refresh_from_db()
            if status == ModelVersion.Status.READY and version.requested_alias:
                try:
                    model_alias_move(
                        model=version.model,
                        alias=version.requested_alias,
                        version=version,
                        moved_by=version.registered_by,
                    )
                except Conflict as exc:  # a derived version under the agreement floor: ready, not promoted
                    logger.warning("%s is ready but keeps no %s alias: %s", version, version.requested_alias, exc)
    if updated:
        logger.info("model version %s is %s%s", version, status, f": {refusal}" if refusal else "")
    version.refresh_from_db()
    return version
