"""DICOM UID validation: the only gate between an untrusted UID and a file name."""

from __future__ import annotations

import re

MAX_UID_LENGTH = 64
# Digits and dots only (PS3.5 9.1). Leading zeros in a component are not
# conformant, but some scanners emit them and they are harmless in a path.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


def is_valid_uid(value: object) -> bool:
    """True when `value` is a UID that may safely name a file or directory."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_UID_LENGTH
        and _UID.fullmatch(value) is not None
    )
