"""What an id may be: session, request and worker ids, and token ids. One definition for every process.

The gateway checks a client's ids here and answers INVALID_ARGUMENT; the prefill and decode workers check what they
receive with the same functions (a worker is an API of its own), and the session store refuses the same ids. A value
one process accepts can therefore never fail deeper in another: a session id with a space in it passed the gateway
once and then failed every prefill batch it joined.

Session, request and worker ids become parts of Redis keys (`{prefix}:session:{sid}:blocks`), where ':' separates
the parts, so the characters allowed are few and plain: ASCII letters, digits and `-_.@+=/~`, 1 to 128 of them.
No ':' (a session "a:blocks" would alias session "a"'s block table), no whitespace, no control characters, no glob
characters (`*?[]`: the store's audit scans keys by pattern).

Torch-free and dependency-free: the gateway, the workers and `kvstore/` import it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MAX_ID_CHARS = 128
# With API keys the gateway stores a client's session as "<16 hex digits>.<session_id>" (kvrelay/rpc/auth.py), so a
# client's own session id is shorter: the stored one must still be a valid id everywhere else.
SESSION_NAMESPACE_CHARS = 17
MAX_CLIENT_SESSION_CHARS = MAX_ID_CHARS - SESSION_NAMESPACE_CHARS
ID_CHARS = "ASCII letters, digits and -_.@+=/~"
_ID = re.compile(rf"[A-Za-z0-9\-_.@+=/~]{{1,{MAX_ID_CHARS}}}")
# A request may carry at most this many stop_token_ids (each is compared with every sampled token).
MAX_STOP_TOKEN_IDS = 64


class InvalidId(ValueError):
    """An id that no kvrelay process accepts; the message names the field and says what is allowed."""


def _show(value: object) -> str:
    """The value as the message shows it: quoted, escaped, cut short (an id may be megabytes of anything)."""
    text = repr(value)
    return text if len(text) <= 48 else text[:45] + "..."


def check_id(field: str, value: str, *, allow_empty: bool = False, max_chars: int = MAX_ID_CHARS) -> str:
    """`value` if it is a valid id, else InvalidId naming `field`. allow_empty: "" is valid too (the gateway generates
    an id for a client that sends none). max_chars: a tighter limit (a client's session id)."""
    if not isinstance(value, str):
        raise InvalidId(f"{field} must be a string, got {type(value).__name__}")
    if value == "" and allow_empty:
        return value
    if len(value) > max_chars:
        raise InvalidId(f"{field} is longer than {max_chars} characters ({len(value)})")
    if _ID.fullmatch(value) is None:
        if not value:
            raise InvalidId(f"{field} must not be empty")
        if len(value) > MAX_ID_CHARS:
            raise InvalidId(f"{field} is longer than {MAX_ID_CHARS} characters ({len(value)})")
        raise InvalidId(f"{field} may hold only {ID_CHARS} (no ':', no whitespace), got {_show(value)}")
    return value


def is_valid_id(value: str) -> bool:
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def check_token_ids(field: str, ids: Sequence[int], vocab_size: int, *, allow_empty: bool = True) -> None:
    """Every id in [0, vocab_size), else InvalidId naming `field` and the first few wrong ones."""
    if not ids and not allow_empty:
        raise InvalidId(f"{field} must not be empty")
    wrong = [t for t in ids if not 0 <= t < vocab_size]
    if wrong:
        raise InvalidId(f"{field} outside the vocabulary 0..{vocab_size - 1}: {wrong[:5]}")


def check_stop_token_ids(ids: Sequence[int], vocab_size: int, field: str = "stop_token_ids") -> None:
    """At most MAX_STOP_TOKEN_IDS ids, each in the vocabulary."""
    if len(ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidId(f"at most {MAX_STOP_TOKEN_IDS} {field}, got {len(ids)}")
    check_token_ids(field, ids, vocab_size)
