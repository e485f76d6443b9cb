"""A rendered report, parsed back with the standard library's HTML parser."""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser


@dataclass
class Cell:
    text: str = ""
    classes: set[str] = field(default_factory=set)


@dataclass
class Row:
    label: str = ""
    classes: set[str] = field(default_factory=set)
    fixed: list[str] = field(default_factory=list)  # model, alpha, content key
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)


class Page(HTMLParser):
    """The table (metric headers, rows), figures, every tag, URL and text of a report."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.urls: list[str] = []  # every src and href
        self.headers: list[tuple[str, str, str]] = []  # suite, metric, header text
        self.rows: dict[str, Row] = {}
        self.figures: dict[str, dict[str, str]] = {}  # id -> img attributes
        self.text: dict[str, str] = {}  # element id -> its text
        self.csp = ""
        self._open: list[tuple[str, object]] = []  # (tag, what collects its text)
        self._row: Row | None = None
        self._figure = ""
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        self.urls += [a[k] for k in ("src", "href") if k in a]
        if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy":
            self.csp = a["content"]
        if tag == "figure":
            self._figure = a.get("id", "")
        if tag == "img" and self._figure:
            self.figures[self._figure] = a
        if tag == "tr" and "data-label" in a:
            self._row = Row(classes=set(a.get("class", "").split()))
            self.rows[a["data-label"]] = self._row
        sink: object = None
        if a.get("id"):
            self.text[a["id"]] = ""
            sink = a["id"]
        if tag == "th" and "data-metric" in a and self._row is None:
            self.headers.append((a["data-suite"], a["data-metric"], ""))
            sink = self.headers
        elif self._row is not None and tag in ("th", "td"):
            sink = self._cell(tag, a)
        if tag not in ("meta", "link", "img", "br"):
            self._open.append((tag, sink))

    def _cell(self, tag: str, a: dict[str, str]) -> object:
        assert self._row is not None
        if tag == "th":
            return self._row
        if "data-metric" not in a:
            self._row.fixed.append("")
            return self._row.fixed
        cell = Cell(classes=set(a.get("class", "").split()))
        self._row.cells[(a["data-suite"], a["data-metric"])] = cell
        return cell

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break
        if tag == "tr":
            self._row = None
        if tag == "figure":
            self._figure = ""

    def handle_data(self, data: str) -> None:
        for _, sink in self._open:
            if isinstance(sink, str):
                self.text[sink] += data
        sink = next((s for _, s in reversed(self._open) if s and not isinstance(s, str)), None)
        if isinstance(sink, Cell):
            sink.text += data.strip()
        elif isinstance(sink, Row) and not any(t == "span" for t, _ in self._open[-1:]):
            sink.label += data
        elif isinstance(sink, list) and sink is self.headers:
            suite, metric, text = sink[-1]
            sink[-1] = (suite, metric, text + data)
        elif isinstance(sink, list):
            sink[-1] += data.strip()
