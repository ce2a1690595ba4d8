"""The docs: README.md is a front page, docs/ the reference, and the reference tables are the
schemas' and Settings' own (tools/docs_tables.py writes them)."""

from __future__ import annotations

import re

from tests.helpers import ROOT
from tools import docs_tables


def test_the_generated_tables_are_the_schemas_and_settings_own():
    stale = [str(path.relative_to(ROOT)) for path, text in docs_tables.rendered().items() if path.read_text() != text]
    assert not stale, f"out of date (run tools/docs_tables.py): {stale}"


def test_every_environment_variable_and_request_field_is_in_a_table():
    from schemas import InferenceRequest
    from worker.settings import Settings

    configuration = (ROOT / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"`{name.upper()}`" in configuration, name
    requests = (ROOT / "docs" / "requests.md").read_text()
    for name in InferenceRequest.model_fields:
        assert f"| `{name}` |" in requests, name


def test_the_readme_is_a_front_page_whose_links_all_lead_somewhere():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) < 12 * 1024
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which is not there"
    linked = set(re.findall(r"\(docs/([\w-]+\.md)\)", readme))
    assert linked == {page.name for page in (ROOT / "docs").glob("*.md")}, "the README's map lists every page"
