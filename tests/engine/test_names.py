"""The one domain-name rule (das_engine.names): the engine refuses what the API refuses,
Unicode names included, before any stage directory exists."""

import pytest

from das_engine.errors import LineageError
from das_engine.lineage import Lineage
from das_engine.names import DOMAIN_NAME_MAX, domain_name_problem

from .conftest import TINY_CONFIG

VALID = ["news", "a", "0", "cs.AI", "news_2024", "bio-med", "x" * DOMAIN_NAME_MAX, "A.b_c-9"]
INVALID = [
    "",
    "naïve",  # Latin letters beyond ASCII
    "légal",
    "新闻",  # CJK
    "قانون",  # RTL
    "ｎｅｗｓ",  # fullwidth letters (NFKC would fold them to "news")
    "１２",  # fullwidth digits
    "cafe\u0301",  # a combining mark
    "news🙂",
    "a b",
    "../x",
    "a/b",
    "-start",
    "_start",
    ".hidden",
    "news\n",
    "x" * (DOMAIN_NAME_MAX + 1),
    "\udfff",  # a lone surrogate
    None,
    42,
]


@pytest.mark.parametrize("name", VALID)
def test_valid_names(name):
    assert domain_name_problem(name) is None


@pytest.mark.parametrize("name", INVALID)
def test_invalid_names_say_the_rule(name):
    assert "A-Z a-z 0-9" in domain_name_problem(name)


@pytest.mark.parametrize("name", ["naïve", "新闻", "a b"])
def test_the_engine_refuses_them_before_any_stage_directory(tmp_path, corpora, name):
    lin = Lineage.create(tmp_path / "l", "tiny-roberta", {**TINY_CONFIG, "strategy": "ncl"})
    with pytest.raises(LineageError, match="domain name must be"):
        lin.add_domain(corpora[0], name)
    assert not (lin.path / "stages").exists()
