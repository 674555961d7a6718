"""Pages. Thin: resolve the member's hospital, call a selector or service, render."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_http_methods, require_POST

from accounts.permissions import Action, can
from accounts.selectors import membership_for_session, membership_resolve
from config.errors import DomainError

from .selectors import image_get, image_heatmap_get, image_list
from .services.images import image_upload

PAGE_SIZE = 100


@login_required
@require_POST
def tenant_switch(request):
    membership = membership_resolve(user=request.user, tenant_slug=request.POST.get("tenant", ""), request=request)
    request.session["tenant_slug"] = membership.tenant.slug
    return redirect("recognition:home")


@login_required
def home(request):
    """Where a role starts: images for clinical roles, members for admins, the log for auditors."""
    membership = membership_for_session(request)
    for action, destination in (
        (Action.IMAGE_VIEW, "recognition:image-list"),
        (Action.MEMBERS_MANAGE, "members"),
        (Action.AUDIT_VIEW, "access-log"),
    ):
        if can(membership, action):
            return redirect(destination)
    return redirect("two-factor")


@login_required
def image_list_page(request):
    membership = membership_for_session(request)
    images = list(image_list(membership=membership, request=request)[:PAGE_SIZE])
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
    membership = membership_for_session(request)
    image = image_get(membership=membership, image_id=image_id, request=request)
    live_config = {
        "tenant": membership.tenant.slug,
        "reloadOnImage": image.pk,
        "apiImage": reverse("api-image-detail", args=[image.pk]),
    }
    return render(
        request,
        "recognition/image_detail.html",
        {"image": image, "membership": membership, "live_config": live_config},
    )


@login_required
def image_file(request, image_id: int):
    membership = membership_for_session(request)
    image = image_get(membership=membership, image_id=image_id, request=request, action="image.download")
    response = FileResponse(image.file.open("rb"), content_type="image/png")
    response["Cache-Control"] = "private, no-store"
    return response


@login_required
def image_heatmap(request, image_id: int):
    membership = membership_for_session(request)
    result = image_heatmap_get(membership=membership, image_id=image_id, request=request)
    response = FileResponse(result.heatmap.open("rb"), content_type="image/png")
    response["Cache-Control"] = "private, no-store"
    return response


@login_required
@require_http_methods(["GET", "POST"])
def upload_page(request):
    membership = membership_for_session(request)
    if request.method == "POST":
        files = request.FILES.getlist("files")
        if not files:
            messages.error(request, "Choose at least one image to upload.")
        stored = 0
        for upload in files:
            try:
                image_upload(membership=membership, upload=upload, request=request)
                stored += 1
            except DomainError as exc:  # one bad file never stops the others
                messages.error(request, f"{upload.name}: {exc.message}")
        if stored:
            messages.success(request, f"{stored} image{'s' if stored != 1 else ''} uploaded; AI reads are queued.")
            return redirect("recognition:image-list")
    return render(
        request,
        "recognition/upload.html",
        {"membership": membership, "can_upload": can(membership, Action.IMAGE_UPLOAD)},
    )
