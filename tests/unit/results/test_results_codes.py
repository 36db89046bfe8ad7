"""The project's coded concepts say what DICOM's own dictionaries say."""

from __future__ import annotations

from typing import cast

import pytest
from pydicom.sr._concepts_dict import concepts as _concepts
from pydicom.sr.coding import Code

from dicomnode.results import codes

concepts = cast(dict[str, dict[str, dict[str, tuple[str, list[int]]]]], _concepts)
# Not in pydicom's dictionaries: TID 1500's container concept, and our own scheme.
OUTSIDE_PYDICOM = {"UMLS", codes.LOCAL_SCHEME}
STANDARD = {
    name: value
    for name, value in vars(codes).items()
    if isinstance(value, Code) and name.isupper() and value.scheme_designator not in OUTSIDE_PYDICOM
}


def meanings(code: Code) -> set[str]:
    return {
        meaning
        for entry in concepts.get(code.scheme_designator, {}).values()
        for value, (meaning, _) in entry.items()
        if value == code.value
    }


@pytest.mark.parametrize("name", sorted(STANDARD))
def test_standard_codes_match_the_dicom_dictionary(name: str) -> None:
    code = STANDARD[name]
    assert code.meaning in meanings(code), f"{name}: {code} vs {meanings(code)}"


def test_local_codes_use_the_private_scheme() -> None:
    code = codes.local_code("DN-SBR", "Specific binding ratio")
    assert code.scheme_designator == "99DICOMNODE"
    assert codes.REASON_NOT_ANALYSED.scheme_designator == codes.LOCAL_SCHEME
    with pytest.raises(ValueError):
        codes.local_code("", "x")
    with pytest.raises(ValueError):
        codes.local_code("X", "m" * 65)
