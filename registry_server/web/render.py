"""HTML of the page, rendered on the server from the views in :mod:`.data`.

No template engine: a handful of functions that escape every value they insert
(``html.escape`` on text and attributes). The page is complete without JavaScript;
``static/page.js`` only enhances it (see spec/serve.md, "Web page").
"""

from __future__ import annotations

import datetime
import json
from html import escape

from blobstore.units import human_bytes
from registry_server.context import Activity
from registry_server.web.data import BenchRow, ModelRow, UsageView

__all__ = ["activity_items", "error_page", "page"]

PALETTE = ("#3b6ea5", "#5a9b5a", "#b5833a", "#8a5aa5", "#3a9b9b", "#a55a6e")


def _e(value: object) -> str:
    return escape(str(value), quote=True)


def _when(ts: float | None) -> str:
    if ts is None:
        return "<td>never</td>"
    try:
        d = datetime.datetime.fromtimestamp(ts, tz=datetime.timezone.utc)
    except (OverflowError, OSError, ValueError):  # a time no calendar shows: no 500
        return "<td>?</td>"
    return (f'<td><time datetime="{d.isoformat(timespec="seconds")}">'
            f'{d.strftime("%Y-%m-%d %H:%M")} UTC</time></td>')


def _bytes_cell(n: int) -> str:
    return f'<td class="num" data-bytes="{n}">{_e(human_bytes(n))}</td>'


def _model_row(r: ModelRow, can_admin: bool) -> str:
    full = _e(str(r.name))
    disp = _e(r.name.display())
    pin_kind = "unpin" if r.pinned else "pin"
    actions = ""
    if can_admin:
        actions = (
            f'<form method="post" action="/ui/actions/{pin_kind}" class="act">'
            f'<input type="hidden" name="name" value="{full}">'
            f'<button type="submit" id="{r.html_id}-pin" data-action="{pin_kind}" '
            f'aria-label="{pin_kind.capitalize()} {disp}">{pin_kind.capitalize()}</button></form>'
            f'<form method="post" action="/ui/actions/remove" class="act">'
            f'<input type="hidden" name="name" value="{full}">'
            f'<button type="submit" id="{r.html_id}-rm" data-action="remove" class="danger" '
            f'aria-label="Remove {disp}">Remove</button></form>')
    err = f' <span class="err">({_e(r.error)})</span>' if r.error else ""
    return (
        f'<tr id="{r.html_id}" data-name="{full}" data-pinned="{str(r.pinned).lower()}">'
        f'<th scope="row"><span title="{full}">{disp}</span>{err}'
        f'<br><code class="id">{_e(r.model_id)}</code></th>'
        f'{_bytes_cell(r.size)}{_bytes_cell(r.own_bytes)}{_bytes_cell(r.shared_bytes)}'
        f'{_when(r.last_used)}'
        f'<td class="pin">{"pinned" if r.pinned else "no"}</td>'
        f'<td><span class="tier tier-{_e(r.tier)}">{_e(r.tier)}</span></td>'
        f'<td class="actions">{actions}</td></tr>')


def models_section(rows: list[ModelRow], can_admin: set[str]) -> str:
    body = "".join(_model_row(r, r.repository in can_admin) for r in rows)
    if not rows:
        body = '<tr><td colspan="8">No models in the store.</td></tr>'
    return (
        '<section id="models" aria-labelledby="models-h"><h2 id="models-h">Models</h2>'
        '<table><caption>'
        f'{len(rows)} model{"s" if len(rows) != 1 else ""}, most recently used first. '
        'Own bytes are used by this model alone; shared bytes also by others.</caption>'
        '<thead><tr><th scope="col">Model</th><th scope="col" class="num">Size</th>'
        '<th scope="col" class="num">Own</th><th scope="col" class="num">Shared</th>'
        '<th scope="col">Last used</th><th scope="col">Pinned</th><th scope="col">Tier</th>'
        '<th scope="col">Actions</th></tr></thead>'
        f'<tbody>{body}</tbody></table></section>')


def _chart(u: UsageView) -> str:
    """A horizontal bar: each model's own bytes, then shared and unreferenced bytes,
    against the cap (a marker line) — scaled to the larger of the two."""
    scale = max(u.total_bytes, u.cap or 0, 1) * (1.04 if u.cap is not None else 1.0)
    width = 1000.0
    parts: list[tuple[str, int, str]] = []
    shown = 0
    for i, (name, own) in enumerate(u.by_model[:8]):
        parts.append((name, own, PALETTE[i % len(PALETTE)]))
        shown += own
    rest_models = sum(b for _, b in u.by_model[8:])
    if rest_models:
        parts.append(("other models", rest_models, "#888"))
        shown += rest_models
    other = max(0, u.total_bytes - shown - u.unreferenced_bytes)
    if other:
        parts.append(("shared and hidden", other, "#aab"))
    if u.unreferenced_bytes:
        parts.append(("unreferenced blobs", u.unreferenced_bytes, "#d9a"))
    x = 0.0
    rects = []
    legend = []
    for name, n, color in parts:
        w = width * n / scale
        rects.append(f'<rect x="{x:.1f}" y="8" width="{w:.1f}" height="28" fill="{color}">'
                     f'<title>{_e(name)}: {_e(human_bytes(n))}</title></rect>')
        legend.append(f'<li><span class="swatch" style="background:{color}"></span>'
                      f'{_e(name)}: {_e(human_bytes(n))}</li>')
        x += w
    marker = ""
    if u.cap is not None:
        cx = width * u.cap / scale
        marker = (f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="0" y2="44" class="cap-line">'
                  f'<title>cap {_e(human_bytes(u.cap))}</title></line>')
        legend.append('<li><span class="swatch cap"></span>'
                      f'cap: {_e(human_bytes(u.cap))}</li>')
    label = (f"{human_bytes(u.total_bytes)} used"
             + (f" of a {human_bytes(u.cap)} cap" if u.cap is not None else ", no cap set"))
    return (f'<svg class="chart" viewBox="0 0 1000 44" preserveAspectRatio="none" role="img" '
            f'aria-label="{_e(label)}"><rect x="0" y="8" width="1000" height="28" '
            f'class="track"/>{"".join(rects)}{marker}</svg>'
            f'<ul class="legend">{"".join(legend)}</ul>')


def usage_section(u: UsageView) -> str:
    lines = [f'<p><strong data-total="{u.total_bytes}">{_e(human_bytes(u.total_bytes))}</strong>'
             f' of blobs on disk ({_e(human_bytes(u.referenced_bytes))} referenced, '
             f'{_e(human_bytes(u.unreferenced_bytes))} unreferenced'
             + (f', {_e(human_bytes(u.ingest_bytes))} in unfinished downloads'
                if u.ingest_bytes else "") + ").</p>"]
    if u.cap_error:
        lines.append(f'<p class="err">{_e(u.cap_error)}</p>')
    if u.cap is None:
        lines.append('<p id="cap">No size cap is set (<code>blobctl config set max-size '
                     'SIZE</code>): GC evicts nothing by size.</p>')
    else:
        pct = 100.0 * u.total_bytes / u.cap if u.cap else 100.0
        lines.append(f'<p id="cap" data-cap="{u.cap}">Cap: {_e(human_bytes(u.cap))} '
                     f'({pct:.0f}% used){" — over the cap" if u.over_cap else ""}.</p>')
        if u.evict_now or u.hidden_evictions:
            names = ", ".join(_e(n) for n in u.evict_now)
            hidden = (f" and {u.hidden_evictions} model(s) you cannot see"
                      if u.hidden_evictions else "")
            lines.append(f'<p id="evict">GC would evict now: <span class="evict-names">'
                         f'{names}</span>{hidden}, leaving '
                         f'{_e(human_bytes(u.after_bytes))}.</p>')
        elif u.next_in_line:
            lines.append(f'<p id="evict">Under the cap. Next to go when the store outgrows '
                         f'it: <span class="evict-names">'
                         f'{", ".join(_e(n) for n in u.next_in_line)}</span>.</p>')
        else:
            lines.append('<p id="evict">Under the cap; no model could be evicted now '
                         '(pinned or within the grace period).</p>')
        if not u.cap_met:
            lines.append(f'<p class="err">GC cannot reach the cap: {_e(u.cap_reason)}.</p>')
    return ('<section id="usage" aria-labelledby="usage-h"><h2 id="usage-h">Disk use</h2>'
            + _chart(u) + "".join(lines) + "</section>")


def activity_items(items: list[Activity]) -> str:
    """The list items of live transfers (the script renders the same markup)."""
    out = []
    for a in sorted(items, key=lambda a: a.id):
        pct = f"{100.0 * a.done / a.total:.0f}%" if a.total else ""
        text = (f"{human_bytes(a.done)} of {human_bytes(a.total)} {pct}" if a.total
                else "starting")
        if a.state == "failed":
            text = f"failed: {a.error}"
        elif a.state == "done":
            text = f"done, {human_bytes(a.done)}"
        prog = (f'<progress value="{a.done}" max="{a.total}" aria-label="{_e(a.name)}">'
                f'{pct}</progress>' if a.total else
                f'<progress aria-label="{_e(a.name)}"></progress>')
        out.append(f'<li id="act-{a.id}" data-state="{_e(a.state)}" data-done="{a.done}" '
                   f'data-total="{a.total}"><span class="kind">{_e(a.kind)}</span> '
                   f'<span class="aname">{_e(a.name)}</span> {prog} '
                   f'<span class="atext">{_e(text)}</span></li>')
    return "".join(out)


def transfers_section(items: list[Activity], can_pull: bool, sign_in: bool = False) -> str:
    """``sign_in``: also offer the sign-in link beside the form (an anonymous caller whose
    anonymous rights include pushes, who may hold a token for more)."""
    form = ""
    if can_pull:
        form = (
            '<form method="post" action="/ui/actions/pull" id="pull-form">'
            '<label for="pull-name">Pull a model</label> '
            '<input id="pull-name" name="name" required autocomplete="off" '
            'placeholder="llama3.2:1b or HOST/ns/model:tag"> '
            '<label class="check"><input type="checkbox" name="insecure" value="1"> '
            'plain HTTP / no TLS check</label> '
            '<button type="submit">Pull</button></form>')
        if sign_in:
            form += '<p><a href="/ui/login">Sign in</a> for more.</p>'
    else:
        form = ('<p><a href="/ui/login">Sign in</a> to pin, remove or pull models.</p>')
    empty = "" if items else '<p class="none">No transfers running.</p>'
    return ('<section id="transfers" aria-labelledby="transfers-h">'
            '<h2 id="transfers-h">Pulls and mirror fetches</h2>'
            f'<ul id="activity" aria-live="polite">{activity_items(items)}</ul>{empty}'
            f'{form}</section>')


def bench_section(rows: list[BenchRow]) -> str:
    if not rows:
        return ""
    body = "".join(
        f'<tr><th scope="row">{_e(b.name)}</th>'
        f'<td class="num">{b.run.generation_tps:.1f}</td>'
        f'<td class="num">{b.run.prompt_tps:.1f}</td>'
        f'<td class="num">{b.run.ttft_seconds * 1000:.0f}</td>'
        f'<td class="num">{_e(human_bytes(b.run.peak_rss))}</td>'
        f'<td class="num">{b.run.n_threads}</td>{_when(b.run.started_at)}</tr>'
        for b in rows)
    return ('<section id="bench" aria-labelledby="bench-h"><h2 id="bench-h">Benchmarks</h2>'
            '<table><caption>Newest <code>blobctl bench</code> run of each model.</caption>'
            '<thead><tr><th scope="col">Model</th><th scope="col" class="num">Generation '
            'tok/s</th><th scope="col" class="num">Prompt tok/s</th><th scope="col" '
            'class="num">First token ms</th><th scope="col" class="num">Peak RSS</th>'
            '<th scope="col" class="num">Threads</th><th scope="col">When</th></tr></thead>'
            f'<tbody>{body}</tbody></table></section>')


def confirm_section(name: str) -> str:
    return ('<section id="confirm" class="confirm" aria-labelledby="confirm-h">'
            f'<h2 id="confirm-h">Remove {_e(name)}?</h2>'
            '<p>Its manifest and the blobs no other model uses are deleted.</p>'
            '<form method="post" action="/ui/actions/remove">'
            f'<input type="hidden" name="name" value="{_e(name)}">'
            '<input type="hidden" name="confirm" value="yes">'
            '<button type="submit" class="danger" autofocus>Remove</button> '
            '<a href="/">Cancel</a></form></section>')


def page(*, store_path: str, models: str, usage: str, transfers: str, bench: str,
         note: tuple[str, str] | None, confirm: str, version: int, render_ms: float) -> str:
    notice = ""
    if note is not None:
        kind, text = note
        notice = f'<p class="note {_e(kind)}">{_e(text)}</p>'
    boot = json.dumps({"version": version})
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<title>blobctl serve</title>'
        '<link rel="stylesheet" href="/ui/static/page.css">'
        '<script src="/ui/static/page.js" defer></script></head><body>'
        '<a class="skip" href="#models">Skip to the models</a>'
        f'<header><h1>blobctl serve</h1><p class="store">Store <code>{_e(store_path)}</code>'
        ' · <a href="/ui/api/models">models JSON</a> · <a href="/ui/api/usage">usage JSON'
        '</a></p></header>'
        f'<main data-boot="{_e(boot)}"><div id="notice" role="status" aria-live="polite">'
        f'{notice}</div>{confirm}{usage}{transfers}{models}{bench}</main>'
        f'<footer><p>Rendered in <span id="render-ms">{render_ms:.0f}</span> ms.</p></footer>'
        '</body></html>')


def error_page(status: int, message: str) -> str:
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<title>{status} — blobctl serve</title>'
            '<link rel="stylesheet" href="/ui/static/page.css"></head><body><main>'
            f'<h1>{status}</h1><p class="note error">{_e(message)}</p>'
            '<p><a href="/">Back to the page</a></p></main></body></html>')
