"""The ids the API shows and accepts: a type prefix and 20 random characters (``lin_…``,
``job_…``, ``cor_…``, ``key_…``, ``whk_…``), as OpenAI and Stripe do.

Why: row ids are global sequential integers; shown to users they would reveal how many
corpora, lineages and jobs every other tenant creates. Rows keep their integer primary and
foreign keys inside the server; only this column crosses the API boundary.
"""

from __future__ import annotations

import re
import secrets
import string

ALPHABET = string.ascii_letters + string.digits  # URL-safe, no separator look-alikes
LENGTH = 20  # 62**20 ~ 2**119: unguessable, and never reused in practice
COLUMN_LENGTH = 32

LINEAGE = "lin"
JOB = "job"
CORPUS = "cor"
API_KEY = "key"
WEBHOOK = "whk"

_SHAPE = re.compile(rf"^([a-z]{{3}})_[A-Za-z0-9]{{{LENGTH}}}$")


def new_public_id(prefix: str) -> str:
    """A fresh random id such as ``lin_4fX9…`` (the column is unique: a clash, ~2**-119,
    would fail the insert rather than alias two rows)."""
    return f"{prefix}_" + "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))


def is_public_id(value: object, prefix: str) -> bool:
    """True when ``value`` has the shape of an id of that type (no database needed; a
    malformed id is answered like an unknown one, before any query)."""
    if not isinstance(value, str):
        return False
    match = _SHAPE.match(value)
    return match is not None and match.group(1) == prefix


def generator(prefix: str):  # noqa: ANN201 - a column default
    """The column default that gives each new row of a table its id at insert."""

    def make() -> str:
        return new_public_id(prefix)

    make.__name__ = f"new_{prefix}_id"
    return make
