"""Operate the model registry: list versions, move aliases, split a hospital's traffic, pin it.

manage.py model list
manage.py model alias sightline-demo canary 1.1.0
manage.py model alias sightline-demo production 1.0.0+onnx-int8 --force   # past the agreement floor, logged
manage.py model split sightline-demo --hospital demo-general --version 1.1.0 --percent 10
manage.py model split sightline-demo --hospital demo-general --version 1.1.0 --percent 50 --shadow-percent 5
manage.py model split sightline-demo --hospital demo-general --percent 0      # end the split
manage.py model pin sightline-demo --hospital demo-general --version 1.0.0
manage.py model pin sightline-demo --hospital demo-general --clear
"""

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from accounts.models import Tenant
from core.errors import DomainError
from core.model_package import SHORT_HASH_CHARS
from recognition.models import AIModel, ModelAlias, ModelPin, ModelVersion, TrafficSplit
from recognition.services.registry import model_alias_move, model_pin_set, traffic_split_set
from recognition.services.shadow import traffic_split_shadow_set


class Command(BaseCommand):
    help = "Model registry operations for platform staff: list, alias, split, pin."

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="operation", required=True)
        sub.add_parser("list", help="models, versions, aliases, splits and pins")
        alias = sub.add_parser("alias", help="point an alias (production, canary) at a version")
        alias.add_argument("model")
        alias.add_argument("alias", choices=ModelAlias.Name.values)
        alias.add_argument("version")
        alias.add_argument(
            "--force",
            action="store_true",
            help="give production to a derived version under the agreement floor (logged as forced)",
        )
        split = sub.add_parser("split", help="send a share of one hospital's images to a version")
        split.add_argument("model")
        split.add_argument("--hospital", required=True)
        split.add_argument("--version")
        split.add_argument("--percent", type=int, required=True, help="1-99, or 0 to end the split")
        split.add_argument(
            "--shadow-percent",
            type=int,
            help="share (0-100) of each arm's images the other arm also reads, never shown to clinicians",
        )
        pin = sub.add_parser("pin", help="keep one hospital on a version")
        pin.add_argument("model")
        pin.add_argument("--hospital", required=True)
        group = pin.add_mutually_exclusive_group(required=True)
        group.add_argument("--version")
        group.add_argument("--clear", action="store_true")

    def handle(self, *args, operation, **options):
        try:
            getattr(self, f"_{operation}")(**options)
        except DomainError as exc:
            raise CommandError(exc.message) from exc

    def _model(self, name) -> AIModel:
        model = AIModel.objects.filter(name=name).first()
        if model is None:
            raise CommandError(f"no model named {name!r}")
        return model

    def _version(self, model, version) -> ModelVersion:
        row = ModelVersion.objects.filter(model=model, version=version).first()
        if row is None:
            raise CommandError(f"{model.name} has no version {version!r}")
        return row

    def _hospital(self, slug) -> Tenant:
        tenant = Tenant.objects.filter(slug=slug).first()
        if tenant is None:
            raise CommandError(f"no hospital with slug {slug!r}")
        return tenant

    def _list(self, **options):
        for model in AIModel.objects.order_by("name"):
            aliases = {a.version_id: a.name for a in ModelAlias.objects.filter(model=model)}
            self.stdout.write(f"{model.name}{' (demo)' if model.is_demo else ''}")
            for version in ModelVersion.objects.filter(model=model).order_by("created"):
                tag = f"  <- {aliases[version.pk]}" if version.pk in aliases else ""
                state = version.status if not version.refusal_reason else f"{version.status}: {version.refusal_reason}"
                agreement = version.evaluation.get("agreement") if version.evaluation else None
                if agreement is not None:
                    state = f"{state}, agrees with its parent on {agreement:.1%}"
                self.stdout.write(
                    f"  {version.label}  sha256 {version.weights_sha256[:SHORT_HASH_CHARS]}…  {state}{tag}"
                )
            for split in TrafficSplit.objects.filter(model=model).select_related("tenant", "version"):
                self.stdout.write(
                    f"  split: {split.tenant.slug} sends {split.percent}% to {split.version.version}"
                    f" (shadow reads {split.shadow_percent}%)"
                )
            for pin in ModelPin.objects.filter(model=model).select_related("tenant", "version"):
                self.stdout.write(f"  pin: {pin.tenant.slug} stays on {pin.version.version}")

    def _alias(self, *, model, alias, version, force, **options):
        row = self._model(model)
        model_alias_move(model=row, alias=alias, version=self._version(row, version), force=force)
        self.stdout.write(self.style.SUCCESS(f"{model}@{alias} -> {version}"))

    def _split(self, *, model, hospital, version, percent, shadow_percent=None, **options):
        row = self._model(model)
        target = self._version(row, version) if version else None
        if percent and target is None:
            raise CommandError("a split needs --version")
        tenant = self._hospital(hospital)
        with transaction.atomic():
            split = traffic_split_set(tenant=tenant, model=row, version=target, percent=percent)
            if split is not None and shadow_percent is not None:
                split = traffic_split_shadow_set(tenant=tenant, model=row, shadow_percent=shadow_percent)
        message = f"{hospital}: {percent}% of images to {version}" if percent else f"{hospital}: split ended"
        if split is not None:
            message += f", {split.shadow_percent}% of each arm's images read by the other too (shadow reads)"
        self.stdout.write(self.style.SUCCESS(message))

    def _pin(self, *, model, hospital, version, clear, **options):
        row = self._model(model)
        model_pin_set(
            tenant=self._hospital(hospital), model=row, version=None if clear else self._version(row, version)
        )
        self.stdout.write(self.style.SUCCESS(f"{hospital}: {'pin removed' if clear else f'pinned to {version}'}"))
