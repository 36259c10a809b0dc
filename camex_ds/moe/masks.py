"""The masks a merge puts on each expert's task vector (spec §3), by kind."""
from __future__ import annotations

import enum


class MaskKind(str, enum.Enum):
    """The mask on each expert's (curved) task vector (§3): none; TIES's per-entry sign election; DARE's random
    drop, whose multipliers (`[N, out, in]`, 0 or 1/(1-p)) come as a tensor beside it (none given: no drop, as in
    evaluation)."""

    NONE = "none"
    TIES = "ties"
    DARE = "dare"


def mask_kind(value) -> MaskKind:
    """`value` (a `MaskKind` or its name) as a `MaskKind`, or a ValueError naming the valid ones."""
    try:
        return MaskKind(value)
    except ValueError:
        raise ValueError(f"mask={value!r} is invalid: expected one of {', '.join(k.value for k in MaskKind)}") \
            from None
