"""Tests for the shipped calibration text (awq_edge.quantizer.calib): the shipped calibration files are present, sizeable, varied and UTF-8."""

from collections import Counter
from importlib import resources

import pytest

from awq_edge.quantizer import calib

SMALL_DOMAINS = {"math"}  # optional, smaller set: only checked for being present and non-empty


@pytest.mark.parametrize("domain", calib.DOMAINS)
def test_domain_file_exists_and_decodes(domain):
    path = resources.files("awq_edge.data").joinpath("calibration", f"{domain}.txt")
    assert path.is_file()
    raw = path.read_bytes()
    raw.decode("utf-8")  # raises on invalid UTF-8
    assert calib.SEPARATOR.encode() in raw


@pytest.mark.parametrize("domain", calib.DOMAINS)
def test_domain_is_non_trivial(domain):
    text = calib.domain_text(domain)
    docs = calib.mixed_documents()[domain]
    if domain in SMALL_DOMAINS:
        assert len(text.encode("utf-8")) >= 2_000 and len(docs) >= 5
    else:
        assert len(text.encode("utf-8")) >= 5_000, f"{domain}: {len(text.encode())} bytes"
        assert len(docs) >= 20, f"{domain}: {len(docs)} documents"


@pytest.mark.parametrize("domain", calib.DOMAINS)
def test_no_duplicated_paragraphs(domain):
    """Exact repeats of long lines would mean padding, which narrows the activation statistics."""
    lines = [line.strip() for line in calib.domain_text(domain).splitlines() if len(line.strip()) > 80]
    repeated = [line for line, n in Counter(lines).items() if n > 1]
    assert not repeated, repeated[:3]


def test_no_duplicated_documents_across_domains():
    docs = [d for ds in calib.mixed_documents().values() for d in ds]
    assert len(docs) == len(set(docs))


def test_split_documents():
    assert calib.split_documents("a\n<|doc|>\n\n<|doc|>\nb\nc\n") == ["a", "b\nc"]
    assert calib.split_documents("only one") == ["only one"]


def test_unknown_domain():
    with pytest.raises(ValueError, match="unknown calibration domain"):
        calib.domain_text("poetry")
