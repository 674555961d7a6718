"""Pages. Thin: resolve the member's hospital, call a selector or service, render."""

from __future__ import annotations

from datetime import date
from urllib.parse import urlencode

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, HttpResponse, JsonResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_http_methods, require_POST

from accounts.models import Tenant
from accounts.permissions import Action, can
from accounts.selectors import membership_for_session, membership_resolve, memberships_active
from accounts.services import require
from core.cursor import identifiers_refused_in_query
from core.errors import DomainError, Invalid, NotFound, Unprocessable
from core.streaming import streaming_response
from dicomnet.sending import can_resend, study_deliveries

from .agreement import (
    AB_MINIMUM_SAMPLE,
    ab_comparisons,
    agreement_csv,
    agreement_rows,
    agreement_svg,
    screening_agreement,
)
from .display import display_content_type
from .job_selectors import batch_job_get, batch_job_list, batch_jobs_progress
from .models import Image, PreliminaryResult, Review, Study
from .screening import allow_wasm, screening_page_config
from .selectors import (
    WORKLIST_SORTS,
    WorklistFilters,
    image_get,
    image_list,
    image_modality_pixels,
    image_neighbours,
    image_rendering,
    review_history,
    study_get,
    study_worklist,
)
from .services.admission import interactive_admission
from .services.heatmaps import (
    HEATMAP_RETRY_AFTER_SECONDS,
    HeatmapStatus,
    heatmap_request,
    image_heatmap_result,
    result_heatmap_status,
)
from .services.images import image_upload
from .services.jobs import (
    batch_items_add_files,
    batch_job_cancel,
    batch_job_create,
    batch_job_retry,
    batch_job_start,
    batch_results_open,
    batch_upload_zip,
    results_csv,
)
from .services.reviews import review_save, review_sign_off
from .services.screening import (
    MAX_NEGATIVE_WAIT_SECONDS,
    MIN_NEGATIVE_WAIT_SECONDS,
    hospital_settings_get,
    hospital_settings_update,
    screen_parse,
    screening_versions,
)

PAGE_SIZE = 100
JOBS_PAGE = 100  # the jobs page shows the newest; the API pages through all of them


@login_required
@require_POST
def tenant_switch(request):
    membership = membership_resolve(user=request.user, tenant_slug=request.POST.get("tenant", ""), request=request)
    request.session["tenant_slug"] = membership.tenant.slug
    return redirect("recognition:home")


@login_required
def home(request):
    """Where a role starts: images for clinical roles, members for admins, the log for auditors."""
    if request.user.has_perm("accounts.audit_all_hospitals") and not memberships_active(user=request.user).exists():
        return redirect("access-log")  # a platform auditor, outside every hospital
    membership = membership_for_session(request)
    for action, destination in (
        (Action.IMAGE_VIEW, "recognition:worklist"),
        (Action.MEMBERS_MANAGE, "members"),
        (Action.AUDIT_VIEW, "access-log"),
    ):
        if can(membership, action):
            return redirect(destination)
    return redirect("two-factor")


@login_required
def image_list_page(request):
    membership = membership_for_session(request)
    protocol = request.GET.get("protocol", "") in PROTOCOL_FILTER_ON
    images = list(image_list(membership=membership, request=request, protocol=protocol)[:PAGE_SIZE])
    live_config = {
        "tenant": membership.tenant.slug,
        "imageUrl": reverse("recognition:image-detail", args=[0]),
        "apiImage": reverse("api-image-detail", args=[0]),
        "apiList": reverse("api-images"),
    }
    return render(
        request,
        "recognition/image_list.html",
        {
            "images": images,
            "membership": membership,
            "can_upload": can(membership, Action.IMAGE_UPLOAD),
            "live_config": live_config,
        },
    )


@login_required
def image_detail_page(request, image_id: int):
    """The viewer: the image with window/level and the heatmap, the AI finding, the reviews."""
    membership = membership_for_session(request)
    image = image_get(membership=membership, image_id=image_id, request=request)
    previous_id, next_id, position, count = image_neighbours(image)
    result = next(iter(image.results.all()), None)
    # the browser's screen, shown as preliminary beside the server's read (never a finding)
    preliminary = (
        PreliminaryResult.objects.for_tenant(membership.tenant)
        .filter(image=image)
        .select_related("screening_version__model")
        .first()
    )
    explained = image_heatmap_result(image)
    # the viewer asks for the heatmap itself when it opens (GET …/heatmap/), and shows "computing…"
    heatmap_status = result_heatmap_status(explained) if explained else HeatmapStatus.UNAVAILABLE
    reviews = review_history(image=image)
    latest = reviews[0] if reviews else None
    draft = latest if latest is not None and not latest.is_signed and latest.author_id == request.user.pk else None
    in_progress = image.ai_status in ("queued", "running") or image.state == Image.State.RECEIVED
    live_config = {
        "tenant": membership.tenant.slug,
        "apiImage": reverse("api-image-detail", args=[image.pk]),
        "heatmapImage": image.pk,  # heatmap.ready for it ends the viewer's "computing…"
    }
    if in_progress:
        live_config["reloadOnImage"] = image.pk  # the read's result.ready reloads the page
    return render(
        request,
        "recognition/image_detail.html",
        {
            "image": image,
            "result": result,
            "preliminary": preliminary,
            "membership": membership,
            "live_config": live_config,
            "previous_id": previous_id,
            "next_id": next_id,
            "position": position,
            "count": count,
            "reviews": reviews,
            "draft": draft,
            "can_review": can(membership, Action.REVIEW_WRITE) and result is not None,
            "verdicts": Review.Verdict.choices,
            "labels": result.model_version.labels if result else [],
            "in_progress": in_progress,
            "heatmap_status": heatmap_status,
            "heatmap_wanted": heatmap_status in (HeatmapStatus.NONE, HeatmapStatus.COMPUTING),
            # issue 15: the study's objects sent to the hospital's PACS (templates/dicomnet/_deliveries.html)
            "deliveries": study_deliveries(membership=membership, image=image),
            "can_resend": can_resend(membership),
        },
    )


@login_required
def image_pixels(request, image_id: int):
    membership = membership_for_session(request)
    image = image_get(membership=membership, image_id=image_id, request=request, action="image.download")
    response = HttpResponse(image_modality_pixels(image), content_type="application/octet-stream")
    response["Cache-Control"] = "private, no-store"
    return response


@login_required
@require_POST
def image_review(request, image_id: int):
    """The viewer's review form: save a draft, sign off, or amend a signed review."""
    membership = membership_for_session(request)
    sign_off = request.POST.get("action") == "sign_off"
    try:
        review_save(
            membership=membership,
            image_id=image_id,
            verdict=request.POST.get("verdict", ""),
            label=request.POST.get("label", ""),
            comment=request.POST.get("comment", ""),
            sign_off=sign_off,
            request=request,
        )
    except DomainError as exc:
        if exc.status in (403, 404):  # not theirs to review: the same answer as everywhere
            raise
        messages.error(request, exc.message)
    else:
        messages.success(request, "Review signed off." if sign_off else "Draft saved; sign it off when ready.")
    return redirect("recognition:image-detail", image_id=image_id)


@login_required
@require_POST
def review_sign_off_view(request, review_id: int):
    membership = membership_for_session(request)
    try:
        review = review_sign_off(membership=membership, review_id=review_id, request=request)
    except DomainError as exc:
        if exc.status in (403, 404):  # not theirs to review: the same answer as everywhere
            raise
        messages.error(request, exc.message)
        return redirect("recognition:worklist")
    messages.success(request, "Review signed off.")
    return redirect("recognition:image-detail", image_id=review.image_id)


@login_required
def study_open(request, study_id: int):
    """A worklist row opens the study's first image in the viewer."""
    membership = membership_for_session(request)
    study = study_get(membership=membership, study_id=study_id, request=request)
    first = study.images.order_by("series__number", "instance_number", "frame_number", "id").first()
    if first is None:
        raise NotFound("This study has no images yet.")
    return redirect("recognition:image-detail", image_id=first.pk)


PROTOCOL_FILTER_ON = ("1", "true", "on")  # ?protocol=1: the "protocol reads" filter


def _worklist_filters(data, q: str = "") -> WorklistFilters:
    def day(name):
        try:
            return date.fromisoformat(data.get(name, "")) if data.get(name) else None
        except ValueError:
            raise Invalid(f"{name.replace('_', ' ').capitalize()} is not a date (YYYY-MM-DD).") from None

    return WorklistFilters(
        ai_status=data.get("ai_status", ""),
        finding=data.get("finding", "").strip(),
        modality=data.get("modality", "").strip(),
        review=data.get("review", ""),
        date_from=day("date_from"),
        date_to=day("date_to"),
        q=q,
        sort=data.get("sort", "newest") or "newest",
        protocol=data.get("protocol", "") in PROTOCOL_FILTER_ON,
    )


@login_required
@require_http_methods(["GET", "POST"])
def worklist_page(request):
    """The hospital's studies. Filters travel in the query string; a search by patient or
    accession is POSTed, its next pages too, so identifiers never appear in URLs or access logs
    of proxies (a GET that names one is refused in words). Cursors are opaque (core.cursor)."""
    membership = membership_for_session(request)
    if request.method == "GET":
        identifiers_refused_in_query(request.GET)
    data = request.POST if request.method == "POST" else request.GET
    q = request.POST.get("q", "").strip() if request.method == "POST" else ""
    filters = _worklist_filters(data, q)
    studies, next_cursor = study_worklist(
        membership=membership, filters=filters, cursor=data.get("cursor", ""), request=request
    )
    query = {key: value for key, value in data.items() if key not in ("cursor", "q", "csrfmiddlewaretoken") and value}
    live_config = {
        "tenant": membership.tenant.slug,
        "rowUrl": reverse("recognition:worklist-row", args=[0]),
        "studyUrl": reverse("recognition:study-open", args=[0]),
    }
    return render(
        request,
        "recognition/worklist.html",
        {
            "membership": membership,
            "studies": studies,
            "filters": filters,
            "next_cursor": next_cursor,
            "next_query": urlencode({**query, "cursor": next_cursor}) if next_cursor and not q else "",
            # a search's next page is POSTed with the search in the body, never a link
            "next_fields": sorted({**query, "q": q, "cursor": next_cursor}.items()) if next_cursor and q else [],
            "is_search": bool(q),
            "ai_statuses": Study.AIStatus.choices,
            "review_states": [*Study.ReviewState.choices, ("reviewed", "reviewed or signed off")],
            "sorts": list(WORKLIST_SORTS),
            "can_upload": can(membership, Action.IMAGE_UPLOAD),
            "live_config": live_config,
        },
    )


@login_required
def worklist_row(request, study_id: int):
    """One worklist row, re-rendered when the socket says the study changed."""
    membership = membership_for_session(request)
    study = study_get(membership=membership, study_id=study_id, request=request)
    return render(request, "recognition/_worklist_row.html", {"study": study})


@login_required
def image_file(request, image_id: int):
    membership = membership_for_session(request)
    image = image_get(membership=membership, image_id=image_id, request=request, action="image.download")
    response = FileResponse(image_rendering(image), content_type=display_content_type(image))
    response["Cache-Control"] = "private, no-store"
    return response


@login_required
def image_heatmap(request, image_id: int):
    """The viewer asks for the heatmap: the PNG, or 202 while a worker makes it (see the API)."""
    membership = membership_for_session(request)
    state = heatmap_request(membership=membership, image_id=image_id, request=request)
    if state.status != HeatmapStatus.READY:
        response = JsonResponse(
            {"status": HeatmapStatus.COMPUTING, "retry_after": HEATMAP_RETRY_AFTER_SECONDS}, status=202
        )
        response["Retry-After"] = str(HEATMAP_RETRY_AFTER_SECONDS)
        response["Cache-Control"] = "private, no-store"
        return response
    response = FileResponse(state.result.heatmap.open("rb"), content_type="image/png")
    response["Cache-Control"] = "private, no-store"
    return response


@login_required
@require_http_methods(["GET", "POST"])
def upload_page(request):
    membership = membership_for_session(request)
    if request.method == "POST":
        files = request.FILES.getlist("files")
        interactive_admission()  # 429 page while too many reads wait: before anything is stored
        if not files:
            messages.error(request, "Choose at least one image to upload.")
        stored = 0
        # the page's script sends one file per request when a screen comes with it
        try:
            screen = screen_parse(request.POST.get("screen")) if len(files) == 1 else None
        except DomainError as exc:  # a malformed screen: nothing is stored, said in words
            messages.error(request, exc.message)
            files, screen = [], None
        for upload in files:
            try:
                image_upload(membership=membership, upload=upload, request=request, screen=screen)
                stored += 1
            except DomainError as exc:  # one bad file never stops the others
                messages.error(request, f"{upload.name}: {exc.message}")
        if stored:
            messages.success(request, f"{stored} image{'s' if stored != 1 else ''} uploaded; AI reads are queued.")
            return redirect("recognition:image-list")
    # a page screens only for someone who can send from it
    screening = screening_page_config(membership=membership) if can(membership, Action.IMAGE_UPLOAD) else None
    response = render(
        request,
        "recognition/upload.html",
        {"membership": membership, "can_upload": can(membership, Action.IMAGE_UPLOAD), "screening": screening},
    )
    return allow_wasm(response, screening)


def _agreement_scope(request):
    """Platform staff see every hospital (or one, by ?tenant=); a hospital's admin sees theirs."""
    if request.user.is_staff:
        slug = request.GET.get("tenant", "")
        tenant = Tenant.objects.filter(slug=slug).first() if slug else None
        if slug and tenant is None:
            raise NotFound("No such hospital.")
        return tenant, slug
    membership = membership_for_session(request)
    require(membership, Action.AGREEMENT_VIEW, request=request)
    return membership.tenant, membership.tenant.slug


@login_required
def agreement_page(request):
    """How often clinicians agreed with each model version's findings: the answer to an A/B split."""
    tenant, slug = _agreement_scope(request)
    rows = agreement_rows(tenant=tenant)
    csv_url = reverse("recognition:agreement-csv") + (
        f"?{urlencode({'tenant': slug})}" if request.user.is_staff and slug else ""
    )
    return render(
        request,
        "recognition/agreement.html",
        {
            "rows": rows,
            "ab": ab_comparisons(tenant=tenant, rows=rows),
            "ab_minimum": AB_MINIMUM_SAMPLE,
            "screening_agreement": screening_agreement(tenant=tenant),
            "chart": mark_safe(agreement_svg(rows)),  # noqa: S308  (agreement_svg escapes every text it writes)
            "csv_url": csv_url,
            "is_staff": request.user.is_staff,
            "tenants": list(Tenant.objects.order_by("name").values_list("slug", "name"))
            if request.user.is_staff
            else [],
            "tenant_slug": slug,
        },
    )


@login_required
def agreement_csv_view(request):
    tenant, slug = _agreement_scope(request)
    return streaming_response(
        request,
        agreement_csv(agreement_rows(tenant=tenant)),
        content_type="text/csv",
        filename=f"agreement-{slug or 'all'}.csv",
    )


@login_required
@require_http_methods(["GET", "POST"])
def jobs_page(request):
    """Bulk jobs: create one, drop files or a zip into it, start, cancel, retry, download."""
    membership = membership_for_session(request)
    if request.method == "POST":
        try:
            job, _ = batch_job_create(membership=membership, name=request.POST.get("name", ""), request=request)
        except DomainError as exc:
            if exc.status == 404:
                raise
            messages.error(request, exc.message)
        else:
            messages.success(request, f"Job “{job.name}” created: add files or a zip, then start it.")
        return redirect("recognition:jobs")
    jobs = list(batch_job_list(membership=membership, request=request)[:JOBS_PAGE])
    screening = screening_page_config(membership=membership) if can(membership, Action.BATCH_SUBMIT) else None
    response = render(
        request,
        "recognition/jobs.html",
        {
            "membership": membership,
            "jobs": list(zip(jobs, batch_jobs_progress(jobs), strict=True)),
            "can_submit": can(membership, Action.BATCH_SUBMIT),
            "live_config": {"tenant": membership.tenant.slug, "apiJob": reverse("api-batch-detail", args=[0])},
            "screening": screening,
        },
    )
    return allow_wasm(response, screening)


@login_required
@require_POST
def job_action(request, job_id: int, action: str):
    membership = membership_for_session(request)
    require(membership, Action.BATCH_SUBMIT, request=request)  # who may not, or whose job it is not,
    batch_job_get(membership=membership, job_id=job_id, request=request)  # hears 403 / 404 first
    try:
        if action == "items":
            archive, files = request.FILES.get("archive"), request.FILES.getlist("files")
            if archive:
                batch_upload_zip(membership=membership, job_id=job_id, archive=archive, request=request)
                messages.success(request, "Archive received; it is being unpacked.")
            elif files:
                # one file per request when a screen comes with it (the jobs page's script)
                screen = screen_parse(request.POST.get("screen")) if len(files) == 1 else None
                items = batch_items_add_files(
                    membership=membership, job_id=job_id, files=files, request=request, screen=screen
                )
                messages.success(request, f"{len(items)} item{'s' if len(items) != 1 else ''} added.")
            else:
                messages.error(request, "Choose files or a zip archive.")
        elif action == "retry":
            count = batch_job_retry(membership=membership, job_id=job_id, request=request)
            if count:
                messages.success(request, f"{count} failed item{'s' if count != 1 else ''} queued again.")
            else:
                messages.info(request, "No failed item can be read again: each failed before it became an image.")
        else:
            service = {"start": batch_job_start, "cancel": batch_job_cancel}[action]
            service(membership=membership, job_id=job_id, request=request)
    except DomainError as exc:
        if exc.status in (403, 404):
            raise
        messages.error(request, exc.message)
    return redirect("recognition:jobs")


@login_required
def job_results(request, job_id: int):
    membership = membership_for_session(request)
    job = batch_results_open(membership=membership, job_id=job_id, request=request)
    return streaming_response(request, results_csv(job), content_type="text/csv", filename=f"job-{job.pk}.csv")


def _settings_form(data) -> dict:
    """The settings form's fields as the service takes them; 422 in words for one that is not
    a number where a number belongs."""
    version = data.get("screening_version", "").strip()
    try:
        return {
            "screening_enabled": data.get("screening_enabled") == "on",
            "screening_version_id": int(version) if version else None,
            "route_negatives_to_bulk": data.get("route_negatives_to_bulk") == "on",
            "negative_threshold": float(data.get("negative_threshold", "")),
            "negative_max_wait_seconds": int(data.get("negative_max_wait_seconds", "")),
        }
    except ValueError:
        raise Unprocessable(
            "The threshold is a probability (e.g. 0.95) and the maximum wait a whole number of seconds.",
            code="bad_settings",
        ) from None


@login_required
@require_http_methods(["GET", "POST"])
def hospital_settings_page(request):
    """The hospital's own settings (not platform staff's): browser screening and its routing;
    its tenant admins only, behind the second factor where the hospital asks for one."""
    membership = membership_for_session(request)
    current = hospital_settings_get(membership=membership, request=request)  # 403 before anything else
    error, status = "", 200
    if request.method == "POST":
        try:
            hospital_settings_update(membership=membership, **_settings_form(request.POST), request=request)
        except DomainError as exc:
            if exc.status in (403, 404):
                raise
            error, status = exc.message, 422
        else:
            messages.success(request, "Hospital settings saved.")
            return redirect("recognition:hospital-settings")
    return render(
        request,
        "recognition/hospital_settings.html",
        {
            "settings": current,
            "versions": list(screening_versions()),
            "error": error,
            "posted": request.POST if error else None,
            "min_wait": MIN_NEGATIVE_WAIT_SECONDS,
            "max_wait": MAX_NEGATIVE_WAIT_SECONDS,
        },
        status=status,
    )
