"""API v1: one view per operation; input serializer → service or selector → output serializer."""

from __future__ import annotations

from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.pagination import CursorPagination
from rest_framework.response import Response

from accounts.apis import TENANT_HEADER, TenantApi

from .selectors import image_get, image_heatmap_get, image_list
from .services.images import StudyFields, image_upload


class ResultOutput(serializers.Serializer):
    model = serializers.CharField(source="model_version.model.name")
    model_version = serializers.CharField(source="model_version.version")
    demo = serializers.BooleanField(source="model_version.model.is_demo")
    top_label = serializers.CharField()
    top_probability = serializers.FloatField()
    probabilities = serializers.DictField(child=serializers.FloatField())
    positive_labels = serializers.ListField(child=serializers.CharField())
    has_heatmap = serializers.SerializerMethodField()
    created = serializers.DateTimeField()

    def get_has_heatmap(self, result) -> bool:
        return bool(result.heatmap)


class StudyOutput(serializers.Serializer):
    id = serializers.IntegerField()
    patient_id = serializers.CharField(source="patient_pseudonym")
    accession_number = serializers.CharField()
    modality = serializers.CharField()
    description = serializers.CharField()
    study_date = serializers.DateField()


class ImageBaseOutput(serializers.Serializer):
    id = serializers.IntegerField()
    study = StudyOutput()
    width = serializers.IntegerField()
    height = serializers.IntegerField()
    format = serializers.CharField()
    created = serializers.DateTimeField()


class ImageSummaryOutput(ImageBaseOutput):
    status = serializers.CharField(source="ai_status", allow_null=True)
    error = serializers.CharField(source="ai_error", allow_null=True)
    top_label = serializers.CharField(source="ai_top_label", allow_null=True)
    top_probability = serializers.FloatField(source="ai_top_probability", allow_null=True)


class ImageCreatedOutput(ImageBaseOutput):
    status = serializers.SerializerMethodField()

    def get_status(self, image) -> str:
        return image.inference_requests.order_by("-id").values_list("status", flat=True).first()


class ImageDetailOutput(ImageSummaryOutput):
    results = ResultOutput(many=True)


class ImageUploadInput(serializers.Serializer):
    file = serializers.FileField(allow_empty_file=True)
    patient_id = serializers.CharField(max_length=64, required=False, default="")
    accession_number = serializers.CharField(max_length=64, required=False, default="")
    modality = serializers.CharField(max_length=16, required=False, default="")
    study_description = serializers.CharField(max_length=200, required=False, default="")
    study_date = serializers.DateField(required=False, allow_null=True, default=None)


class ImagePagination(CursorPagination):
    ordering = ("-created", "-id")
    page_size = 50
    max_page_size = 200
    page_size_query_param = "page_size"


class ImageListCreateApi(TenantApi):
    @extend_schema(parameters=[TENANT_HEADER], responses=ImageSummaryOutput(many=True))
    def get(self, request):
        paginator = ImagePagination()
        page = paginator.paginate_queryset(image_list(membership=request.membership, request=request), request)
        return paginator.get_paginated_response(ImageSummaryOutput(page, many=True).data)

    @extend_schema(
        parameters=[TENANT_HEADER],
        request={"multipart/form-data": ImageUploadInput},
        responses={201: ImageCreatedOutput},
        description="Upload one PNG or JPEG. The AI read is queued; watch /ws/events/ or poll the image.",
    )
    def post(self, request):
        data = ImageUploadInput(data=request.data)
        data.is_valid(raise_exception=True)
        fields = data.validated_data
        image = image_upload(
            membership=request.membership,
            upload=fields["file"],
            study=StudyFields(
                patient_pseudonym=fields["patient_id"],
                accession_number=fields["accession_number"],
                modality=fields["modality"],
                description=fields["study_description"],
                study_date=fields["study_date"],
            ),
            request=request,
        )
        return Response(ImageCreatedOutput(image).data, status=status.HTTP_201_CREATED)


class ImageDetailApi(TenantApi):
    @extend_schema(parameters=[TENANT_HEADER], responses=ImageDetailOutput)
    def get(self, request, image_id: int):
        image = image_get(membership=request.membership, image_id=image_id, request=request)
        return Response(ImageDetailOutput(image).data)


class ImageFileApi(TenantApi):
    @extend_schema(parameters=[TENANT_HEADER], responses={(200, "image/png"): OpenApiTypes.BINARY})
    def get(self, request, image_id: int):
        image = image_get(membership=request.membership, image_id=image_id, request=request, action="image.download")
        response = FileResponse(image.file.open("rb"), content_type="image/png")
        response["Cache-Control"] = "private, no-store"
        return response


class ImageHeatmapApi(TenantApi):
    @extend_schema(
        parameters=[TENANT_HEADER],
        responses={(200, "image/png"): OpenApiTypes.BINARY},
        description="The Grad-CAM overlay (transparent PNG at the image's size) of the newest result that has one.",
    )
    def get(self, request, image_id: int):
        result = image_heatmap_get(membership=request.membership, image_id=image_id, request=request)
        response = FileResponse(result.heatmap.open("rb"), content_type="image/png")
        response["Cache-Control"] = "private, no-store"
        return response
