"""The C-STORE SCP in this process (dicomnet.scp.StoreSCP on a free port), a pynetdicom SCU as
the peer: who is let in, what is refused and counted, the byte limit, and what a C-STORE makes.
DCMTK and Orthanc talk to the SCP as a process of its own in tests/e2e/test_dicom_scp_live.py."""

import pytest
from django.core.cache import cache
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from accounts.models import AccessEvent, Role
from dicomnet.models import DicomNode, Instance
from dicomnet.nodes import dicom_node_create, dicom_node_deactivate, hospital_ae_title_assign
from dicomnet.scp import StoreSCP
from recognition.models import Image, InferenceRequest
from tests.conftest import member
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.django_db(transaction=True)
ADDRESS = "127.0.0.1"


def clear_rejections() -> None:
    cache.delete_many([f"dicom:rejections:{ADDRESS}", f"dicom:throttle-logged:{ADDRESS}"])


def scp_serving(settings):
    """A real SCP in this process on a free port (``server.port``), with no rejections counted
    before or after it: the SCP fixtures here and in test_dicom_tls.py."""
    settings.SIGHTLINE_DICOM_TIMEOUT = 10
    clear_rejections()
    server = StoreSCP()
    port = free_port()
    server.start(host=ADDRESS, port=port)
    server.port = port
    yield server
    server.shutdown()
    clear_rejections()


@pytest.fixture
def scp(settings):
    yield from scp_serving(settings)


@pytest.fixture
def node(hospital_a, demo_model):
    hospital_ae_title_assign(tenant=hospital_a, ae_title="SL_A")
    admin = member(hospital_a, "admin-a", Role.TENANT_ADMIN)
    return dicom_node_create(actor=admin, name="CT room 2", ae_title="CT2", host=ADDRESS)


def associate(scp, *, calling="CT2", called="SL_A"):
    scu = AE(ae_title=calling)
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 10
    scu.add_requested_context(Verification)
    scu.add_requested_context(CTImageStorage)
    return scu.associate(ADDRESS, scp.port, ae_title=called)


def accepted(assoc) -> bool:
    established = assoc.is_established
    if established:
        assoc.release()
    return established


def rejection(assoc) -> tuple[int, int, int]:
    assert assoc.is_rejected, "the association was not rejected"
    answer = assoc.acceptor.primitive
    return (answer.result, answer.result_source, answer.diagnostic)


def test_a_registered_node_is_answered_and_seen(scp, node):
    assoc = associate(scp)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    node.refresh_from_db()
    assert node.last_seen is not None


def test_an_unknown_calling_ae_title_is_rejected_and_logged(scp, node, hospital_a):
    assert rejection(associate(scp, calling="STRANGER")) == (0x01, 0x01, 0x03)
    entry = AccessEvent.objects.get(action="dicom.association_rejected")
    assert entry.tenant == hospital_a and entry.outcome == "denied" and entry.ip_address == ADDRESS
    assert entry.actor_label == "dicom:STRANGER" and entry.target_id == "SL_A"


def test_an_unknown_called_ae_title_is_rejected_on_the_platform_chain(scp, node):
    assert rejection(associate(scp, called="NOBODY")) == (0x01, 0x01, 0x07)
    entry = AccessEvent.objects.get(action="dicom.association_rejected")
    assert entry.tenant is None and entry.target_id == "NOBODY"


def test_a_node_from_another_host_or_deactivated_is_rejected(scp, node, hospital_a):
    DicomNode.objects.filter(pk=node.pk).update(host="10.9.9.9")
    assert rejection(associate(scp)) == (0x01, 0x01, 0x03)
    DicomNode.objects.filter(pk=node.pk).update(host=ADDRESS)
    assert accepted(associate(scp))
    dicom_node_deactivate(actor=member(hospital_a, "admin-a", Role.TENANT_ADMIN), node=node)
    assert rejection(associate(scp)) == (0x01, 0x01, 0x03)


def test_repeated_rejections_from_one_address_are_throttled_and_logged_once(scp, node, settings):
    settings.SIGHTLINE_DICOM_REJECTIONS_PER_WINDOW = 3
    for _ in range(3):
        assert rejection(associate(scp, calling="PROBE"))[0] == 0x01
    for _ in range(3):  # even a registered node, from that address, waits out the window
        assert rejection(associate(scp)) == (0x02, 0x03, 0x01)
    assert AccessEvent.objects.filter(action="dicom.association_rejected").count() == 3
    assert AccessEvent.objects.filter(action="dicom.association_throttled").count() == 1
    clear_rejections()
    assert accepted(associate(scp))


def test_a_c_store_is_ingested_as_the_node_and_a_second_copy_creates_nothing(scp, node):
    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    assoc = associate(scp)
    assert assoc.send_c_store(dataset).Status == 0x0000
    assert assoc.send_c_store(dataset).Status == 0x0000  # the PACS sent it twice
    assoc.release()
    instance = Instance.objects.get()
    assert instance.received_from == node and instance.sop_instance_uid == dataset.SOPInstanceUID
    image = Image.objects.get()
    assert image.uploaded_by == node.service_account.user
    assert InferenceRequest.objects.filter(image=image).exists()
    entry = AccessEvent.objects.get(action="dicom.instance_received")
    assert entry.actor == node.service_account.user and entry.ip_address == ADDRESS
    assert entry.user_agent == f"DICOM CT2 (node {node.pk})"


def test_past_the_association_byte_limit_the_store_fails_and_the_association_ends(scp, node, settings):
    settings.SIGHTLINE_DICOM_MAX_ASSOCIATION_BYTES = 20_000  # CT_small.dcm is about 39 kB
    assoc = associate(scp)
    status = assoc.send_c_store(dcmread(get_testdata_file("CT_small.dcm")))
    assert status.Status == 0xA700
    assert not Instance.objects.exists()
    assoc.release()


def test_a_refused_instance_answers_its_dimse_status_with_a_comment(scp, node):
    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    dataset.StudyInstanceUID = "1.2.3.4"
    first = associate(scp)
    assert first.send_c_store(dataset).Status == 0x0000
    other = dcmread(get_testdata_file("CT_small.dcm"))
    other.StudyInstanceUID, other.SOPInstanceUID, other.PatientID = "1.2.3.4", "1.2.3.5", "SOMEONE-ELSE"
    status = first.send_c_store(other)
    first.release()
    assert status.Status == 0xC000 and "another patient" in status.ErrorComment


@pytest.mark.heavy_drill
def test_several_associations_delivering_one_study_at_once_make_it_once(scp, node):
    """PostgreSQL (row locks): four associations send the same two series, in different orders,
    at the same moment: one study, one series per Series Instance UID, one instance per SOP UID."""
    import random
    import threading

    from django.db import connection
    from pydicom.uid import generate_uid

    from recognition.models import Series, Study

    if connection.vendor != "postgresql":
        pytest.skip("the drill proves PostgreSQL's row locking (CI's PostgreSQL pass)")
    study_uid, series_uids = generate_uid(), [generate_uid(), generate_uid()]
    datasets = []
    for series_number, series_uid in enumerate(series_uids, start=1):
        for number in range(1, 6):
            ds = dcmread(get_testdata_file("CT_small.dcm"))
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber = study_uid, series_uid, series_number
            ds.SOPInstanceUID, ds.InstanceNumber = generate_uid(), number
            datasets.append(ds)
    statuses: list[int] = []
    start = threading.Barrier(4)

    def deliver(seed: int) -> None:
        order = datasets[:]
        random.Random(seed).shuffle(order)
        assoc = associate(scp)
        start.wait(timeout=30)
        for ds in order:
            statuses.append(assoc.send_c_store(ds).Status)
        assoc.release()

    threads = [threading.Thread(target=deliver, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert statuses == [0x0000] * 40
    assert Study.objects.filter(study_instance_uid=study_uid).count() == 1
    assert sorted(Series.objects.values_list("series_instance_uid", flat=True)) == sorted(series_uids)
    assert Instance.objects.count() == 10 and Image.objects.count() == 10
    assert sorted(Series.objects.values_list("number", flat=True)) == [1, 2]


def test_a_deflated_dataset_is_inflated_with_the_bound(scp, node, settings):
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    scu = AE(ae_title="CT2")
    scu.add_requested_context(CTImageStorage, DeflatedExplicitVRLittleEndian)
    assoc = scu.associate(ADDRESS, scp.port, ae_title="SL_A")
    assert assoc.send_c_store(dataset).Status == 0x0000
    settings.SIGHTLINE_MAX_UPLOAD_BYTES = 30_000  # CT_small inflates to about 39 kB
    bomb = dcmread(get_testdata_file("CT_small.dcm"))
    bomb.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    status = assoc.send_c_store(bomb)
    assoc.release()
    assert status.Status == 0xA700 and "larger than" in status.ErrorComment
    assert Instance.objects.get().transfer_syntax_uid == DeflatedExplicitVRLittleEndian


def test_associations_past_the_limit_are_rejected_for_now(scp, node):
    scp.ae.maximum_associations = 1  # SIGHTLINE_DICOM_MAX_ASSOCIATIONS, read when the SCP starts
    first = associate(scp)
    assert first.is_established
    assert rejection(associate(scp)) == (0x02, 0x03, 0x02)  # transient, local limit exceeded
    first.release()


class _FailingCache:
    """A cache whose writes fail (``reads`` too, when asked): Redis out of memory, or down."""

    def __init__(self, *, reads: bool) -> None:
        self.reads = reads

    def get(self, *args, **kwargs):
        if self.reads:
            raise ConnectionError("redis is down")
        return None

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise ConnectionError("redis is down")

        return fail


def test_a_rejection_is_logged_even_when_it_cannot_be_counted(scp, node, hospital_a, monkeypatch):
    monkeypatch.setattr("dicomnet.scp.cache", _FailingCache(reads=False))
    assert rejection(associate(scp, calling="STRANGER")) == (0x01, 0x01, 0x03)
    entry = AccessEvent.objects.get(action="dicom.association_rejected")
    assert entry.tenant == hospital_a and entry.actor_label == "dicom:STRANGER"


def test_with_the_cache_down_associations_are_refused_and_logged(scp, node, monkeypatch):
    monkeypatch.setattr("dicomnet.scp.cache", _FailingCache(reads=True))
    assert rejection(associate(scp)) == (0x02, 0x03, 0x01)  # fail closed, transient: try again later
    entry = AccessEvent.objects.get(action="dicom.association_rejected")
    assert entry.outcome == "denied" and entry.actor_label == "dicom:CT2" and entry.target_id == ADDRESS


def _closes_by_thread(monkeypatch) -> list[str]:
    import threading

    from django.db import connections

    closed: list[str] = []
    real = connections.close_all

    def close_all():
        closed.append(threading.current_thread().name)
        real()

    monkeypatch.setattr(connections, "close_all", close_all)
    return closed


def test_a_rejected_association_closes_its_threads_database_connections(scp, node, monkeypatch):
    closed = _closes_by_thread(monkeypatch)
    assert rejection(associate(scp, calling="STRANGER"))[0] == 0x01
    import time

    for _ in range(50):
        if any(name.startswith("AcceptorThread") for name in closed):
            break
        time.sleep(0.05)
    assert any(name.startswith("AcceptorThread") for name in closed)


def test_a_dropped_connection_closes_its_threads_database_connections(scp, node, monkeypatch):
    import time

    closed = _closes_by_thread(monkeypatch)
    assoc = associate(scp)
    assert assoc.is_established
    assoc.dul.socket.socket.close()  # no A-RELEASE, no A-ABORT: the cable is pulled
    for _ in range(100):
        if any(name.startswith("AcceptorThread") for name in closed):
            break
        time.sleep(0.05)
    assoc.kill()
    assert any(name.startswith("AcceptorThread") for name in closed)


def test_a_node_deactivated_during_its_association_stores_no_more(scp, node, hospital_a):
    dataset = dcmread(get_testdata_file("CT_small.dcm"))
    assoc = associate(scp)
    assert assoc.send_c_store(dataset).Status == 0x0000
    dicom_node_deactivate(actor=member(hospital_a, "admin-a", Role.TENANT_ADMIN), node=node)
    dataset.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    status = assoc.send_c_store(dataset)
    assoc.release()
    assert status.Status == 0x0124 and "no longer registered" in status.ErrorComment
    assert Instance.objects.count() == 1


def test_one_hospital_cannot_hold_every_association(scp, node, hospital_b, settings):
    settings.SIGHTLINE_DICOM_MAX_ASSOCIATIONS_PER_HOSPITAL = 1
    hospital_ae_title_assign(tenant=hospital_b, ae_title="SL_B")
    admin_b = member(hospital_b, "admin-b", Role.TENANT_ADMIN)
    dicom_node_create(actor=admin_b, name="MR", ae_title="MR1", host=ADDRESS)
    first = associate(scp)
    assert first.is_established
    assert rejection(associate(scp)) == (0x02, 0x03, 0x02)  # hospital A is at its cap
    assert accepted(associate(scp, calling="MR1", called="SL_B"))  # hospital B is not
    first.release()
    assert accepted(associate(scp))
