"""API v1: one view per operation; input serializer → service or selector → output serializer."""

from __future__ import annotations

import json

from django.conf import settings
from django.http import FileResponse, HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import serializers, status
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.response import Response
from rest_framework.settings import api_settings

from accounts.apis import TENANT_HEADER, TenantApi
from accounts.permissions import Action
from accounts.services import require
from core.cursor import identifiers_refused_in_query
from core.errors import Conflict, Invalid, NotFound, Unavailable, Unprocessable
from core.inputs import ApiInput
from core.pagination import NewestFirstPagination, NextCursorPage
from core.streaming import streaming_response

from .display import display_content_type
from .fhir import FHIR_CONTENT_TYPE, study_fhir_bundle
from .job_selectors import batch_job_get, batch_job_list, batch_job_progress, batch_jobs_progress
from .models import Image, ModelAlias, PreliminaryResult, Review, Study
from .selectors import (
    WORKLIST_PAGE,
    WORKLIST_PAGE_MAX,
    WORKLIST_SORTS,
    WorklistFilters,
    image_get,
    image_list,
    image_modality_pixels,
    image_rendering,
    review_history,
    study_get,
    study_worklist,
)
from .services.admission import InteractiveBacklog, interactive_admission
from .services.heatmaps import (
    HEATMAP_RETRY_AFTER_SECONDS,
    HeatmapStatus,
    heatmap_request,
    result_heatmap_status,
)
from .services.images import IDEMPOTENCY_KEY_MAX, StudyFields, images_upload_once
from .services.inference import upload_routing
from .services.jobs import (
    batch_items_add_files,
    batch_job_cancel,
    batch_job_create,
    batch_job_retry,
    batch_job_start,
    batch_results_open,
    batch_upload_prefix,
    batch_upload_zip,
    results_csv,
    results_json,
)
from .services.registry import model_version_list
from .services.reviews import review_save, review_sign_off
from .services.screening import SCREEN_MAX_BYTES, screen_parse


class ResultOutput(serializers.Serializer):
    model = serializers.CharField(source="model_version.model.name")
    model_version = serializers.CharField(source="model_version.version")
    model_version_serial = serializers.IntegerField(
        source="model_version.serial", help_text="the version's integer (its registration order within the model)"
    )
    demo = serializers.BooleanField(source="model_version.model.is_demo")
    top_label = serializers.CharField()
    top_probability = serializers.FloatField()
    probabilities = serializers.DictField(child=serializers.FloatField())
    positive_labels = serializers.ListField(child=serializers.CharField())
    has_heatmap = serializers.SerializerMethodField(help_text="its Grad-CAM overlay is made and stored")
    heatmap_status = serializers.SerializerMethodField(
        help_text="none: not asked for yet (GET …/heatmap/ asks); computing: a worker makes it (heatmap.ready on "
        "/ws/events/ when done); ready; unavailable: the model has no Grad-CAM layer, or it could not be made"
    )
    created = serializers.DateTimeField()

    def get_has_heatmap(self, result) -> bool:
        return bool(result.heatmap)

    @extend_schema_field(serializers.ChoiceField(choices=HeatmapStatus.choices))
    def get_heatmap_status(self, result) -> str:
        return result_heatmap_status(result)


class StudyOutput(serializers.Serializer):
    id = serializers.IntegerField()
    patient_id = serializers.CharField(source="patient_pseudonym")
    accession_number = serializers.CharField()
    modality = serializers.CharField()
    description = serializers.CharField()
    study_date = serializers.DateField(allow_null=True)


class ImageBaseOutput(serializers.Serializer):
    id = serializers.IntegerField()
    study = StudyOutput()
    width = serializers.IntegerField()
    height = serializers.IntegerField()
    format = serializers.CharField()
    frame_number = serializers.IntegerField()
    state = serializers.ChoiceField(
        choices=Image.State.choices,
        help_text="received (being prepared for display by a worker: a PNG/JPEG's AI read is queued with it and "
        "renders it; a DICOM frame's read is queued once it is rendered), rendered, or failed (why, in "
        "unprocessable_reason). A received image has no display file yet (the file endpoint answers 409).",
    )
    unprocessable_reason = serializers.CharField()
    created = serializers.DateTimeField()


class ImageSummaryOutput(ImageBaseOutput):
    status = serializers.CharField(source="ai_status", allow_null=True)
    error = serializers.CharField(source="ai_error", allow_null=True)
    top_label = serializers.CharField(source="ai_top_label", allow_null=True)
    top_probability = serializers.FloatField(source="ai_top_probability", allow_null=True)


class UploadedImageOutput(serializers.Serializer):
    id = serializers.IntegerField()
    frame_number = serializers.IntegerField()
    state = serializers.ChoiceField(choices=Image.State.choices)


class PreliminaryOutput(serializers.Serializer):
    label = serializers.CharField(source="top_label", help_text="the screen's top label (computed by the server)")
    probability = serializers.FloatField(source="top_probability", help_text="the screen's probability of it")
    route = serializers.ChoiceField(
        choices=PreliminaryResult.Route.choices,
        help_text="first: its read goes first within the hospital's own turns; bulk: it waits in the bulk lane "
        "(read anyway after the hospital's maximum wait); normal: in order",
    )
    version = serializers.IntegerField(source="screening_version_id", help_text="the screening model version's id")


SCREEN_HELP = (
    "The browser's screen of this file, made before upload (JSON, at most "
    f"{SCREEN_MAX_BYTES} bytes): "
    '{"version_id": 12, "probabilities": {"no_finding": 0.97, "round_opacity": 0.03}, "latency_ms": 41, '
    '"quality": {"flags": ["blank"], "ood_score": 0.12}}. Untrusted: a malformed one answers 422 and nothing is '
    "stored; one for another version than the hospital's current screening model is ignored (the upload goes "
    "on). It is a preliminary only: the server still reads every image, and the screen only orders that read "
    "within the hospital's own share of the queue."
)


def screen_input(help_text: str) -> serializers.CharField:
    """The optional ``screen`` field of an upload (checked by services/screening.py's screen_parse)."""
    return serializers.CharField(
        max_length=SCREEN_MAX_BYTES,
        required=False,
        default="",
        allow_blank=True,
        trim_whitespace=False,
        help_text=help_text,
    )


class ImageCreatedOutput(ImageBaseOutput):
    status = serializers.SerializerMethodField(help_text="The AI read's status; null until the image is rendered")
    images = serializers.SerializerMethodField(help_text="Every image the file became (a DICOM: one per frame)")
    preliminary = serializers.SerializerMethodField(
        help_text="The browser screen's preliminary read as stored, or null (no screen came, or it was not for the "
        "hospital's current screening model). Never a finding: the server's read follows as `status`/results."
    )

    @extend_schema_field(PreliminaryOutput(allow_null=True))
    def get_preliminary(self, image) -> dict | None:
        try:
            preliminary = image.preliminary
        except PreliminaryResult.DoesNotExist:
            return None
        return PreliminaryOutput(preliminary).data

    def get_status(self, image) -> str | None:
        if hasattr(image, "ai_status"):  # set by the upload that queued it (or a selector's annotation)
            return image.ai_status
        return image.inference_requests.filter(shadow=False).order_by("-id").values_list("status", flat=True).first()

    def get_images(self, image) -> list[dict]:
        return UploadedImageOutput(self.context.get("images", [image]), many=True).data


class ImageDetailOutput(ImageSummaryOutput):
    results = ResultOutput(many=True)


class ImageUploadInput(ApiInput):
    file = serializers.FileField(allow_empty_file=True)
    patient_id = serializers.CharField(max_length=64, required=False, default="", allow_blank=True)
    accession_number = serializers.CharField(max_length=64, required=False, default="", allow_blank=True)
    modality = serializers.CharField(max_length=16, required=False, default="", allow_blank=True)
    study_description = serializers.CharField(max_length=200, required=False, default="", allow_blank=True)
    study_date = serializers.DateField(required=False, default=None)
    model = serializers.SlugField(
        max_length=100,
        required=False,
        default="",
        allow_blank=True,
        help_text="The model to read with (default: the platform's).",
    )
    version = serializers.CharField(
        max_length=50,
        required=False,
        default="",
        allow_blank=True,
        help_text="A version of the model to read with, by its semantic version; it must be one the hospital may use "
        "(its pin, else production, its split, or one a platform operator allowed): 404 otherwise.",
    )
    alias = serializers.ChoiceField(
        choices=ModelAlias.Name.choices,
        required=False,
        default="",
        allow_blank=True,
        help_text="An alias of the model to read with, under the same rule as `version`.",
    )
    screen = screen_input(SCREEN_HELP)

    def validate(self, attrs):
        if attrs["version"] and attrs["alias"]:
            raise serializers.ValidationError("Name a version or an alias, not both.")
        return attrs


class ImageListInput(ApiInput):
    protocol = serializers.BooleanField(
        required=False,
        default=False,
        help_text="Protocol reads: list only the images that model-server protocol clients sent, which are "
        "otherwise left out.",
    )


class ImageListCreateApi(TenantApi):
    pagination_class = NewestFirstPagination
    # a content-checked upload: 413/415/422 come with its file; 409 a study's fields that disagree,
    # 422 an Idempotency-Key reused for another file, 503 when no model is registered to read it
    api_errors = {"post": (Conflict, NotFound, Unprocessable, Unavailable, InteractiveBacklog)}

    @extend_schema(parameters=[TENANT_HEADER, ImageListInput], responses=ImageSummaryOutput(many=True))
    def get(self, request):
        paginator = self.pagination_class()
        protocol = ImageListInput(data=request.query_params)
        protocol.is_valid(raise_exception=True)
        images = image_list(
            membership=request.membership, request=request, protocol=protocol.validated_data["protocol"]
        )
        page = paginator.paginate_queryset(images, request)
        return paginator.get_paginated_response(ImageSummaryOutput(page, many=True).data)

    @extend_schema(
        parameters=[
            TENANT_HEADER,
            OpenApiParameter(
                "Idempotency-Key",
                # what the service takes: printable ASCII, at most IDEMPOTENCY_KEY_MAX characters
                {"type": "string", "maxLength": IDEMPOTENCY_KEY_MAX, "pattern": "^[ -~]*$"},
                OpenApiParameter.HEADER,
                required=False,
                description="Retry an upload with the same key and get the same image(s) back (200) instead of a "
                "second copy; the same key with another file answers 422.",
            ),
        ],
        request={"multipart/form-data": ImageUploadInput},
        responses={201: ImageCreatedOutput, 202: ImageCreatedOutput, 200: ImageCreatedOutput},
        description="Upload one PNG, JPEG or DICOM file. 201: its AI read is queued; a PNG/JPEG is `received` "
        "(checked, stored as sent; the worker that reads it also makes its display copy, and `state` moves to "
        "rendered), a DICOM rendered here is `rendered`. 202: received and queued to be rendered by a worker (a "
        "compressed DICOM, or more pixels than one request decodes); each image's `state` moves to rendered "
        "(then its read is queued) or failed. Watch /ws/events/ or poll.",
    )
    def post(self, request):
        data = ImageUploadInput(data=request.data)
        data.is_valid(raise_exception=True)
        interactive_admission()  # 429 while too many reads wait: before anything is stored
        fields = data.validated_data
        screen = screen_parse(fields["screen"])  # 422 in words before anything is stored
        read_as = None
        if fields["model"] or fields["version"] or fields["alias"]:
            read_as = upload_routing(
                tenant=request.membership.tenant,
                model_name=fields["model"],
                version=fields["version"],
                alias=fields["alias"],
            )
        images, created = images_upload_once(
            membership=request.membership,
            upload=fields["file"],
            study=StudyFields(
                patient_pseudonym=fields["patient_id"],
                accession_number=fields["accession_number"],
                modality=fields["modality"],
                description=fields["study_description"],
                study_date=fields["study_date"],
            ),
            idempotency_key=request.headers.get("Idempotency-Key", ""),
            request=request,
            read_as=read_as,
            screen=screen,
        )
        answer = status.HTTP_200_OK
        if created:
            # 202 while a read still waits for a render; a PNG/JPEG's read is queued at once (201)
            waiting = any(image.state == Image.State.RECEIVED and image.read_on_render for image in images)
            answer = status.HTTP_202_ACCEPTED if waiting else status.HTTP_201_CREATED
        return Response(ImageCreatedOutput(images[0], context={"images": images}).data, status=answer)


class ImageDetailApi(TenantApi):
    @extend_schema(parameters=[TENANT_HEADER], responses=ImageDetailOutput)
    def get(self, request, image_id: int):
        image = image_get(membership=request.membership, image_id=image_id, request=request)
        return Response(ImageDetailOutput(image).data)


class ImageFileApi(TenantApi):
    api_errors = (Conflict,)  # kept, but it cannot be displayed

    @extend_schema(
        parameters=[TENANT_HEADER],
        responses={(200, "image/png"): OpenApiTypes.BINARY, (200, "image/jpeg"): OpenApiTypes.BINARY},
        description="The image's display copy, free of the upload's metadata: PNG, or JPEG for a JPEG upload. "
        "409 while it is received and still being prepared.",
    )
    def get(self, request, image_id: int):
        image = image_get(membership=request.membership, image_id=image_id, request=request, action="image.download")
        response = FileResponse(image_rendering(image), content_type=display_content_type(image))
        response["Cache-Control"] = "private, no-store"
        return response


class ImagePixelsApi(TenantApi):
    @extend_schema(
        parameters=[TENANT_HEADER],
        responses={(200, "application/octet-stream"): OpenApiTypes.BINARY},
        description="Grayscale DICOM only: the frame's modality values (e.g. Hounsfield units), little-endian "
        "float32, row-major, width × height values; the viewer windows them itself.",
    )
    def get(self, request, image_id: int):
        image = image_get(membership=request.membership, image_id=image_id, request=request, action="image.download")
        response = HttpResponse(image_modality_pixels(image), content_type="application/octet-stream")
        response["Cache-Control"] = "private, no-store"
        return response


class HeatmapComputingOutput(serializers.Serializer):
    status = serializers.ChoiceField(choices=[HeatmapStatus.COMPUTING])
    retry_after = serializers.IntegerField(help_text="seconds to wait before asking again (also `Retry-After`)")


class ImageHeatmapApi(TenantApi):
    @extend_schema(
        parameters=[TENANT_HEADER],
        responses={(200, "image/png"): OpenApiTypes.BINARY, (202, "application/json"): HeatmapComputingOutput},
        description="The Grad-CAM overlay (transparent PNG at the image's size) of the newest result whose model has "
        "a Grad-CAM layer. Made on request, never by the read: the first GET asks a worker for it and answers 202 "
        '`{"status": "computing"}` with `Retry-After`; `heatmap.ready` arrives on /ws/events/ when it is '
        "stored, and GET answers the PNG from then on. 404 for an image without such a result, or whose heatmap "
        "could not be made (`error.message` says why).",
    )
    def get(self, request, image_id: int):
        state = heatmap_request(membership=request.membership, image_id=image_id, request=request)
        if state.status != HeatmapStatus.READY:
            body = {"status": HeatmapStatus.COMPUTING, "retry_after": HEATMAP_RETRY_AFTER_SECONDS}
            response = Response(HeatmapComputingOutput(body).data, status=status.HTTP_202_ACCEPTED)
            response["Retry-After"] = str(HEATMAP_RETRY_AFTER_SECONDS)
            response["Cache-Control"] = "private, no-store"
            return response
        response = FileResponse(state.result.heatmap.open("rb"), content_type="image/png")
        response["Cache-Control"] = "private, no-store"
        return response


class StudySummaryOutput(StudyOutput):
    ai_status = serializers.CharField()
    top_label = serializers.CharField()
    top_probability = serializers.FloatField(allow_null=True)
    review_state = serializers.CharField()
    image_count = serializers.IntegerField()
    created = serializers.DateTimeField()
    updated = serializers.DateTimeField()


class StudyListInput(ApiInput):
    ai_status = serializers.ChoiceField(choices=Study.AIStatus.values, required=False, default="", allow_blank=True)
    finding = serializers.CharField(max_length=100, required=False, default="", allow_blank=True)
    modality = serializers.CharField(max_length=16, required=False, default="", allow_blank=True)
    review = serializers.ChoiceField(
        choices=[*Study.ReviewState.values, "reviewed"], required=False, default="", allow_blank=True
    )
    date_from = serializers.DateField(required=False, default=None)
    date_to = serializers.DateField(required=False, default=None)
    sort = serializers.ChoiceField(choices=list(WORKLIST_SORTS), required=False, default="newest")
    protocol = serializers.BooleanField(
        required=False,
        default=False,
        help_text="Protocol reads: list only the studies that model-server protocol clients (KServe v2, TF "
        "Serving, TorchServe) made, which are otherwise left out.",
    )
    cursor = serializers.CharField(
        required=False, allow_blank=True, default="", help_text="`next_cursor` of the previous page."
    )
    page_size = serializers.IntegerField(
        min_value=1, max_value=WORKLIST_PAGE_MAX, required=False, default=WORKLIST_PAGE
    )


class StudySearchInput(StudyListInput):
    q = serializers.CharField(
        max_length=64,
        help_text="A patient id (as shown, or the hospital's own, which is hashed the way uploads are) or an "
        "accession number, exactly. Pass `next_cursor` back as `cursor` with the same body for the next page.",
    )


def _worklist_response(request, fields: dict, q: str = ""):
    filters = WorklistFilters(
        ai_status=fields["ai_status"],
        finding=fields["finding"],
        modality=fields["modality"],
        review=fields["review"],
        date_from=fields["date_from"],
        date_to=fields["date_to"],
        q=q,
        sort=fields["sort"],
        protocol=fields["protocol"],
    )
    rows, cursor = study_worklist(
        membership=request.membership,
        filters=filters,
        cursor=fields["cursor"],
        limit=fields["page_size"],
        request=request,
    )
    return Response({"next_cursor": cursor or None, "results": StudySummaryOutput(rows, many=True).data})


class StudyListApi(TenantApi):
    pagination_class = NextCursorPage

    @extend_schema(
        parameters=[TENANT_HEADER, StudyListInput],
        responses=StudySummaryOutput(many=True),
        description="The worklist: the hospital's studies with AI status, top finding and review state. Pass "
        "`next_cursor` back as `cursor` for the next page. Searching by patient or accession is a POST to "
        "/studies/search/, so that identifiers stay out of URLs and logs: a GET naming one (`q`, `patient_id`, "
        "`accession_number`...) is refused with 400 `identifier_in_url`. Cursors are opaque.",
    )
    def get(self, request):
        identifiers_refused_in_query(request.query_params)
        data = StudyListInput(data=request.query_params)
        data.is_valid(raise_exception=True)
        return _worklist_response(request, data.validated_data)


class StudySearchApi(TenantApi):
    pagination_class = NextCursorPage

    @extend_schema(parameters=[TENANT_HEADER], request=StudySearchInput, responses=StudySummaryOutput(many=True))
    def post(self, request):
        data = StudySearchInput(data=request.data)
        data.is_valid(raise_exception=True)
        return _worklist_response(request, data.validated_data, q=data.validated_data["q"])


class StudyDetailOutput(StudySummaryOutput):
    images = serializers.SerializerMethodField()

    def get_images(self, study) -> list[int]:
        return list(
            study.images.order_by("series__number", "instance_number", "frame_number", "id").values_list(
                "id", flat=True
            )
        )


class StudyDetailApi(TenantApi):
    @extend_schema(parameters=[TENANT_HEADER], responses=StudyDetailOutput)
    def get(self, request, study_id: int):
        study = study_get(membership=request.membership, study_id=study_id, request=request)
        return Response(StudyDetailOutput(study).data)


class FhirEntryOutput(serializers.Serializer):
    fullUrl = serializers.CharField(help_text="`urn:uuid:…`: the name other entries refer to it by")  # noqa: N815
    resource = serializers.DictField(
        help_text="A FHIR R4 resource: DiagnosticReport, Patient, ImagingStudy, Device or Observation"
    )


class FhirBundleOutput(serializers.Serializer):
    resourceType = serializers.ChoiceField(choices=["Bundle"])  # noqa: N815
    id = serializers.CharField()
    type = serializers.ChoiceField(choices=["collection"])
    timestamp = serializers.DateTimeField()
    entry = FhirEntryOutput(many=True)


class _JsonForEverything(DefaultContentNegotiation):
    """The Bundle is FHIR JSON whatever the client accepts (``application/fhir+json`` and
    ``application/json`` alike); errors keep the one error shape, as JSON."""

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


class StudyFhirApi(TenantApi):
    content_negotiation_class = _JsonForEverything

    @extend_schema(
        parameters=[TENANT_HEADER],
        responses={(200, FHIR_CONTENT_TYPE): FhirBundleOutput},
        description="The study as FHIR R4 (validates against `fhir.resources`' R4B models): a Bundle of type "
        "collection with a DiagnosticReport (preliminary until every finding is signed off, then final), one "
        "Observation per image with an AI finding (preliminary; the label, its probability, the model version as "
        "Device and method), one per signed-off review (the verdict and the clinician's label; amended for an "
        "amendment), the ImagingStudy (Study, Series and SOP Instance UIDs the platform holds, modalities) and "
        "the Patient by the platform's pseudonym only. Entries are named `urn:uuid:…` and refer to each other "
        "by those names. Served as application/fhir+json.",
    )
    def get(self, request, study_id: int):
        bundle = study_fhir_bundle(membership=request.membership, study_id=study_id, request=request)
        response = HttpResponse(json.dumps(bundle, ensure_ascii=False), content_type=FHIR_CONTENT_TYPE)
        response["Cache-Control"] = "private, no-store"
        return response


class ReviewOutput(serializers.Serializer):
    id = serializers.IntegerField()
    image = serializers.IntegerField(source="image_id")
    model = serializers.CharField(source="model_version.model.name", allow_null=True)
    model_version = serializers.CharField(source="model_version.version", allow_null=True)
    model_version_serial = serializers.IntegerField(
        source="model_version.serial",
        allow_null=True,
        help_text="the version's integer (its registration order within the model)",
    )
    ai_label = serializers.CharField()
    verdict = serializers.CharField()
    label = serializers.CharField()
    comment = serializers.CharField()
    author = serializers.CharField(source="author.get_username")
    amends = serializers.IntegerField(source="amends_id", allow_null=True)
    created = serializers.DateTimeField()
    updated = serializers.DateTimeField()
    signed_off_at = serializers.DateTimeField(allow_null=True)
    signed_off_by = serializers.CharField(source="signed_off_by.get_username", allow_null=True, default=None)


class ReviewInput(ApiInput):
    verdict = serializers.ChoiceField(choices=Review.Verdict.values)
    label = serializers.CharField(max_length=100, required=False, default="", allow_blank=True)
    comment = serializers.CharField(max_length=2000, required=False, default="", allow_blank=True)
    sign_off = serializers.BooleanField(required=False, default=False)


class ImageReviewsApi(TenantApi):
    pagination_class = NewestFirstPagination
    api_errors = {"post": (Conflict,)}  # no finding yet, or a review of another's signed one

    @extend_schema(parameters=[TENANT_HEADER], responses=ReviewOutput(many=True))
    def get(self, request, image_id: int):
        image = image_get(membership=request.membership, image_id=image_id, request=request, action="review.list")
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(review_history(image=image), request)
        return paginator.get_paginated_response(ReviewOutput(page, many=True).data)

    @extend_schema(
        parameters=[TENANT_HEADER],
        request=ReviewInput,
        responses={201: ReviewOutput},
        description="Review the image's newest AI finding. Your own unsigned draft is updated; a signed review is "
        "amended by a new one (the history stays); `sign_off: true` signs it. A `label` must be one of the labels "
        "of the model that made the finding; `correct` needs one, and it must differ from the AI's (400 otherwise).",
    )
    def post(self, request, image_id: int):
        data = ReviewInput(data=request.data)
        if not data.is_valid():
            # who may not review this image learns nothing from the shape of the request
            require(request.membership, Action.REVIEW_WRITE, request=request)
            image_get(membership=request.membership, image_id=image_id, request=request, action="image.review")
            raise serializers.ValidationError(data.errors)
        review = review_save(membership=request.membership, image_id=image_id, request=request, **data.validated_data)
        return Response(ReviewOutput(review).data, status=status.HTTP_201_CREATED)


class ReviewSignOffApi(TenantApi):
    api_errors = (Conflict,)  # already signed, or not the author's draft

    @extend_schema(parameters=[TENANT_HEADER], request=None, responses=ReviewOutput)
    def post(self, request, review_id: int):
        review = review_sign_off(membership=request.membership, review_id=review_id, request=request)
        return Response(ReviewOutput(review).data)


class BatchJobInput(ApiInput):
    name = serializers.CharField(max_length=200)
    model = serializers.CharField(
        max_length=100, required=False, default="", allow_blank=True, help_text="default: the site's model"
    )
    alias = serializers.ChoiceField(
        choices=["production", "canary"], required=False, default="", allow_blank=True, help_text="default: production"
    )
    version = serializers.CharField(
        max_length=50, required=False, default="", allow_blank=True, help_text="wins over alias"
    )


class BatchJobOutput(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    model = serializers.CharField(source="model_version.model.name")
    model_version = serializers.CharField(source="model_version.version")
    model_version_serial = serializers.IntegerField(
        source="model_version.serial", help_text="the version's integer (its registration order within the model)"
    )
    status = serializers.CharField()
    state = serializers.SerializerMethodField(help_text="open, running, finished or cancelled")
    counts = serializers.SerializerMethodField(help_text="items per state")
    total = serializers.SerializerMethodField()
    images_per_s = serializers.SerializerMethodField()
    eta_s = serializers.SerializerMethodField()
    uploads_pending = serializers.SerializerMethodField(help_text="archives still being unpacked")
    uploads_refused = serializers.SerializerMethodField(help_text="each refused archive or prefix, and why, in words")
    created = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)

    def _progress(self, job):
        if not hasattr(job, "_progress"):
            job._progress = batch_job_progress(job)
        return job._progress

    def get_state(self, job) -> str:
        return self._progress(job).state

    def get_counts(self, job) -> dict[str, int]:
        return self._progress(job).counts

    def get_total(self, job) -> int:
        return self._progress(job).total

    def get_images_per_s(self, job) -> float | None:
        return self._progress(job).images_per_s

    def get_eta_s(self, job) -> float | None:
        return self._progress(job).eta_s

    def get_uploads_pending(self, job) -> int:
        return self._progress(job).uploads_pending

    def get_uploads_refused(self, job) -> list[str]:
        return list(self._progress(job).refused)


IDEMPOTENCY_HEADER = OpenApiParameter(
    "Idempotency-Key",
    {"type": "string", "maxLength": 128},
    OpenApiParameter.HEADER,
    required=False,
    description="Repeat a create with the same key and get the same job back (200) instead of a second one.",
)


class BatchJobListCreateApi(TenantApi):
    pagination_class = NewestFirstPagination
    api_errors = {"post": (Conflict,)}  # an Idempotency-Key used for another job

    @extend_schema(parameters=[TENANT_HEADER], responses=BatchJobOutput(many=True))
    def get(self, request):
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(batch_job_list(membership=request.membership, request=request), request)
        batch_jobs_progress(page)  # the page's progress: annotated on the list, the refused uploads' words in one query
        return paginator.get_paginated_response(BatchJobOutput(page, many=True).data)

    @extend_schema(
        parameters=[TENANT_HEADER, IDEMPOTENCY_HEADER],
        request=BatchJobInput,
        responses={201: BatchJobOutput, 200: BatchJobOutput},
        description="Create an open job for one model version (by version, alias, or the hospital's default).",
    )
    def post(self, request):
        data = BatchJobInput(data=request.data)
        data.is_valid(raise_exception=True)
        job, created = batch_job_create(
            membership=request.membership,
            idempotency_key=request.headers.get("Idempotency-Key", ""),
            request=request,
            **data.validated_data,
        )
        return Response(BatchJobOutput(job).data, status=status.HTTP_201_CREATED if created else status.HTTP_200_OK)


class BatchJobDetailApi(TenantApi):
    @extend_schema(parameters=[TENANT_HEADER], responses=BatchJobOutput)
    def get(self, request, job_id: int):
        job = batch_job_get(membership=request.membership, job_id=job_id, request=request)
        return Response(BatchJobOutput(job).data)


class BatchItemsInput(ApiInput):
    files = serializers.ListField(
        child=serializers.FileField(allow_empty_file=True),
        required=False,
        min_length=1,
        max_length=settings.DATA_UPLOAD_MAX_NUMBER_FILES,  # Django refuses more before any view runs
    )
    archive = serializers.FileField(required=False, help_text="one zip of images (PNG, JPEG, DICOM)")
    prefix = serializers.CharField(required=False, help_text="import every file under tenants/<id>/imports/…")
    screen = screen_input(f"{SCREEN_HELP} With a screen, send exactly one file in `files`.")


class BatchItemsApi(TenantApi):
    # the job has started, or an archive is still being unpacked; 422 a malformed screen
    api_errors = (Conflict, Unprocessable)

    @extend_schema(
        parameters=[TENANT_HEADER],
        request={"multipart/form-data": BatchItemsInput},
        responses={202: BatchJobOutput},
        description="Add items before the job starts: `files` (each becomes an item; a bad file a failed item), "
        "or one `archive` (zip; unpacked by a worker, the job starts once it is done), or a storage `prefix`.",
    )
    def post(self, request, job_id: int):
        membership = request.membership
        data = BatchItemsInput(data=request.data)
        if not data.is_valid():
            batch_job_get(membership=membership, job_id=job_id, request=request)  # a 404 comes first
            raise serializers.ValidationError(data.errors)
        files, archive, prefix = (
            request.FILES.getlist("files"),
            request.FILES.get("archive"),
            request.data.get("prefix"),
        )
        if sum(bool(x) for x in (files, archive, prefix)) != 1:
            batch_job_get(membership=membership, job_id=job_id, request=request)  # a 404 comes first
            raise Invalid("Send exactly one of: files, archive, prefix.", code="one_source")
        try:
            screen = screen_parse(data.validated_data["screen"])  # 422 in words before anything is stored
        except Unprocessable:
            batch_job_get(membership=membership, job_id=job_id, request=request)  # a 404 comes first
            raise
        if screen is not None and len(files) != 1:
            batch_job_get(membership=membership, job_id=job_id, request=request)  # a 404 comes first
            raise Invalid("A screen comes with exactly one file.", code="screen_one_file")
        if files:
            batch_items_add_files(membership=membership, job_id=job_id, files=files, request=request, screen=screen)
        elif archive:
            batch_upload_zip(membership=membership, job_id=job_id, archive=archive, request=request)
        else:
            batch_upload_prefix(membership=membership, job_id=job_id, prefix=str(prefix), request=request)
        job = batch_job_get(membership=membership, job_id=job_id, request=request)
        return Response(BatchJobOutput(job).data, status=status.HTTP_202_ACCEPTED)


class BatchJobActionApi(TenantApi):
    action = ""
    api_errors = (Conflict,)  # not in a state that can start, be cancelled or retry

    @extend_schema(parameters=[TENANT_HEADER], request=None, responses=BatchJobOutput)
    def post(self, request, job_id: int):
        service = {"start": batch_job_start, "cancel": batch_job_cancel, "retry": batch_job_retry}[self.action]
        service(membership=request.membership, job_id=job_id, request=request)
        job = batch_job_get(membership=request.membership, job_id=job_id, request=request)
        return Response(BatchJobOutput(job).data)


class _NoFormatOverride:
    URL_FORMAT_OVERRIDE = None

    def __getattr__(self, name):
        return getattr(api_settings, name)


class OwnFormatParameter(DefaultContentNegotiation):
    """`?format=` is the view's own parameter: DRF's renderer switch took `?format=csv` for a
    renderer it does not have and answered 404."""

    settings = _NoFormatOverride()


class BatchResultsApi(TenantApi):
    content_negotiation_class = OwnFormatParameter

    @extend_schema(
        parameters=[
            TENANT_HEADER,
            OpenApiParameter("format", str, OpenApiParameter.QUERY, enum=["csv", "json"], required=False),
        ],
        responses={(200, "text/csv"): OpenApiTypes.STR, (200, "application/json"): OpenApiTypes.OBJECT},
        description="One row per item, streamed: item, position, image, status, top_label, probability, "
        "model_version, error (the finding or the error in words).",
    )
    def get(self, request, job_id: int):
        result_format = request.query_params.get("format", "csv")
        if result_format not in ("csv", "json"):
            batch_job_get(membership=request.membership, job_id=job_id, request=request)  # a 404 comes first
            raise Invalid("format is csv or json.", code="bad_format")
        job = batch_results_open(membership=request.membership, job_id=job_id, request=request)
        if result_format == "json":
            return streaming_response(request, results_json(job), content_type="application/json")
        return streaming_response(request, results_csv(job), content_type="text/csv", filename=f"job-{job.pk}.csv")


class ModelVersionOutput(serializers.Serializer):
    id = serializers.IntegerField()
    model = serializers.CharField(source="model.name")
    version = serializers.CharField()
    serial = serializers.IntegerField(
        help_text="its integer version: the registration order within the model (1, 2, …), stable, never reused; "
        "what TF Serving and KServe clients name"
    )
    demo = serializers.BooleanField(source="model.is_demo")
    status = serializers.ChoiceField(
        choices=["validating", "ready", "refused"],
        help_text="validating: stored, a worker is running the registration checks; ready: it passed them "
        "and can read images; refused: it did not (refusal_reason says why)",
    )
    refusal_reason = serializers.CharField(help_text="why the registration checks refused it; empty otherwise")
    labels = serializers.ListField(child=serializers.CharField())
    weights_sha256 = serializers.CharField()
    created = serializers.DateTimeField()
    validated_at = serializers.DateTimeField(allow_null=True)


class ModelVersionListApi(TenantApi):
    pagination_class = NewestFirstPagination  # every list answers a page (the OpenAPI contract)

    @extend_schema(parameters=[TENANT_HEADER], responses=ModelVersionOutput(many=True))
    def get(self, request):
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(model_version_list(), request)
        return paginator.get_paginated_response(ModelVersionOutput(page, many=True).data)
