"""Every alias move, split and pin change is history (RolloutChange, in the same transaction),
and the latest one comes undone in one step, from the command line or the admin, logged."""

from __future__ import annotations

import pytest
from django.core.management import CommandError
from django.db import transaction

from accounts.models import AccessEvent
from recognition.models import ModelAlias, ModelPin, RolloutChange, TrafficSplit
from recognition.services.registry import model_alias_move, rollout_undo, traffic_split_set
from tests.conftest import PASSWORD
from tests.integration.test_registry import run, two_versions  # noqa: F401  (a fixture)

pytestmark = pytest.mark.django_db


def production(model):
    return ModelAlias.objects.get(model=model, name="production").version


def test_an_alias_move_is_undone_in_one_step_and_logged(two_versions):  # noqa: F811
    older, newer = two_versions
    model = older.model
    run("model", "alias", "sightline-demo", "production", "1.1.0")
    change = RolloutChange.objects.filter(kind="alias").latest("id")
    assert (change.name, change.before, change.after) == ("production", {"version": older.pk}, {"version": newer.pk})
    assert not change.forced

    out = run("rollout_undo", "sightline-demo")
    assert "Undone the alias production change" in out and "back from v2 · 1.1.0 to v1 · 1.0.0" in out
    assert production(model) == older
    change.refresh_from_db()
    assert change.undone_at is not None
    assert AccessEvent.objects.filter(action="model.rollout_undo", target_id=str(change.pk)).count() == 1

    # the next undo goes one step further back (production's first move, at registration): no alias
    run("rollout_undo", "sightline-demo")
    assert not ModelAlias.objects.filter(model=model, name="production").exists()
    with pytest.raises(CommandError, match="no alias change of sightline-demo left to undo"):
        run("rollout_undo", "sightline-demo", "--kind", "alias")


def test_a_split_and_a_pin_are_undone_per_hospital(two_versions, hospital_a, hospital_b):  # noqa: F811
    older, newer = two_versions
    model = older.model
    traffic_split_set(tenant=hospital_a, model=model, version=newer, percent=10)
    traffic_split_set(tenant=hospital_a, model=model, version=newer, percent=50)
    traffic_split_set(tenant=hospital_b, model=model, version=newer, percent=20)
    run("model", "pin", "sightline-demo", "--hospital", "demo-general", "--version", "1.0.0")

    out = run("rollout_undo", "sightline-demo", "--tenant", "demo-general", "--kind", "split")
    assert "back from v2 · 1.1.0 at 50% to v2 · 1.1.0 at 10%" in out
    assert TrafficSplit.objects.get(tenant=hospital_a).percent == 10  # noqa: PLR2004
    assert TrafficSplit.objects.get(tenant=hospital_b).percent == 20  # noqa: PLR2004  (another hospital's: untouched)
    assert ModelPin.objects.filter(tenant=hospital_a).exists()  # --kind split: the pin stays

    run("rollout_undo", "sightline-demo", "--tenant", "demo-general")  # the latest of any kind: the pin
    assert not ModelPin.objects.filter(tenant=hospital_a).exists()
    run("rollout_undo", "sightline-demo", "--tenant", "demo-general")  # the split's first step: no split
    assert not TrafficSplit.objects.filter(tenant=hospital_a).exists()
    assert AccessEvent.objects.filter(action="model.rollout_undo", tenant=hospital_a).count() == 3  # noqa: PLR2004
    with pytest.raises(CommandError, match="for demo-general left to undo"):
        run("rollout_undo", "sightline-demo", "--tenant", "demo-general")


def test_a_change_and_its_history_row_share_one_transaction(two_versions):  # noqa: F811
    older, newer = two_versions

    class RolledBack(Exception):
        pass

    before = RolloutChange.objects.count()
    with pytest.raises(RolledBack), transaction.atomic():
        model_alias_move(model=older.model, alias="production", version=newer)
        raise RolledBack
    assert RolloutChange.objects.count() == before and production(older.model) == older


def test_staff_undo_from_the_admin(client, two_versions, django_user_model):  # noqa: F811
    older, newer = two_versions
    staff = django_user_model.objects.create_superuser("platform", password=PASSWORD)
    client.force_login(staff)
    model_alias_move(model=older.model, alias="production", version=newer, moved_by=staff)
    change = RolloutChange.objects.latest("id")
    assert change.changed_by == staff
    response = client.post(
        "/admin/recognition/rolloutchange/",
        {"action": "undo", "_selected_action": [change.pk]},
        follow=True,
    )
    assert response.status_code == 200 and b"Undone: alias of sightline-demo" in response.content
    assert production(older.model) == older
    assert AccessEvent.objects.filter(action="model.rollout_undo", actor=staff).count() == 1


def test_undo_refuses_an_unknown_kind(two_versions):  # noqa: F811
    from core.errors import Invalid

    with pytest.raises(Invalid, match="not a kind of change"):
        rollout_undo(model=two_versions[0].model, kind="everything")
