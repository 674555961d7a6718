"""Let one hospital name a version or an alias of a model beyond what it reads with anyway (its
pin, else the production alias and its split), in a protocol URL or the upload API's choice.

manage.py model_allow sightline-demo --hospital demo-general --model-version 1.1.0
manage.py model_allow sightline-demo --hospital demo-general --alias canary
manage.py model_allow sightline-demo --hospital demo-general --alias canary --revoke
manage.py model_allow sightline-demo --hospital demo-general --list
"""

from django.core.management.base import BaseCommand, CommandError

from accounts.models import Tenant
from core.errors import DomainError
from recognition.models import AIModel, ModelAlias, ModelAllowance, ModelVersion
from recognition.services.registry import model_allowance_set, versions_available


class Command(BaseCommand):
    help = "Platform staff: allow (or --revoke) a hospital a version or an alias of a model; --list what it may use."

    def add_arguments(self, parser):
        parser.add_argument("model")
        parser.add_argument("--hospital", required=True, help="the hospital's slug")
        group = parser.add_mutually_exclusive_group(required=True)
        group.add_argument("--model-version", dest="model_version", help="a semantic version of the model")
        group.add_argument("--alias", choices=ModelAlias.Name.values)
        group.add_argument("--list", action="store_true", dest="listing", help="the versions the hospital may name now")
        parser.add_argument("--revoke", action="store_true", help="take the allowance back")

    def handle(self, *args, model, hospital, model_version, alias, listing, revoke, **options):
        ai_model = AIModel.objects.filter(name=model).first()
        if ai_model is None:
            raise CommandError(f"no model named {model!r}")
        tenant = Tenant.objects.filter(slug=hospital).first()
        if tenant is None:
            raise CommandError(f"no hospital with slug {hospital!r}")
        if listing:
            for row in versions_available(tenant=tenant, model=ai_model):
                self.stdout.write(f"v{row.serial} {row.version}")
            for allowance in ModelAllowance.objects.for_tenant(tenant).filter(model=ai_model, alias__gt=""):
                self.stdout.write(f"alias {allowance.alias} (allowed)")
            return
        chosen = None
        if model_version:
            chosen = ModelVersion.objects.filter(model=ai_model, version=model_version).first()
            if chosen is None:
                raise CommandError(f"{model} has no version {model_version!r}")
        try:
            model_allowance_set(tenant=tenant, model=ai_model, version=chosen, alias=alias or "", allowed=not revoke)
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        what = f"version {model_version}" if model_version else f"the {alias} alias"
        self.stdout.write(f"{hospital} {'may no longer' if revoke else 'may'} name {what} of {model}")
