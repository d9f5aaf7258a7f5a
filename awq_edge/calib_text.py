"""The shipped multi-domain calibration text: awq_edge/data/calibration/*.txt.

Written for this project (licence: the project's, Apache-2.0), so it installs
with the package and needs no download. Each file is one domain; documents in
a file are separated by a line that holds only ``<|doc|>``.
"""

from importlib import resources

SEPARATOR = "<|doc|>"
DOMAINS = ("prose", "dialogue", "code", "multilingual", "math")


def split_documents(text: str) -> list[str]:
    """Documents of one domain file: the text between ``<|doc|>`` lines, stripped, empty ones dropped."""
    docs, lines = [], []
    for line in text.splitlines():
        if line.strip() == SEPARATOR:
            docs.append("\n".join(lines).strip())
            lines = []
        else:
            lines.append(line)
    docs.append("\n".join(lines).strip())
    return [d for d in docs if d]


def domain_text(domain: str) -> str:
    """The raw UTF-8 text of one domain file."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown calibration domain {domain!r}; known: {', '.join(DOMAINS)}")
    return resources.files("awq_edge.data").joinpath("calibration", f"{domain}.txt").read_text(encoding="utf-8")


def mixed_documents() -> dict[str, list[str]]:
    """Each domain's documents, in file order: {"prose": [...], "dialogue": [...], ...}."""
    return {domain: split_documents(domain_text(domain)) for domain in DOMAINS}
