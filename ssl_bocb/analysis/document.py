"""A report as blocks (headings, paragraphs, tables, figures), rendered as Markdown (figures linked) and as a self-
contained HTML page (figures embedded) from the Jinja2 template templates/report.html."""
from __future__ import annotations

import base64
import html
import math
import os
from typing import List, Tuple


class Doc:
    """A report as blocks, rendered both as Markdown (figures linked) and as HTML (figures embedded)."""

    def __init__(self):
        self.blocks: List[Tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, header: List[str], rows: List[List]):
        self.blocks.append(("table", header, [[cell_text(v) for v in r] for r in rows]))

    def img(self, path: str, caption: str):
        self.blocks.append(("img", path, caption))

    def figures(self) -> List[str]:
        return [b[1] for b in self.blocks if b[0] == "img"]

    def markdown(self, base: str) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                out.append("| " + " | ".join(b[1]) + " |\n| " + " | ".join("---" for _ in b[1]) + " |\n" +
                           "\n".join("| " + " | ".join(r) + " |" for r in b[2]))
            else:
                out.append(f"![{b[2]}]({os.path.relpath(b[1], base)})\n\n*{b[2]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        """The self-contained page: templates/report.html, the figures embedded as base64 PNGs. Text is escaped by
        the template's ``esc`` filter (html.escape); ``inline`` also renders **bold** and `code`."""
        blocks = []
        for b in self.blocks:
            if b[0] == "h":
                blocks.append(dict(kind="h", level=b[1], text=b[2]))
            elif b[0] == "p":
                blocks.append(dict(kind="p", text=b[1]))
            elif b[0] == "table":
                blocks.append(dict(kind="table", header=b[1], rows=b[2]))
            else:
                with open(b[1], "rb") as f:
                    data = base64.b64encode(f.read()).decode()
                blocks.append(dict(kind="img", caption=b[2], file=os.path.basename(b[1]), data=data))
        return _template().render(title=title, blocks=blocks)


def _template():
    import jinja2
    env = jinja2.Environment(loader=jinja2.PackageLoader("ssl_bocb.analysis", "templates"), autoescape=False,
                             keep_trailing_newline=True, undefined=jinja2.StrictUndefined)
    env.filters["esc"] = html.escape
    env.filters["inline"] = inline_html
    return env.get_template("report.html")


def inline_html(text: str) -> str:
    """HTML of a Markdown line with **bold** and `code` only."""
    import re
    s = html.escape(text)
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", s)


def cell_text(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 0.1 and v != 0 else f"{v:.2f}"
    return str(v).replace("|", "/")
