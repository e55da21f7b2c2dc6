"""Make Great Expectations Data Docs readable offline: no page loads anything from the internet.

GE 1.x pages load Bootstrap, jQuery, Font Awesome, bootstrap-table, a datepicker, Vega and
a dark theme from CDNs, and the logo from S3. Auditors open the logged ``validation/data_docs``
artifact offline, where all of that fails. After ``build_data_docs()`` we rewrite every page:

- Ship the assets the pages need, unmodified (licence headers kept), from the PyPI packages
  that vendor them: Bootstrap 4.5.3 CSS and JS bundle (GE asks for 4.3.1; 4.5 keeps its
  classes, and its bundle carries Popper), jQuery 3.7.1 (the version GE asks for), Font
  Awesome Free 6.2.1 (the check/cross icons that mark success and failure; GE asks for 6.6).
  They are copied from the installed packages at build time (no download at run time) into
  ``static/offline/``. Real assets rather than a stylesheet of our own: GE's markup leans on
  Bootstrap's grid, tabs and collapsibles, and these scripts run its tabs, "Show more info"
  and "Failed Only" buttons.
- Drop what no PyPI package ships and no page needs to be read: bootstrap-table and its
  filter and datepicker extensions only add sorting, search and paging to tables GE already
  renders in HTML, except on the index page, whose two tables it builds in the browser from a
  literal list of rows; we write those rows into the HTML here. Vega only draws charts, and no
  page of our suites embeds one (``OfflineDocsReport.charts`` counts pages that would).
  The dark theme (bootstrap-prefers-dark) goes too, and GE's own dark overrides are switched
  off with it, since half a dark theme (dark tables on a light page, logo hidden) reads worse
  than a light one.
- The logo comes from GE's own ``static/images/`` in the same folder.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

#: Folder, under the docs folder, where the shipped assets go.
OFFLINE_DIR = Path("static") / "offline"
_OFFLINE = OFFLINE_DIR.as_posix()


@dataclass(frozen=True)
class _Asset:
    """Files of an installed XStatic package, copied under ``OFFLINE_DIR / target``."""

    package: str
    target: str
    files: tuple[str, ...]


_ASSETS = (
    _Asset("xstatic.pkg.bootstrap", "bootstrap", ("css/bootstrap.min.css", "js/bootstrap.bundle.min.js")),
    _Asset("xstatic.pkg.jquery", "jquery", ("jquery.min.js",)),
    _Asset(
        "xstatic.pkg.font_awesome",
        "font-awesome",
        (
            "LICENSE.txt",
            "css/all.min.css",
            *(
                f"webfonts/fa-{face}.{ext}"
                for face in ("solid-900", "regular-400", "brands-400", "v4compatibility")
                for ext in ("woff2", "ttf")
            ),
        ),
    ),
)

#: Remote URL pattern -> shipped file (relative to the docs folder); a remote URL that no
#: pattern matches is dropped. Popper is inside Bootstrap's bundle.
_LOCAL_FOR_REMOTE: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"/bootstrap/4[\d.]*/css/bootstrap(\.min)?\.css$"), f"{_OFFLINE}/bootstrap/css/bootstrap.min.css"),
    (
        re.compile(r"/bootstrap/4[\d.]*/js/bootstrap(\.min)?\.js$"),
        f"{_OFFLINE}/bootstrap/js/bootstrap.bundle.min.js",
    ),
    (re.compile(r"/jquery-3[\d.]*(\.min)?\.js$"), f"{_OFFLINE}/jquery/jquery.min.js"),
    (re.compile(r"/font-awesome/6[\d.]*/css/all(\.min)?\.css$"), f"{_OFFLINE}/font-awesome/css/all.min.css"),
    (re.compile(r"great-expectations-web-assets.*/logo-long\.png(\?.*)?$"), "static/images/logo-long.png"),
)

_REMOTE = re.compile(r"^(https?:)?//", re.IGNORECASE)
_SCRIPT_TAG = re.compile(r"<script\b(?P<attrs>[^>]*)>\s*</script>", re.IGNORECASE)
_LINK_OR_IMG_TAG = re.compile(r"<(?:link|img)\b(?P<attrs>[^>]*)>", re.IGNORECASE)
_URL_ATTRIBUTE = re.compile(r"\b(?:src|href)\s*=\s*(?P<quote>[\"'])(?P<url>.*?)(?P=quote)", re.IGNORECASE)
_PINNING_ATTRIBUTE = re.compile(r"\s+(?:integrity|crossorigin)\s*=\s*([\"']).*?\1", re.IGNORECASE)
_CSS_REMOTE_URL = re.compile(r"url\(\s*([\"']?)(https?:)?//[^)]*\)", re.IGNORECASE)
#: GE's dark-mode overrides assume the dark theme we do not ship; ``not all`` never matches.
_DARK_MODE_QUERY = "@media (prefers-color-scheme: dark)"
_BOOTSTRAP_TABLE_SCRIPT = re.compile(
    r"<script>\s*\$\('#(?P<id>[\w-]+)'\)\.bootstrapTable\((?P<options>.*?)</script>", re.DOTALL
)
_TABLE_COLUMNS_AND_DATA = re.compile(
    r"columns:\s*(?P<columns>\[.*?\]),\s*data:\s*(?P<data>\[.*?\]),\s*toolbar:", re.DOTALL
)


@dataclass(frozen=True)
class OfflineDocsReport:
    """What ``make_docs_offline`` did to a Data Docs folder.

    Attributes:
        pages: HTML pages rewritten.
        localized: references now pointing at a file in the docs folder.
        dropped: the distinct remote URLs removed (nothing on the pages needs them offline).
        tables_rendered: index tables whose rows were written into the HTML.
        charts: pages that embed a Vega chart, which cannot be drawn offline.
    """

    pages: int
    localized: int
    dropped: tuple[str, ...]
    tables_rendered: int
    charts: int


def make_docs_offline(docs_dir: Path) -> OfflineDocsReport:
    """Rewrite every page of a built Data Docs site so that it loads nothing from the internet.

    Idempotent: a folder already made offline is left as it is.

    Args:
        docs_dir: The site's folder (``index.html`` at its root), as ``build_data_docs`` wrote it.

    Returns:
        What was localized, dropped and rendered.
    """
    copy_offline_assets(docs_dir)
    localized, dropped, tables, charts = 0, set[str](), 0, 0
    pages = sorted(docs_dir.rglob("*.html"))
    for page in pages:
        html = page.read_text(encoding="utf-8")
        charts += "vegaEmbed(" in html
        html, rendered = render_index_tables(html)
        html, page_localized, page_dropped = rewrite_remote_references(html, _local_resolver(docs_dir, page))
        html = repair_static_references(html, docs_dir, page)
        page.write_text(html, encoding="utf-8")
        localized, tables = localized + page_localized, tables + rendered
        dropped.update(page_dropped)
    return OfflineDocsReport(len(pages), localized, tuple(sorted(dropped)), tables, charts)


def copy_offline_assets(docs_dir: Path) -> list[Path]:
    """Copy the shipped assets from their installed packages under ``docs_dir / OFFLINE_DIR``."""
    copied = []
    for asset in _ASSETS:
        source_root = Path(str(importlib.import_module(asset.package).BASE_DIR))
        for name in asset.files:
            target = docs_dir / OFFLINE_DIR / asset.target / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source_root / name, target)
            copied.append(target)
    return copied


def _local_resolver(docs_dir: Path, page: Path) -> Callable[[str], str | None]:
    """The path, relative to ``page``, of the local file that replaces a remote URL, or None."""

    def resolve(url: str) -> str | None:
        for pattern, local in _LOCAL_FOR_REMOTE:
            if pattern.search(url) and (docs_dir / local).is_file():
                return Path(os.path.relpath(docs_dir / local, page.parent)).as_posix()
        return None

    return resolve


def rewrite_remote_references(html: str, resolve: Callable[[str], str | None]) -> tuple[str, int, set[str]]:
    """Point ``<link>``, ``<script>`` and ``<img>`` tags at local files, or drop them.

    Args:
        html: A page.
        resolve: The local path that replaces a remote URL, or None to drop the tag.

    Returns:
        The page, how many references now point at local files, and the dropped URLs.
    """
    localized, dropped = 0, set[str]()

    def rewrite(tag: re.Match[str]) -> str:
        nonlocal localized
        attrs = tag["attrs"]
        url = _URL_ATTRIBUTE.search(attrs)
        if url is None or not _REMOTE.match(url["url"]):
            return tag[0]
        local = resolve(url["url"])
        if local is None:
            dropped.add(url["url"])
            return ""
        localized += 1
        # A pinned hash no longer matches, and crossorigin blocks scripts opened from file://.
        attrs = _PINNING_ATTRIBUTE.sub("", attrs[: url.start("url")] + local + attrs[url.end("url") :])
        before, after = tag[0][: tag.start("attrs") - tag.start()], tag[0][tag.end("attrs") - tag.start() :]
        return before + attrs + after

    html = _SCRIPT_TAG.sub(rewrite, html)
    html = _LINK_OR_IMG_TAG.sub(rewrite, html)
    html = _CSS_REMOTE_URL.sub("none", html).replace(_DARK_MODE_QUERY, "@media not all")
    return html, localized, dropped


def repair_static_references(html: str, docs_dir: Path, page: Path) -> str:
    """Point local ``static/...`` references that miss their file at the site's ``static/`` folder.

    GE 1.24's validation pages, five folders deep, link their favicon four levels up.
    """

    def repair(tag: re.Match[str]) -> str:
        url = _URL_ATTRIBUTE.search(tag[0])
        if url is None or _REMOTE.match(url["url"]) or "static/" not in url["url"]:
            return tag[0]
        if (page.parent / url["url"]).is_file():
            return tag[0]
        shipped = docs_dir / "static" / url["url"].split("static/", 1)[1]
        if not shipped.is_file():
            return tag[0]
        local = Path(os.path.relpath(shipped, page.parent)).as_posix()
        return tag[0][: url.start("url")] + local + tag[0][url.end("url") :]

    return _LINK_OR_IMG_TAG.sub(repair, _SCRIPT_TAG.sub(repair, html))


def render_index_tables(html: str) -> tuple[str, int]:
    """Write the rows of the index page's bootstrap-table tables into the HTML.

    GE's index page leaves its tables empty and fills them in the browser with
    bootstrap-table from a literal list of rows; without that library they stay empty.
    A table whose literal does not parse is left as it is.

    Returns:
        The page and how many tables were rendered.
    """
    rendered = 0
    for script in list(_BOOTSTRAP_TABLE_SCRIPT.finditer(html)):
        page = _render_index_table(html, script)
        if page is not None:
            html, rendered = page, rendered + 1
    return html, rendered


def _render_index_table(html: str, script: re.Match[str]) -> str | None:
    parsed = _parse_table_literal(script["options"])
    table_id = re.escape(script["id"])
    table = re.search(rf'<table(?P<attrs>\s+id="{table_id}"[^>]*)>\s*</table>', html)
    if parsed is None or table is None:
        return None
    html = html[: table.start()] + _static_table(table["attrs"], *parsed) + html[table.end() :]
    html = html.replace(script[0], "")
    # The toolbar's only button clears bootstrap-table's filters.
    return re.sub(rf'<div id="{table_id}-toolbar"[^>]*>.*?</div>', "", html, count=1, flags=re.DOTALL)


def _parse_table_literal(options: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]] | None:
    match = _TABLE_COLUMNS_AND_DATA.search(options)
    if match is None:
        return None
    try:
        columns, data = ast.literal_eval(match["columns"]), ast.literal_eval(match["data"])
    except (ValueError, SyntaxError):
        return None
    if not (_is_records(columns) and _is_records(data)) or not all("field" in c for c in columns):
        return None
    return columns, data


def _is_records(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, dict) for item in value)


def _static_table(attrs: str, columns: Sequence[Mapping[str, Any]], rows: Iterable[Mapping[str, Any]]) -> str:
    """A plain ``<table>`` with GE's cells (HTML, as bootstrap-table would insert them).

    The first plain-text cell of a row links to the row's page, as a click on the row would.
    """
    attrs = re.sub(r'\s*data-toggle="table"', "", attrs)
    attrs = re.sub(r'class="', 'class="table table-hover ', attrs, count=1)
    head = "".join(f"<th>{escape(str(c.get('title', c['field'])))}</th>" for c in columns)
    body = []
    for row in rows:
        cells, linked = [], False
        for column in columns:
            value = str(row.get(column["field"], ""))
            link = row.get("_table_row_link_path")
            if link and not linked and "<" not in value:
                value, linked = f'<a href="{escape(str(link))}">{value}</a>', True
            cells.append(f"<td>{value}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table{attrs}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"
