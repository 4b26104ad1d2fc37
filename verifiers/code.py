"""The one rule for the code in a model's reply, shared by `onpolicy eval --chat`, the TRL adapter and
the verl adapter: the first fenced code block (an unclosed fence runs to the end of the reply; no fence:
the whole reply)."""

from __future__ import annotations

import re

_FENCE = re.compile(r"```[a-zA-Z0-9_+-]*\n(.*?)(?:```|$)", re.S)


def extract_code(reply: str) -> str:
    found = _FENCE.search(reply)
    return found.group(1) if found else reply
