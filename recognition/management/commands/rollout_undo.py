"""Undo the latest rollout change of a model in one step (logged):

manage.py rollout_undo sightline-demo                          # the latest alias move
manage.py rollout_undo sightline-demo --tenant demo-general    # the hospital's latest split or pin change
manage.py rollout_undo sightline-demo --tenant demo-general --kind split
"""

from django.core.management.base import BaseCommand, CommandError

from accounts.models import Tenant
from core.errors import DomainError
from recognition.models import AIModel, ModelVersion, RolloutChange
from recognition.services.registry import rollout_undo


def _describe(state) -> str:
    if not state:
        return "nothing"
    version = ModelVersion.objects.select_related("model").filter(pk=state["version"]).first()
    shown = version.label if version is not None else f"version #{state['version']}"
    return f"{shown} at {state['percent']}%" if "percent" in state else shown


class Command(BaseCommand):
    help = "Revert the latest alias move (or a hospital's split or pin change) of a model, in one step."

    def add_arguments(self, parser):
        parser.add_argument("model")
        parser.add_argument("--tenant", help="the hospital's slug: its splits and pins (aliases have none)")
        parser.add_argument("--kind", choices=RolloutChange.Kind.values)

    def handle(self, *args, model, tenant, kind, **options):
        row = AIModel.objects.filter(name=model).first()
        if row is None:
            raise CommandError(f"no model named {model!r}")
        hospital = None
        if tenant:
            hospital = Tenant.objects.filter(slug=tenant).first()
            if hospital is None:
                raise CommandError(f"no hospital with slug {tenant!r}")
        try:
            change = rollout_undo(model=row, tenant=hospital, kind=kind or "")
        except DomainError as exc:
            raise CommandError(exc.message) from exc
        where = f" {change.name}" if change.name else f" of {hospital.slug}" if hospital else ""
        self.stdout.write(
            self.style.SUCCESS(
                f"Undone the {change.kind}{where} change of {change.created:%Y-%m-%d %H:%M}: "
                f"back from {_describe(change.after)} to {_describe(change.before)}"
            )
        )
