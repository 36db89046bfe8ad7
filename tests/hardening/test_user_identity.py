"""User Identity Negotiation (PS3.7 D.3.3.7), enforced when configured.

A missing or wrong identity is rejected with A-ASSOCIATE-RJ rejected-permanent, source
"DICOM UL service-provider (ACSE related)", reason "no-reason-given", as D.3.3.7 asks.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.pdu_primitives import UserIdentityNegotiation

from tests.hardening.nodes import hardened_node
from tests.hardening.rawdicom import raw_peer, user_identity_item
from tests.peers import PYDICOM_FILES, NodeProcess, storescu

SECRET = "s3cret-Pa55"
REJECTED = (0x01, 0x02, 0x01)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    identity = {"required": True, "users": [
        {"ae_title": "TESTSCU", "username": "testscu", "password": SECRET},
        {"ae_title": "STORESCU", "username": "storescu", "password": SECRET},
        {"ae_title": "ORTHANC", "username": "pacs"}]}
    callers = [{"ae_title": a, "host": "127.0.0.1"} for a in ("TESTSCU", "STORESCU", "ORTHANC")]
    with hardened_node(tmp_path_factory.mktemp("identity"), callers=callers,
                       extra={"security": {"user_identity": identity}}) as proc:
        yield proc


CASES: dict[str, tuple[str, bytes, bool]] = {
    "right username and passcode": ("TESTSCU", user_identity_item(2, b"testscu",
                                                                  SECRET.encode()), True),
    "username alone where a rule has no password": ("ORTHANC", user_identity_item(1, b"pacs"),
                                                    True),
    "no identity": ("TESTSCU", b"", False),
    "wrong passcode": ("TESTSCU", user_identity_item(2, b"testscu", b"guess"), False),
    "empty passcode": ("TESTSCU", user_identity_item(2, b"testscu", b""), False),
    "username alone where a password is required": ("TESTSCU",
                                                    user_identity_item(1, b"testscu"), False),
    "another caller's credentials": ("TESTSCU", user_identity_item(2, b"storescu",
                                                                   SECRET.encode()), False),
    "a JSON web token": ("TESTSCU", user_identity_item(5, b"eyJhbGciOi.e30.sig"), False),
    "unknown username": ("ORTHANC", user_identity_item(1, b"intruder"), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_identity_is_enforced(node: NodeProcess, case: str) -> None:
    calling, item, accepted = CASES[case]
    with raw_peer(node.port) as peer:
        answer = peer.associate(calling=calling, extra_user_items=item)
        if accepted:
            assert answer.pdu_type == 0x02
            assert peer.echo() == 0
        else:
            assert answer.reject == REJECTED


def test_pynetdicom_and_dcmtk_peers_with_identity(node: NodeProcess) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    item = UserIdentityNegotiation()
    item.user_identity_type = 2
    item.primary_field = b"testscu"
    item.secondary_field = SECRET.encode()
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE", ext_neg=[item])
    assert assoc.is_established
    assoc.release()
    ct = PYDICOM_FILES / "CT_small.dcm"
    storescu(node.port, [ct], extra=["-usr", "storescu", "-pwd", SECRET])
    out = storescu(node.port, [ct], extra=["-usr", "storescu", "-pwd", "nope"], check=False)
    assert out.returncode != 0 and "Rejected Permanent" in out.stderr


def test_secrets_never_reach_the_log(node: NodeProcess) -> None:
    text = node.log_text()
    assert "did not verify" in text and "no user identity presented" in text
    for secret in (SECRET, "guess", "eyJhbGciOi", "intruder"):
        assert secret not in text
