"""tools/site.py: `make site` builds the series as a static website that reads offline, links and all.

The tool runs as `make site` runs it, into a temporary folder. The HTML is checked first: every notebook in
order on the index, the README and docs as pages, navigation between neighbouring notebooks, every plot an
embedded image, every local link landing on a file (and heading) of the site, and nothing fetched from the
network. Then Debian's chromium opens every page with name resolution switched off, and a small script added
to a copy of the page reports which images loaded and where each link points, into the DOM chromium dumps.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import nbformat
import pytest
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "site.py"
NOTEBOOKS = sorted(ROOT.glob("notebooks/[0-9][0-9]-*.ipynb"))
DOCS = sorted(ROOT.glob("docs/*.md"))
NOTEBOOK_PAGES = [f"notebooks/{path.stem}.html" for path in NOTEBOOKS]
PAGES = ["index.html", "readme.html", *NOTEBOOK_PAGES, *(f"docs/{path.stem}.html" for path in DOCS)]
CHROMIUM = shutil.which("chromium")
CHROMIUM_TIMEOUT = 120  # seconds for one page; it takes about one

# Added to a copy of each page: once the page and its images have loaded, it writes what it saw into the DOM.
REPORT_SCRIPT = """<script>
window.addEventListener("load", () => {
  const report = {
    title: document.title,
    images: [...document.images].map((img) => ({src: img.src.slice(0, 80), loaded: img.complete && img.naturalWidth > 0})),
    links: [...document.querySelectorAll("a[href]")].map((a) => a.href),
    resources: [...document.querySelectorAll("[src], link[href]")].map((el) => el.src || el.href),
  };
  const out = document.createElement("script");
  out.type = "application/json";
  out.id = "site-report";
  out.textContent = JSON.stringify(report);
  document.body.append(out);
});
</script>"""
REPORT = re.compile(r'<script type="application/json" id="site-report">(.*?)</script>', re.DOTALL)


def first_heading(notebook: Path) -> str:
    """The text of a notebook's first markdown heading, as the index shows it."""
    cells = nbformat.read(notebook, as_version=4).cells
    markdown = "\n".join(cell.source for cell in cells if cell.cell_type == "markdown")
    return re.search(r"^#+\s+(.+?)\s*$", markdown, re.MULTILINE).group(1).replace("`", "")


def png_outputs(notebook: Path) -> int:
    cells = nbformat.read(notebook, as_version=4).cells
    return sum(
        "image/png" in output.get("data", {}) for cell in cells if cell.cell_type == "code" for output in cell.outputs
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site") / "build" / "site"
    result = subprocess.run(
        [sys.executable, str(TOOL), "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"tools/site.py failed:\n{result.stdout}{result.stderr}"
    assert "site:" not in result.stderr, f"tools/site.py warned:\n{result.stderr}"
    return out


@cache
def parse(page: Path) -> BeautifulSoup:
    return BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")


def local(url: str) -> bool:
    """Whether a link in a page points into the site: no scheme, no host, not only a fragment."""
    parts = urlsplit(url)
    return not (parts.scheme or parts.netloc) and bool(parts.path)


def resolve(page: Path, url: str) -> Path:
    return (page.parent / unquote(urlsplit(url).path)).resolve()


def nav_links(page: Path, rel: str) -> list[Path]:
    return [
        resolve(page, a["href"]) for nav in parse(page).select("nav.site-nav") for a in nav.select(f'a[rel="{rel}"]')
    ]


def test_every_page_is_built(site):
    built = sorted(path.relative_to(site).as_posix() for path in site.rglob("*.html"))

    assert built == sorted(PAGES)


def test_index_lists_every_notebook_in_order_with_its_title(site):
    links = [a for a in parse(site / "index.html").select("a[href]") if a["href"].startswith("notebooks/")]

    assert [a["href"] for a in links] == NOTEBOOK_PAGES
    assert [a.get_text() for a in links] == [first_heading(path) for path in NOTEBOOKS]


def test_index_links_the_readme_and_every_doc(site):
    hrefs = {a["href"] for a in parse(site / "index.html").select("a[href]")}

    assert {"readme.html", *(f"docs/{path.stem}.html" for path in DOCS)} <= hrefs


def test_readme_links_to_the_pages_not_the_sources(site):
    hrefs = {a["href"] for a in parse(site / "readme.html").select("a[href]")}

    assert set(NOTEBOOK_PAGES) <= hrefs, "the README's table should link every notebook's page"
    assert any(href.startswith("docs/protocol.html#") for href in hrefs), "README links into docs/protocol.md"
    for page in PAGES:
        for a in parse(site / page).select("a[href]"):
            path = urlsplit(a["href"]).path
            assert not (local(a["href"]) and path.endswith((".ipynb", ".md"))), f"{page} links to the source {path}"


@pytest.mark.parametrize("index", range(len(NOTEBOOKS)), ids=[path.stem for path in NOTEBOOKS])
def test_notebook_pages_link_to_their_neighbours_and_the_index(site, index):
    page = site / NOTEBOOK_PAGES[index]
    previous = [site / NOTEBOOK_PAGES[index - 1]] * 2 if index > 0 else []
    following = [site / NOTEBOOK_PAGES[index + 1]] * 2 if index + 1 < len(NOTEBOOKS) else []

    assert nav_links(page, "index") == [site / "index.html"] * 2, "a link to the index at the top and the bottom"
    assert nav_links(page, "prev") == previous
    assert nav_links(page, "next") == following


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_every_plot_is_an_embedded_image(site, notebook):
    images = parse(site / "notebooks" / f"{notebook.stem}.html").select("img")

    assert png_outputs(notebook) > 0, f"{notebook.name} has no diagram or chart"
    assert sum(img["src"].startswith("data:image/png;base64,") for img in images) == png_outputs(notebook)


def test_every_local_link_lands_on_a_file_and_heading_of_the_site(site):
    broken = []
    for name in PAGES:
        page = site / name
        for element in parse(page).select("[href], [src]"):
            url = element.get("href") or element.get("src")
            fragment = urlsplit(url).fragment
            target = resolve(page, url) if local(url) else page if url.startswith("#") else None
            if target is None:
                continue
            if not (target.is_file() and target.is_relative_to(site.resolve())):
                broken.append(f"{name}: {url} (no such file in the site)")
            elif fragment and not parse(target).find(id=[fragment, unquote(fragment)]):  # as a browser looks it up
                broken.append(f"{name}: {url} (no element with id {fragment!r})")

    assert not broken, "broken local links:\n" + "\n".join(broken)


def test_nothing_is_fetched_from_the_network(site):
    remote = []
    for name in PAGES:
        soup = parse(site / name)
        for element in soup.select("[src], link[href]"):
            url = element.get("src") or element.get("href")
            if not (local(url) or url.startswith("data:")):
                remote.append(f"{name}: <{element.name}> loads {url}")
        for script in soup.select("script"):
            if "http" in script.get_text():
                remote.append(f"{name}: a <script> mentions {script.get_text()[:80]!r}")
        for style in soup.select("style"):
            if re.search(r"@import|url\(\s*['\"]?(https?:)?//", style.get_text()):
                remote.append(f"{name}: a <style> imports from the network")

    assert not remote, "loaded from the network:\n" + "\n".join(remote)


def open_in_chromium(page: Path, profile: Path) -> dict:
    """What a copy of the page with the report script saw in headless chromium, with name resolution off."""
    copy = page.with_name(f"{page.stem}.check.html")
    copy.write_text(page.read_text(encoding="utf-8").replace("</body>", REPORT_SCRIPT + "</body>"), encoding="utf-8")
    command = [
        CHROMIUM,
        "--headless",
        "--disable-gpu",
        "--no-sandbox",  # the sandbox needs user namespaces, which containers and root often lack
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND",  # anything remote fails to load, so the page must not need it
        "--virtual-time-budget=10000",
        "--dump-dom",
        copy.as_uri(),
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT)
    finally:
        copy.unlink()
    found = REPORT.search(result.stdout)
    assert found, f"chromium did not load {page.name} (exit {result.returncode}):\n{result.stderr[-2000:]}"
    return json.loads(found.group(1).replace(copy.as_uri(), page.as_uri()))  # the copy's own links are the page's


@pytest.mark.parametrize("name", PAGES)
def test_page_loads_in_chromium_with_its_images_and_links(site, name, tmp_path):
    if CHROMIUM is None:
        pytest.skip("chromium is not on PATH, so the pages are not opened in a browser (apt-get install chromium)")
    page = site / name

    report = open_in_chromium(page, tmp_path / "profile")

    assert report["title"], f"{name} has no title"
    assert len(report["images"]) == len(parse(page).select("img")), "an image of the page is missing from the DOM"
    unloaded = [image["src"] for image in report["images"] if not image["loaded"]]
    assert not unloaded, "images that did not load:\n" + "\n".join(unloaded)
    missing = []
    for url in report["links"] + report["resources"]:
        parts = urlsplit(url)
        if parts.scheme == "file" and not Path(url2pathname(parts.path)).is_file():
            missing.append(url)
    assert not missing, "links to no file:\n" + "\n".join(missing)
    fetched = [url for url in report["resources"] if urlsplit(url).scheme not in ("file", "data")]
    assert not fetched, "fetched from the network:\n" + "\n".join(fetched)
