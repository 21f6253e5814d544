"""Build the series as a static website from the committed notebooks, without running them.

    python tools/site.py --out build/site

The site mirrors the project's layout, so a relative link means the same thing in it as in the repository:

    index.html                     the series: every notebook in order, then the README and the docs
    readme.html                    README.md
    notebooks/NN-*.html            notebooks/NN-*.ipynb, with their committed outputs
    docs/*.html                    docs/*.md

Every page comes from nbconvert's `lab` template, so it looks like the notebook in JupyterLab, and PNG outputs
(the diagrams and charts) are embedded in the page. The template loads nothing from the network: require.js,
MathJax, mermaid and the widget manager, which the `lab` template fetches from a CDN, are left out, and the
notebooks need none of them. Links to notebooks and markdown files become links to their pages; any other
local file a page links to is copied next to it. Each notebook page links to its neighbours and to the index.
"""

from __future__ import annotations

import argparse
import html
import posixpath
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import nbformat
from jinja2 import DictLoader
from nbconvert import HTMLExporter
from nbconvert.filters.markdown_mistune import IPythonRenderer, MarkdownWithMath

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = "notebooks/[0-9][0-9]-*.ipynb"
DOCUMENTS = ("README.md", "docs/*.md")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
SERIES = "The series"
INDEX = "index.md"  # the index is written as if it were this file of the project, next to the README
LINK = re.compile(r'(\s(?:href|src)=")([^"]*)(")')

# The `lab` template, minus everything it would fetch from a CDN, plus the site's navigation.
# A page without cells (the index, the README, the docs) shows `resources.site.html` instead.
TEMPLATE = """
{%- extends 'index.html.j2' -%}
{%- block html_head_js -%}{%- endblock html_head_js -%}
{%- block jupyter_widgets -%}{%- endblock jupyter_widgets -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{%- block extra_css -%}
<style type="text/css">
  nav.site-nav { display: flex; gap: 1em; max-width: 1100px; margin: 0 auto; padding: 8px 16px;
                 font-family: var(--jp-ui-font-family); font-size: var(--jp-ui-font-size1); }
  nav.site-nav > * { flex: 1; }
  nav.site-nav > :nth-child(2) { text-align: center; }
  nav.site-nav > :last-child { text-align: right; }
  nav.site-nav a { color: var(--jp-content-link-color); text-decoration: none; }
  .site-page { max-width: 1100px; margin: 0 auto; padding: 0 16px 32px; }
  .jp-RenderedHTMLCommon.jp-RenderedMarkdown pre { background-color: var(--jp-cell-editor-background);
                                                    padding: 6px 10px; margin-bottom: 1em; }
  .jp-RenderedHTMLCommon.jp-RenderedMarkdown pre code { background-color: transparent; }
</style>
{%- endblock extra_css -%}
{%- block body_header -%}{{ super() }}{{ resources.site.nav }}{%- endblock body_header -%}
{%- block body_loop -%}
{%- if resources.site.html -%}
<div class="site-page jp-RenderedHTMLCommon jp-RenderedMarkdown">{{ resources.site.html }}</div>
{%- else -%}{{ super() }}{%- endif -%}
{%- endblock body_loop -%}
{%- block body_footer -%}{{ resources.site.nav }}{{ super() }}{%- endblock body_footer -%}
"""


@dataclass(frozen=True)
class Page:
    """One page of the site: where its source is in the project, where it goes in the site, and its title."""

    source: str
    target: str
    title: str


class DocumentRenderer(IPythonRenderer):
    """nbconvert's markdown renderer, with heading ids made as GitHub makes them, so `protocol.md#in-a-cluster` lands."""

    def __init__(self) -> None:
        super().__init__(escape=False, exclude_anchor_links=True)
        self.seen: Counter[str] = Counter()

    def heading(self, text: str, level: int, **attrs: object) -> str:
        slug = re.sub(r"[^\w\- ]", "", html.unescape(re.sub(r"<[^>]+>", "", text)).strip().lower()).replace(" ", "-")
        ident = f"{slug}-{self.seen[slug]}" if self.seen[slug] else slug
        self.seen[slug] += 1
        return f'<h{level} id="{ident}">{text}</h{level}>\n'


def read(path: Path) -> str:
    """A text file of the project."""
    return path.read_text(encoding="utf-8")


def plain(title: str) -> str:
    """A markdown heading as plain text, for a <title> or a navigation link."""
    return re.sub(r"[`*]", "", title)


def first_heading(markdown: str, fallback: str) -> str:
    """The text of the first heading in some markdown, or the fallback."""
    match = HEADING.search(markdown)
    return match.group(1) if match else fallback


def notebook_title(path: Path) -> str:
    """A notebook's title: its first markdown heading."""
    notebook = nbformat.read(path, as_version=4)
    markdown = "\n".join(cell.source for cell in notebook.cells if cell.cell_type == "markdown")
    return first_heading(markdown, path.stem)


def find_pages(root: Path) -> tuple[list[Page], list[Page]]:
    """The notebooks in series order, and the README and docs, each with its place in the site."""
    notebooks = [
        Page(
            path.relative_to(root).as_posix(),
            path.relative_to(root).with_suffix(".html").as_posix(),
            notebook_title(path),
        )
        for path in sorted(root.glob(NOTEBOOKS))
    ]
    documents = []
    for pattern in DOCUMENTS:
        for path in sorted(root.glob(pattern)):
            source = path.relative_to(root).as_posix()
            target = "readme.html" if source == "README.md" else path.relative_to(root).with_suffix(".html").as_posix()
            documents.append(Page(source, target, first_heading(read(path), path.stem)))
    return notebooks, documents


def make_exporter() -> HTMLExporter:
    """nbconvert's HTML exporter with the site's template: the `lab` look, nothing fetched from the network."""
    return HTMLExporter(
        template_name="lab", extra_loaders=[DictLoader({"site.html.j2": TEMPLATE})], template_file="site.html.j2"
    )


def render_markdown(markdown: str) -> str:
    """Markdown as HTML, highlighted and with tables as in a notebook's markdown cells."""
    return MarkdownWithMath(renderer=DocumentRenderer()).render(markdown)


def link(path: str, start: str) -> str:
    """A relative link to path from the file at start, both relative to the same root."""
    return posixpath.relpath(path, posixpath.dirname(start) or ".")


def navigation(page: Page, notebooks: list[Page]) -> str:
    """The bar at the top and bottom of a page: the previous notebook, the index, the next notebook.

    Like every link written into a page, it links to the project's files; rewrite_links points it at the site.
    """
    previous = following = "<span></span>"
    if page in notebooks:
        at = notebooks.index(page)
        if at > 0:
            before = notebooks[at - 1]
            previous = (
                f'<a rel="prev" href="{link(before.source, page.source)}">← {html.escape(plain(before.title))}</a>'
            )
        if at + 1 < len(notebooks):
            after = notebooks[at + 1]
            following = (
                f'<a rel="next" href="{link(after.source, page.source)}">{html.escape(plain(after.title))} →</a>'
            )
    index = f'<a rel="index" href="{link(INDEX, page.source)}">Index</a>'
    return f'<nav class="site-nav">{previous}{index}{following}</nav>'


def rewrite_links(page_html: str, page: Page, pages: dict[str, Page], root: Path) -> tuple[str, set[str]]:
    """Point a page's local links at the site: notebooks and markdown at their pages, other files at copies.

    Returns the page and the project files it links to that are not pages, which are copied into the site.
    """
    assets: set[str] = set()

    def rewrite(match: re.Match[str]) -> str:
        url = urlsplit(html.unescape(match.group(2)))
        if url.scheme or url.netloc or not url.path:
            return match.group(0)
        source = posixpath.normpath(posixpath.join(posixpath.dirname(page.source), unquote(url.path)))
        if source in pages:
            target = pages[source].target
        elif not source.startswith("../") and (root / source).is_file():
            target = source
            assets.add(source)
        else:
            print(f"site: {page.source} links to {url.path}, which is not in the project", file=sys.stderr)
            return match.group(0)
        href = link(target, page.target) + (f"#{url.fragment}" if url.fragment else "")
        return match.group(1) + html.escape(href) + match.group(3)

    return LINK.sub(rewrite, page_html), assets


def export(exporter: HTMLExporter, notebook: nbformat.NotebookNode, page: Page, nav: str, body: str = "") -> str:
    """One page through the template: a notebook's cells, or the HTML body of a page without cells."""
    notebook.metadata["title"] = plain(page.title)
    resources = {"metadata": {"name": Path(page.source).stem}, "site": {"nav": nav, "html": body}}
    page_html, _ = exporter.from_notebook_node(notebook, resources=resources)
    return page_html


def index_markdown(readme: str, notebooks: list[Page], documents: list[Page]) -> str:
    """The index: the README's title and first paragraph, every notebook in order, then the README and docs.

    It links to the project's files, as the README does, so its links are rewritten like any other page's.
    """
    paragraphs = [part.strip() for part in HEADING.sub("", readme).split("\n\n") if part.strip()]
    lines = [f"# {first_heading(readme, SERIES)}", "", *paragraphs[:1], "", "## Notebooks", ""]
    lines += [f"- [{page.title}]({page.source})" for page in notebooks]
    lines += ["", "## Read more", ""]
    lines += [f"- [{page.title}]({page.source}) (`{page.source}`)" for page in documents]
    return "\n".join(lines) + "\n"


def write_page(out: Path, page: Page, page_html: str) -> Path:
    """Write one page into the site."""
    target = out / page.target
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page_html, encoding="utf-8")
    return target


def copy_assets(root: Path, out: Path, assets: set[str]) -> None:
    """Copy the project files that pages link to, other than pages, to the same place in the site."""
    for asset in sorted(assets):
        (out / asset).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / asset, out / asset)


def build(root: Path, out: Path) -> list[Path]:
    """Write the whole site into out, and return the pages written, the index first."""
    notebooks, documents = find_pages(root)
    exporter = make_exporter()
    readme = read(root / "README.md") if (root / "README.md").is_file() else ""
    index = Page(INDEX, "index.html", first_heading(readme, SERIES))
    pages = {page.source: page for page in [index, *notebooks, *documents]}
    written, assets = [], set()
    for page in [index, *notebooks, *documents]:
        nav = "" if page is index else navigation(page, notebooks)
        if page in notebooks:
            page_html = export(exporter, nbformat.read(root / page.source, as_version=4), page, nav)
        else:
            markdown = index_markdown(readme, notebooks, documents) if page is index else read(root / page.source)
            page_html = export(exporter, nbformat.v4.new_notebook(), page, nav, render_markdown(markdown))
        page_html, linked = rewrite_links(page_html, page, pages, root)
        assets |= linked
        written.append(write_page(out, page, page_html))
    copy_assets(root, out, assets)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder to write the site to (created)")
    args = parser.parse_args(argv)
    for path in build(ROOT, args.out):
        print(f"wrote {path}")
    print(f"open {args.out / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
