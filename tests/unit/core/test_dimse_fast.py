"""dicomnode.net.dimse_fast: the directly encoded C-STORE-RSP is byte for byte what
pynetdicom's general encoder sends, and anything unusual takes the general path."""

from __future__ import annotations

import io
import itertools

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pynetdicom import dimse as pyn_dimse
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from dicomnode.net import dimse_fast
from dicomnode.net.dimse_fast import FastStoreRsp, encode_store_rsp

CT = "1.2.840.10008.5.1.4.1.1.2"


def _rsp(message_id: int = 7, status: int = 0x0000, sop_class: str | None = CT,
         sop_instance: str | None = "1.2.3.4.5") -> C_STORE:
    rsp = C_STORE()
    rsp.MessageID = message_id
    rsp.MessageIDBeingRespondedTo = message_id
    if sop_class is not None:
        rsp.AffectedSOPClassUID = sop_class
    if sop_instance is not None:
        rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    return rsp


def _general(primitive: C_STORE, max_pdu: int = 16384) -> list[tuple[int, bytes]]:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return [pdv for p in message.encode_msg(1, max_pdu) for pdv in p.presentation_data_value_list]


def _fast(primitive: C_STORE, max_pdu: int = 16384) -> list[tuple[int, bytes]]:
    message = FastStoreRsp()
    message.primitive_to_message(primitive)
    return [pdv for p in message.encode_msg(1, max_pdu) for pdv in p.presentation_data_value_list]


UIDS = ["1.2", "1.2.3", "1.2.840.10008.5.1.4.1.1.2",  # even and odd lengths
        "2.25." + "9" * 59,  # 64 characters, the longest a UI may be
        "1.2.826.0.1.3680043.8.498.1234567890123456789012345678901234567"]


@pytest.mark.parametrize(("message_id", "status", "uid"), list(itertools.product(
    [1, 255, 0xFFFF], [0x0000, 0xB000, 0xB007, 0xA700, 0xC000, 0x0107], UIDS)))
def test_same_bytes_as_pynetdicom(message_id: int, status: int, uid: str) -> None:
    primitive = _rsp(message_id, status, CT, uid)
    assert encode_store_rsp(primitive) is not None
    assert _fast(primitive) == _general(primitive)


def test_optional_uids_left_out_as_pynetdicom_does() -> None:
    for sop_class, sop_instance in [(None, "1.2.3"), (CT, None), (None, None)]:
        primitive = _rsp(sop_class=sop_class, sop_instance=sop_instance)
        assert _fast(primitive) == _general(primitive)


def test_decodes_to_the_same_command_set() -> None:
    (_, pdv), = _fast(_rsp(9, 0xA700, CT, "1.2.3.4"))
    assert pdv[:1] == b"\x03"  # command, last fragment
    ds = read_dataset(io.BytesIO(pdv[1:]), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 9
    assert ds.Status == 0xA700
    assert ds.CommandDataSetType == 0x0101
    assert ds.AffectedSOPClassUID == CT
    assert ds.AffectedSOPInstanceUID == "1.2.3.4"
    assert ds.CommandGroupLength == len(pdv) - 1 - 12


def test_error_comment_and_offending_element_take_the_general_path() -> None:
    with_comment = _rsp(status=0xC000)
    with_comment.ErrorComment = "cannot understand"  # type: ignore[assignment]
    assert encode_store_rsp(with_comment) is None
    assert _fast(with_comment) == _general(with_comment)
    with_offending = _rsp(status=0xC000)
    with_offending.OffendingElement = [0x00080018]  # type: ignore[assignment]
    assert encode_store_rsp(with_offending) is None
    assert _fast(with_offending) == _general(with_offending)


def test_tiny_max_pdu_fragments_through_the_general_path() -> None:
    primitive = _rsp()
    fragments = _fast(primitive, max_pdu=40)
    assert len(fragments) > 1
    assert fragments == _general(primitive, max_pdu=40)


def test_command_set_is_still_there_for_whoever_inspects_the_message() -> None:
    message = FastStoreRsp()
    message.primitive_to_message(_rsp(3, 0x0000))
    ds = message.command_set
    assert isinstance(ds, Dataset)
    assert ds.MessageIDBeingRespondedTo == 3
    assert ds.Status == 0
    assert isinstance(message.data_set, io.BytesIO)


def test_install_replaces_only_the_store_response() -> None:
    dimse_fast.install()
    table = pyn_dimse._RSP_TO_MESSAGE
    assert table[C_STORE] is FastStoreRsp
    assert all(cls is not FastStoreRsp for key, cls in table.items() if key is not C_STORE)
