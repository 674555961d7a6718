from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class RecognitionConfig(AppConfig):
    name = "recognition"
    verbose_name = "Images and AI findings"

    def ready(self) -> None:
        from .models import AIModel, ModelAlias, ModelPin, ModelVersion, TrafficSplit
        from .services.registry import routing_changed

        def changed(sender, **kwargs) -> None:
            routing_changed()

        # the rows model_routing reads: a process's remembered routing is forgotten when one changes
        for model in (AIModel, ModelVersion, ModelAlias, TrafficSplit, ModelPin):
            post_save.connect(changed, sender=model, weak=False, dispatch_uid=f"routing-changed-{model.__name__}-save")
            post_delete.connect(
                changed, sender=model, weak=False, dispatch_uid=f"routing-changed-{model.__name__}-delete"
            )
