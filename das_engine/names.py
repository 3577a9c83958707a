"""The one rule for a domain name, shared by the engine (``Lineage.add_domain``, the CLI)
and the API (``DomainCreate``, the multipart domain form, the OpenAPI schema).

1 to 64 characters of ``[A-Za-z0-9_.-]``, the first a letter or digit: the stricter of
the two rules the engine and the API had (the engine took Unicode words, spaces and some
punctuation up to 100 characters; the API's was this one). Every name it accepts is also a
file-name part, a URL path segment and a database key (the column is 64 wide) as it is.
"""

from __future__ import annotations

import re

DOMAIN_NAME_MAX = 64
# also a JSON-schema/pydantic ``pattern``: ASCII classes mean the same in every regex engine
DOMAIN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # 63 = DOMAIN_NAME_MAX - 1
DOMAIN_NAME_RULE = (
    f"1 to {DOMAIN_NAME_MAX} characters of A-Z a-z 0-9 _ . -, starting with a letter or digit"
)
_DOMAIN_NAME = re.compile(DOMAIN_NAME_PATTERN)


def domain_name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid domain name, or None."""
    if not isinstance(name, str) or not _DOMAIN_NAME.fullmatch(name):
        return f"domain name must be {DOMAIN_NAME_RULE}"
    return None
