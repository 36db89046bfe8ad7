"""Only the services the node needs: C-ECHO and storage, nothing that queries or sends."""

from __future__ import annotations

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from tests.peers import NodeProcess

QUERY_RETRIEVE = [
    PatientRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelMove,
]


def test_find_get_and_move_are_not_offered(shared_node: NodeProcess) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    for uid in QUERY_RETRIEVE:
        ae.add_requested_context(uid)
    assoc = ae.associate("127.0.0.1", shared_node.port, ae_title="DICOMNODE")
    try:
        assert assoc.is_established
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
        assert accepted == {str(Verification)}
        rejected = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
        # 0x03: abstract syntax not supported (PS3.8 9.3.3.2)
        assert rejected == {str(uid): 0x03 for uid in QUERY_RETRIEVE}
    finally:
        assoc.release()


@pytest.mark.parametrize("uid", QUERY_RETRIEVE, ids=lambda u: u.name)
def test_an_association_for_query_retrieve_alone_gets_nothing(shared_node: NodeProcess,
                                                              uid: object) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(uid)  # type: ignore[arg-type]
    assoc = ae.associate("127.0.0.1", shared_node.port, ae_title="DICOMNODE")
    assert not assoc.is_established  # pynetdicom aborts when no context is accepted
