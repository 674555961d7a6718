"""DICOM over TLS (PS3.15 B.1) behind its settings: with a CA, mutual TLS; a node with a
fingerprint must present exactly that client certificate. Certificates made here (cryptography)."""

import datetime as dt
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from accounts.models import Role
from core.errors import Invalid
from dicomnet.models import DicomNode
from dicomnet.nodes import certificate_fingerprint, dicom_node_create, hospital_ae_title_assign
from tests.conftest import member
from tests.integration.test_dicom_scp import scp_serving

pytestmark = pytest.mark.django_db(transaction=True)
ADDRESS = "127.0.0.1"


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def issue(common: str, *, issuer=None, ca: bool = False, server: bool = False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    signer_key, signer_name = (issuer[1], issuer[0].subject) if issuer else (key, _name(common))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common))
        .issuer_name(signer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    return builder.sign(signer_key, hashes.SHA256()), key


def write(directory: Path, name: str, cert, key) -> tuple[Path, Path]:
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def pki(tmp_path):
    ca = issue("Sightline test CA", ca=True)
    server = issue("localhost", issuer=ca, server=True)
    client = issue("CT2", issuer=ca)
    other = issue("someone else", issuer=ca)
    paths = {
        "ca": write(tmp_path, "ca", *ca)[0],
        "server": write(tmp_path, "server", *server),
        "client": write(tmp_path, "client", *client),
        "other": write(tmp_path, "other", *other),
    }
    paths["client_fingerprint"] = certificate_fingerprint(client[0].public_bytes(serialization.Encoding.DER))
    return paths


@pytest.fixture
def tls_scp(settings, pki):
    settings.SIGHTLINE_DICOM_TLS_CERT, settings.SIGHTLINE_DICOM_TLS_KEY = map(str, pki["server"])
    settings.SIGHTLINE_DICOM_TLS_CA = str(pki["ca"])
    yield from scp_serving(settings)


@pytest.fixture
def node(hospital_a, pki):
    hospital_ae_title_assign(tenant=hospital_a, ae_title="SL_A")
    admin = member(hospital_a, "admin-a", Role.TENANT_ADMIN)
    return dicom_node_create(
        actor=admin, name="CT", ae_title="CT2", host=ADDRESS, tls_client_fingerprint=pki["client_fingerprint"]
    )


def associate(scp, pki, certificate: str | None):
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"]))
    if certificate:
        context.load_cert_chain(*map(str, pki[certificate]))
    scu = AE(ae_title="CT2")
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 10
    scu.add_requested_context(Verification)
    return scu.associate(ADDRESS, scp.port, ae_title="SL_A", tls_args=(context, "localhost"))


def test_the_node_with_its_certificate_is_let_in_over_tls(tls_scp, node, pki):
    assoc = associate(tls_scp, pki, "client")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_another_certificate_of_the_same_ca_is_not_that_node(tls_scp, node, pki):
    assoc = associate(tls_scp, pki, "other")
    assert assoc.is_rejected and assoc.acceptor.primitive.diagnostic == 0x03
    # without a fingerprint the CA's word is enough
    DicomNode.objects.filter(pk=node.pk).update(tls_client_fingerprint="")
    assoc = associate(tls_scp, pki, "other")
    assert assoc.is_established
    assoc.release()


def test_no_client_certificate_no_association(tls_scp, node, pki):
    assoc = associate(tls_scp, pki, None)
    assert not assoc.is_established


@pytest.mark.parametrize(
    "configured", [{}, {"SIGHTLINE_DICOM_TLS_CA": "/etc/ca.pem"}, {"SIGHTLINE_DICOM_TLS_CERT": "/x"}]
)
def test_a_fingerprint_is_refused_without_mutual_tls(hospital_a, pki, settings, configured):
    settings.SIGHTLINE_DICOM_TLS_CERT = settings.SIGHTLINE_DICOM_TLS_CA = ""
    for name, value in configured.items():
        setattr(settings, name, value)
    admin = member(hospital_a, "admin-a", Role.TENANT_ADMIN)
    with pytest.raises(Invalid, match="mutual TLS"):
        dicom_node_create(
            actor=admin, name="CT", ae_title="CT2", host=ADDRESS, tls_client_fingerprint=pki["client_fingerprint"]
        )
    assert not DicomNode.objects.exists()
    assert dicom_node_create(actor=admin, name="CT", ae_title="CT2", host=ADDRESS)  # without one it is fine
