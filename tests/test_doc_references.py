"""What README.md and docs/**/*.md point a reader at exists: every relative link (and its #anchor) resolves, every
repository path named in backticks (`dist_train/…`, `tests/…`, `configs/…`, `docs/…`, `launchers/…`,
`parallelism/…`) is there, and every test a page cites as evidence (`tests/test_x.py::test_y`, `::test_y`,
`[test_y]`, or a name cut short, `test_y_…`, as a prefix) is defined. Docs name these as proof of a claim or as
the next thing to open; a renamed file or test leaves the claim pointing at nothing. (The commands the pages show are checked by tests/test_help_examples.py.)

And the README's configuration table lists every key of every config section, and only keys that exist.

Text and the config dataclasses only (no torch): a fraction of a second.
"""
from __future__ import annotations

import re

import dataclasses

import pytest

from dist_train.config import Config
from tests.trainer_utils import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "docs").glob("*/*.md"))]
_PATH = re.compile(r"(?<![\w/.-])((?:dist_train|launchers|parallelism|tests|configs|docs)/[\w/.-]*\w)")
_TEST = re.compile(r"(?:::|\b)(test_\w+)(…)?(?!\w|\.py)")  # `test_x_…`: a name cut short, a prefix


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"`|\*\*", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _defined_tests() -> set[str]:
    names = set()
    for f in (REPO / "tests").glob("*.py"):
        names |= set(re.findall(r"^\s*(?:async\s+)?def (test_\w+)", f.read_text(), re.M))
    return names


def test_every_relative_link_and_anchor_resolves():
    bad = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"\]\(([^)\s]+)\)", text):
            link = m.group(1)
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (doc.parent / path).resolve() if path else doc
            where = f"{doc.relative_to(REPO)}:{_line(text, m.start())}: ({link})"
            if not target.exists():
                bad.append(f"{where}: {path} does not exist")
            elif anchor and target.suffix == ".md":
                slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", target.read_text(), re.M)}
                if anchor not in slugs:
                    bad.append(f"{where}: no heading of {target.name} has the anchor #{anchor}")
    assert not bad, "\n".join(bad)


def test_every_repository_path_and_cited_test_exists():
    tests = _defined_tests()
    bad = []
    for doc in DOCS:
        text = doc.read_text()
        for m in re.finditer(r"`([^`\n]+)`", text):
            span = m.group(1)
            where = f"{doc.relative_to(REPO)}:{_line(text, m.start())}"
            for path in _PATH.findall(span):
                if not any(c in path for c in "*<") and not (REPO / path).exists():
                    bad.append(f"{where}: `{span}` names {path}, which does not exist")
            for name, cut in _TEST.findall(span):
                if cut and any(t.startswith(name) for t in tests):
                    continue
                if name not in tests and not (REPO / "tests" / f"{name}.py").exists():
                    bad.append(f"{where}: `{span}` cites {name}, which no tests/*.py defines")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("heading, slug", [("What each failure does", "what-each-failure-does"),
                                           ("Packed documents", "packed-documents"),
                                           ("Projections (model outputs, `--device h100`)",
                                            "projections-model-outputs---device-h100")])
def test_the_anchor_rule_is_githubs(heading, slug):
    assert _slug(heading) == slug


def test_the_readme_configuration_table_names_every_key_and_only_real_ones():
    """Each section's row of README.md's "Configuration" table: its backticked names equal the section's fields."""
    rows = dict(re.findall(r"^\| `(\w+)` \| (.*) \|$", (REPO / "README.md").read_text(), re.M))
    wrong = []
    for section in dataclasses.fields(Config):
        fields = {f.name for f in dataclasses.fields(section.default_factory())}
        named = set(re.findall(r"`([a-z_]+)`", rows.get(section.name, "")))
        missing, unknown = sorted(fields - named), sorted(named - fields - {section.name})
        if missing or unknown:
            wrong.append(f"{section.name}: not in the table {missing}, not a key {unknown}")
    assert not wrong, "\n".join(wrong)
