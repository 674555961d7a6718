"""The "Platform auditors" group: the one way platform staff are given the access log (on the
site's access-log page and in the Django admin), so who may read it is one list to review."""

from django.contrib.auth.management import create_permissions
from django.db import migrations

GROUP = "Platform auditors"
PERMISSION = "audit_all_hospitals"


def create_group(apps, schema_editor):
    # permissions are created after migrations run; make sure this one exists already
    app_config = apps.get_app_config("accounts")
    app_config.models_module = True
    create_permissions(app_config, apps=apps, verbosity=0)
    app_config.models_module = None
    Group = apps.get_model("auth", "Group")
    Permission = apps.get_model("auth", "Permission")
    group, _ = Group.objects.get_or_create(name=GROUP)
    group.permissions.add(Permission.objects.get(codename=PERMISSION, content_type__app_label="accounts"))


def remove_group(apps, schema_editor):
    apps.get_model("auth", "Group").objects.filter(name=GROUP).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0003_audit_hash_chain"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("contenttypes", "0002_remove_content_type_name"),
    ]

    operations = [migrations.RunPython(create_group, remove_group)]
