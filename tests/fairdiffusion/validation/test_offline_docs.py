"""Data Docs read offline: real GE pages built by validation, and the rewriting on tiny pages.

The site is built once, from the clean fixture with a minimum group count it misses, so the
pages show passed and failed expectations alike.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fairdiffusion.config import FAIRGENMED_ATTRIBUTES, ValidationConfig
from fairdiffusion.data.fairgenmed import load_fairgenmed
from fairdiffusion.validation.offline_docs import (
    make_docs_offline,
    render_index_tables,
    repair_static_references,
    rewrite_remote_references,
)
from fairdiffusion.validation.result import ValidationResult
from fairdiffusion.validation.suites import validate_dataset

#: The clean fixture's smallest subgroup (test race=Asian) has 4 subjects: 5 fails one expectation.
FAILING_CONFIG = ValidationConfig(min_group_count=5, image_shape=(32, 32))
_REMOTE = re.compile(r"^(https?:)?//", re.IGNORECASE)


class _Assets(HTMLParser):
    """The URLs that ``<link>``, ``<script>`` and ``<img>`` tags load, and the ``<a>`` links."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        url = values.get("src") or values.get("href")
        if tag in ("link", "script", "img") and url:
            self.loaded.append(url)
        elif tag == "a" and url:
            self.links.append(url)


def _assets(page: Path) -> _Assets:
    parser = _Assets()
    parser.feed(page.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def built(valid_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ValidationResult, Path]:
    docs = tmp_path_factory.mktemp("offline-docs") / "docs"
    samples = load_fairgenmed(valid_dataset, ["train", "val", "test"])
    result = validate_dataset(samples, FAIRGENMED_ATTRIBUTES, FAILING_CONFIG, ["train", "val"], "test", docs_dir=docs)
    return result, docs


@pytest.fixture(scope="module")
def pages(built: tuple[ValidationResult, Path]) -> list[Path]:
    found = sorted(built[1].rglob("*.html"))
    assert len(found) == 1 + 2 * 6, "index, and a suite page and a validation page per table"
    return found


def test_no_page_loads_anything_from_the_internet(pages: list[Path]) -> None:
    for page in pages:
        remote = [url for url in _assets(page).loaded if _REMOTE.match(url)]
        assert remote == [], f"{page.name} loads {remote}"
        assert not re.search(r"url\(\s*['\"]?(https?:)?//", page.read_text(encoding="utf-8")), page.name
        # Plain links to GE's website may stay.
        assert any(_REMOTE.match(url) for url in _assets(page).links)


def test_every_local_asset_and_link_exists(pages: list[Path], built: tuple[ValidationResult, Path]) -> None:
    for page in pages:
        assets = _assets(page)
        assert len(assets.loaded) >= 5, "Bootstrap, jQuery, Font Awesome and favicon are still loaded"
        local = [url for url in assets.loaded + assets.links if not _REMOTE.match(url) and not url.startswith("#")]
        missing = [url for url in local if not (page.parent / url.split("?")[0]).is_file()]
        assert missing == [], f"{page.relative_to(built[1])} misses {missing}"
    fonts = built[1] / "static" / "offline" / "font-awesome" / "css" / "all.min.css"
    for url in re.findall(r"url\(([^)]+)\)", fonts.read_text(encoding="utf-8")):
        assert (fonts.parent / url).is_file(), url


def test_pages_keep_the_results(built: tuple[ValidationResult, Path]) -> None:
    result, docs = built
    assert not result.success and result.data_docs == str(docs)
    (failed_page,) = (docs / "validations" / "fairdiffusion" / "group_counts").rglob("*.html")
    failed = failed_page.read_text(encoding="utf-8")
    assert "fas fa-times text-danger" in failed and "greater than or equal to" in failed
    assert "1 unexpected values found" in failed
    (passed_page,) = (docs / "validations" / "fairdiffusion" / "samples").rglob("*.html")
    assert "fas fa-check-circle text-success" in passed_page.read_text(encoding="utf-8")


def test_index_lists_every_validation_without_scripts(built: tuple[ValidationResult, Path]) -> None:
    docs = built[1]
    index = (docs / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"\$\('#[\w-]+'\)\.bootstrapTable\(", index) and "Clear Filters" not in index
    rows = re.findall(r"<tr>(.*?)</tr>", index, re.DOTALL)
    for suite in ("samples", "patients", "images", "group_counts", "class_balance", "synthetic_shares"):
        validation = next(row for row in rows if f"validations/fairdiffusion/{suite}/" in row)
        icon = "fa-times text-danger" if suite == "group_counts" else "fa-check-circle text-success"
        assert icon in validation and f"fairdiffusion.{suite}" in validation
        assert any(f'href="expectations/fairdiffusion/{suite}.html"' in row for row in rows)


def test_making_offline_again_changes_nothing(built: tuple[ValidationResult, Path], pages: list[Path]) -> None:
    before = {page: page.read_text(encoding="utf-8") for page in pages}
    report = make_docs_offline(built[1])
    assert (report.pages, report.localized, report.dropped, report.tables_rendered) == (len(pages), 0, (), 0)
    assert report.charts == 0, "a page embeds a Vega chart, which offline docs cannot draw"
    assert {page: page.read_text(encoding="utf-8") for page in pages} == before


TINY_PAGE = """<head>
<link rel="stylesheet" href="https://cdn.example/bootstrap/4.3.1/css/bootstrap.min.css"/>
<script src="https://cdn.example/jquery.js" integrity="sha384-abc" crossorigin="anonymous"></script>
<script src="https://cdn.example/vega@5"></script>
<script src="local.js"></script>
<style>@media (prefers-color-scheme: dark) { a { background: url('https://s3.example/dark.png') 0 0 } }</style>
</head><body><img class="logo"
  src="https://s3.example/logo.png?d=1" alt="logo"/>
<script>var inline = 1;</script><a href="https://docs.example/">docs</a></body>"""


def test_rewrite_localizes_or_drops_every_remote_reference() -> None:
    shipped = {"https://cdn.example/jquery.js": "static/jquery.js", "https://s3.example/logo.png?d=1": "logo.png"}
    html, localized, dropped = rewrite_remote_references(TINY_PAGE, shipped.get)
    assert localized == 2
    assert dropped == {"https://cdn.example/bootstrap/4.3.1/css/bootstrap.min.css", "https://cdn.example/vega@5"}
    assert '<script src="static/jquery.js"></script>' in html, "pinning attributes go with the CDN"
    assert '<img class="logo"\n  src="logo.png" alt="logo"/>' in html
    assert '<script src="local.js"></script>' in html and "<script>var inline = 1;</script>" in html
    assert '<a href="https://docs.example/">docs</a>' in html
    assert "prefers-color-scheme" not in html and "background: none 0 0" in html
    assert "<link" not in html and "vega" not in html


def test_rewrite_leaves_a_local_page_unchanged() -> None:
    page = '<link href="a.css"><script src="b.js"></script><img src="c.png">'
    assert rewrite_remote_references(page, lambda url: "x") == (page, 0, set())


def test_repair_points_static_references_at_the_site_root(tmp_path: Path) -> None:
    (tmp_path / "static" / "images").mkdir(parents=True)
    (tmp_path / "static" / "images" / "favicon.ico").write_bytes(b"")
    page = tmp_path / "a" / "b" / "page.html"
    html = '<link rel="icon" href="../../../static/images/favicon.ico"><img src="../../static/gone.png">'
    repaired = repair_static_references(html, tmp_path, page)
    assert repaired == '<link rel="icon" href="../../static/images/favicon.ico"><img src="../../static/gone.png">'


INDEX_TABLE = """<div id="t-toolbar" class="ml-1">
  <button onclick="clearTableFilters('t')">Clear Filters</button>
</div>
<table
  id="t"
  class="table-sm"
  data-toggle="table"
>
</table>
<script>
  $('#t').bootstrapTable(
    Object.assign(
      {
        columns: [{'field': 'ok', 'title': 'Status'}, {'field': 'name', 'title': 'Suite'}],
        data: [{'ok': '<i class="fas fa-times"></i>', 'name': 'suite.a', '_table_row_link_path': 'v/a.html'}],
        toolbar: '#t-toolbar'
      },
      {'search': 'true'}
    )
  );
</script>"""


def test_index_tables_are_rendered_into_the_html() -> None:
    html, rendered = render_index_tables(INDEX_TABLE)
    assert rendered == 1
    assert "bootstrapTable" not in html and "Clear Filters" not in html and "data-toggle" not in html
    assert '<table\n  id="t"\n  class="table table-hover table-sm"\n>' in html
    assert "<thead><tr><th>Status</th><th>Suite</th></tr></thead>" in html
    assert '<tr><td><i class="fas fa-times"></i></td><td><a href="v/a.html">suite.a</a></td></tr>' in html


def test_an_index_table_that_does_not_parse_is_left_alone() -> None:
    broken = INDEX_TABLE.replace("data: [{", "data: [{{")
    assert render_index_tables(broken) == (broken, 0)
