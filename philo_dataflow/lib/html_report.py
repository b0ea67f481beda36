"""Parts of a self-contained HTML page: the document (plotly.js inlined once, inline CSS, no external
resource, so it opens offline), plotly figure divs, escaped tables, sections, and a table of answers
filtered by category. Imports nothing of the package."""

import html
import json

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; padding: 1rem 2rem;
       max-width: 1400px; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .3rem; }
h2 { font-size: 1.25rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; margin-top: 2rem; }
h3 { font-size: 1.05rem; margin-top: 1.2rem; }
nav a { margin-right: 1rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; display: block; max-width: 100%; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: .25rem .5rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td { white-space: pre-wrap; }
table.answers td { min-width: 12rem; max-width: 32rem; }
details { margin: .6rem 0; }
.filter { margin: .4rem 0; }
.muted { color: #59636e; }
"""

# Shows the rows of one answers table whose category is the select's value ("all": every row).
_FILTER_SCRIPT = """
(function () {
  var table = document.getElementById(%(table)s), select = document.getElementById(%(select)s);
  var count = document.getElementById(%(count)s), rows = table.tBodies[0].rows;
  function show() {
    var shown = 0;
    for (var i = 0; i < rows.length; i++) {
      var keep = select.value === "all" || rows[i].dataset.category === select.value;
      rows[i].style.display = keep ? "" : "none";
      shown += keep ? 1 : 0;
    }
    count.textContent = shown + " of " + rows.length + " shown";
  }
  select.addEventListener("change", show);
  show();
})();
"""


def _escape(value) -> str:
    return html.escape(str(value), quote=True)


def _js_string(text: str) -> str:
    # A JSON string is a JS string literal; "<" escaped so no "</script>" can end the script early.
    return json.dumps(text).replace("<", "\\u003c")


def page(title: str, body_html: str) -> str:
    """A whole HTML document titled ``title`` around ``body_html``: plotly.js inlined once in ``<head>``
    (for the divs of ``figure_div``) and inline CSS; it loads nothing from anywhere else."""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_escape(title)}</title>\n<style>{_CSS}</style>\n"
        f"<script type=\"text/javascript\">{get_plotlyjs()}</script>\n"
        f"</head>\n<body>\n{body_html}\n</body>\n</html>\n"
    )


def page_bytes() -> int:
    """Bytes of an empty ``page``: what every report page takes before its content (mostly the inlined
    plotly.js)."""
    return len(page("", "").encode("utf-8"))


def figure_div(figure: go.Figure, div_id: str) -> str:
    """``figure`` as a ``<div id=div_id>`` with the script that draws it, needing the plotly.js of ``page``."""
    return figure.to_html(full_html=False, include_plotlyjs=False, div_id=div_id)


def table(header: list[str], rows: list[list], table_id: str | None = None) -> str:
    """An HTML table: ``header`` cells, then one row per list of ``rows``; every cell is escaped text."""
    head = "".join(f"<th>{_escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{_escape(cell)}</td>" for cell in row) + "</tr>\n" for row in rows)
    attribute = f' id="{_escape(table_id)}"' if table_id is not None else ""
    return f"<table{attribute}>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n"


def answers_table(
    rows: list[dict], columns: list[tuple[str, str]], category_key: str = "category", table_id: str = "answers"
) -> str:
    """Every row of ``rows`` with the ``(key, title)`` ``columns`` side by side, escaped, each ``<tr>``
    carrying its ``rows[i][category_key]`` as ``data-category``, under a ``<select id="<table_id>-filter">``
    that shows one category's rows or all (the default)."""
    select_id, count_id = f"{table_id}-filter", f"{table_id}-count"
    categories = sorted({str(row[category_key]) for row in rows})
    options = '<option value="all">all</option>' + "".join(
        f'<option value="{_escape(c)}">{_escape(c)}</option>' for c in categories
    )
    head = "".join(f"<th>{_escape(title)}</th>" for _, title in columns)
    body = "".join(
        f'<tr data-category="{_escape(row[category_key])}">'
        + "".join(f"<td>{_escape(row[key])}</td>" for key, _ in columns) + "</tr>\n"
        for row in rows
    )
    script = _FILTER_SCRIPT % {"table": _js_string(table_id), "select": _js_string(select_id),
                               "count": _js_string(count_id)}
    return (
        f'<div class="filter"><label for="{_escape(select_id)}">{_escape(category_key)}: </label>'
        f'<select id="{_escape(select_id)}">{options}</select> '
        f'<span id="{_escape(count_id)}" class="muted"></span></div>\n'
        f'<table id="{_escape(table_id)}" class="answers">\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}'
        f"</tbody>\n</table>\n<script>{script}</script>\n"
    )


def section(title: str, inner_html: str, section_id: str) -> str:
    """``<section id=section_id>`` with an ``<h2>`` of ``title`` (escaped) over ``inner_html``."""
    return f'<section id="{_escape(section_id)}">\n<h2>{_escape(title)}</h2>\n{inner_html}\n</section>\n'
