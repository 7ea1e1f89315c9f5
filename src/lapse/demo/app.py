"""Acme Billing: the demo upstream. Server-rendered pages, no assets, no state.

Everything a visitor sees about sessions comes from lapse: the user from ``Remote-User``, the
countdown from ``/_lapse/widget.js``, the CSRF token for "Sign out" from ``GET /_lapse/session``.
The notifications panel polls with ``X-Lapse-Activity: passive`` so it never keeps a session alive.
"""

from __future__ import annotations

import time
from html import escape

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse
from starlette.routing import Route

INVOICES = [
    ("INV-1048", "Northwind Traders", "2024-05-02", "2024-06-01", 4200.00, "Open"),
    ("INV-1047", "Globex Corporation", "2024-04-28", "2024-05-28", 1875.50, "Overdue"),
    ("INV-1046", "Initech", "2024-04-21", "2024-05-21", 960.00, "Paid"),
    ("INV-1045", "Umbrella Health", "2024-04-15", "2024-05-15", 12450.00, "Paid"),
    ("INV-1044", "Stark Logistics", "2024-04-09", "2024-05-09", 3300.00, "Overdue"),
    ("INV-1043", "Wayne Foods", "2024-04-02", "2024-05-02", 720.25, "Paid"),
    ("INV-1042", "Hooli", "2024-03-27", "2024-04-26", 5100.00, "Paid"),
]
PAYOUTS = [
    ("PAY-311", "Paper & Co. (supplies)", "2024-05-20", 1240.00, "Awaiting approval"),
    ("PAY-310", "CloudHost Ltd (hosting)", "2024-05-18", 689.99, "Scheduled"),
    ("PAY-309", "Payroll — May", "2024-05-31", 48200.00, "Scheduled"),
]
NOTIFICATIONS = [
    "Globex Corporation viewed invoice INV-1047",
    "Payment received from Initech: $960.00",
    "INV-1044 is 10 days overdue",
    "Payout PAY-311 needs approval",
    "Monthly statement is ready",
]

CSS = """
:root{--bg:#f3f4f6;--card:#fff;--text:#1b1f24;--muted:#4f5863;--border:#d5dae1;--accent:#1d5bd0;
--accent-hover:#174aa9;--on-accent:#fff;--focus:#1d5bd0;--top:#1b1f24;--on-top:#f3f4f6;--ok:#136c37;--ok-bg:#e3f5e9;
--warn:#8a4b00;--warn-bg:#fdf0dc;--bad:#8f1519;--bad-bg:#fdecec}
@media (prefers-color-scheme:dark){:root{--bg:#0f1216;--card:#1a1e24;--text:#e9ecef;--muted:#aab2bc;--border:#343b45;
--accent:#7ea8ff;--accent-hover:#a3c0ff;--on-accent:#0b1220;--focus:#9dbcff;--top:#000;--on-top:#e9ecef;--ok:#8fe0ad;
--ok-bg:#143321;--warn:#ffd08a;--warn-bg:#3a2a10;--bad:#ffc2bf;--bad-bg:#3b1517}}
*,*::before,*::after{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--text);
font:1rem/1.5 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
a{color:var(--accent)}:focus-visible{outline:3px solid var(--focus);outline-offset:2px}
.skip{position:absolute;left:-999px}.skip:focus{left:1rem;top:1rem;background:var(--card);padding:.5rem;z-index:1}
.wrap{max-width:72rem;margin:0 auto;padding:0 1rem}
.top{background:var(--top);color:var(--on-top)}
.top .wrap{display:flex;flex-wrap:wrap;align-items:center;gap:.5rem 1.5rem;min-height:3.5rem}
.logo{color:inherit;font-weight:700;text-decoration:none;font-size:1.125rem}
nav{display:flex;gap:.25rem;flex:1}
nav a{color:inherit;text-decoration:none;padding:.4rem .7rem;border-radius:.4rem}
nav a:hover{background:rgb(255 255 255/.1)}nav a[aria-current=page]{background:rgb(255 255 255/.18);font-weight:600}
.top :focus-visible{outline-color:#9dbcff}
.account{display:flex;align-items:center;gap:.75rem;font-size:.9375rem}.account form{margin:0}
button{font:inherit;cursor:pointer;border-radius:.4rem;padding:.35rem .8rem;border:1px solid currentColor;
background:transparent;color:inherit}
.layout{display:grid;grid-template-columns:minmax(0,1fr) 18rem;gap:1.5rem;padding-top:1.5rem;padding-bottom:2rem}
@media (max-width:52rem){.layout{grid-template-columns:1fr}}
h1{font-size:1.5rem;margin:0 0 1rem}h2{font-size:1.0625rem;margin:0 0 .75rem}
.card{background:var(--card);border:1px solid var(--border);border-radius:.75rem;padding:1.25rem;margin-bottom:1.5rem}
.stats{display:grid;grid-template-columns:repeat(auto-fit,minmax(12rem,1fr));gap:1rem;margin-bottom:1.5rem}
.stats .card{margin:0}.stat{font-size:1.5rem;font-weight:700;font-variant-numeric:tabular-nums}
.muted{color:var(--muted)}.table-wrap{overflow-x:auto}
caption{text-align:left;color:var(--muted);padding-bottom:.5rem}
table{width:100%;border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{text-align:left;padding:.6rem .5rem;border-bottom:1px solid var(--border);white-space:nowrap}
th{font-size:.8125rem;text-transform:uppercase;letter-spacing:.04em;color:var(--muted)}td.num,th.num{text-align:right}
.pill{display:inline-block;padding:.1rem .55rem;border-radius:999px;font-size:.8125rem;font-weight:600}
.pill.ok{color:var(--ok);background:var(--ok-bg)}.pill.warn{color:var(--warn);background:var(--warn-bg)}
.pill.bad{color:var(--bad);background:var(--bad-bg)}
.note{border-left:4px solid var(--warn);background:var(--warn-bg);padding:.75rem 1rem;border-radius:.4rem;margin-bottom:1.5rem}
.badge{display:inline-block;min-width:1.6rem;padding:0 .45rem;border-radius:999px;background:var(--accent);
color:var(--on-accent);font-size:.8125rem;text-align:center;margin-left:.35rem}
.panel ul{list-style:none;margin:0;padding:0}.panel li{padding:.55rem 0;border-bottom:1px solid var(--border);font-size:.9375rem}
.panel li:last-child{border-bottom:0}
"""

SCRIPT = """
(function () {
  "use strict";
  var passive = {headers: {"X-Lapse-Activity": "passive"}, cache: "no-store", credentials: "same-origin"};
  // The CSRF token for "Sign out" comes from lapse's passive status endpoint.
  fetch("/_lapse/session", passive).then(function (r) { return r.ok ? r.json() : null; }).then(function (s) {
    if (!s || !s.csrf_token) return;
    document.querySelectorAll('input[name="csrf_token"]').forEach(function (i) { i.value = s.csrf_token; });
  }).catch(function () {});
  var count = document.getElementById("notif-count"), list = document.getElementById("notif-list");
  function refresh() {
    // Passive: a panel that polls on its own must never keep the session alive.
    fetch("/api/notifications", {headers: {"X-Lapse-Activity": "passive"}, cache: "no-store"})
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (data) {
        if (count.textContent !== String(data.count)) count.textContent = String(data.count);
        list.replaceChildren.apply(list, data.items.map(function (item) {
          var li = document.createElement("li"); li.textContent = item.text; return li;
        }));
      }).catch(function () {});
  }
  setInterval(refresh, 10000);
})();
"""

NAV = [("/", "Dashboard"), ("/invoices", "Invoices"), ("/payments", "Payments")]
STATUS_CLASS = {"Paid": "ok", "Scheduled": "ok", "Open": "warn", "Awaiting approval": "warn", "Overdue": "bad"}


def _money(amount: float) -> str:
    return f"${amount:,.2f}"


def _notifications(now: float | None = None) -> list[dict[str, str | int]]:
    """A few notifications; how many changes every minute so the panel visibly updates."""
    minute = int((time.time() if now is None else now) // 60)
    shown = 2 + minute % 3
    return [{"id": i + 1, "text": text} for i, text in enumerate(NOTIFICATIONS[:shown])]


def _table(headers: list[str], rows: list[list[str]], caption: str) -> str:
    head = "".join(f'<th scope="col"{" class=num" if h == "Amount" else ""}>{escape(h)}</th>' for h in headers)
    body = "".join("<tr>" + "".join(cells) + "</tr>" for cells in rows)
    return (
        f'<div class="table-wrap"><table><caption>{escape(caption)}</caption>'
        f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _pill(status: str) -> str:
    return f'<td><span class="pill {STATUS_CLASS.get(status, "warn")}">{escape(status)}</span></td>'


def _invoice_rows(invoices: list[tuple[str, str, str, str, float, str]]) -> list[list[str]]:
    return [
        [
            f"<td>{escape(n)}</td>",
            f"<td>{escape(c)}</td>",
            f"<td>{escape(i)}</td>",
            f"<td>{escape(d)}</td>",
            f'<td class="num">{_money(a)}</td>',
            _pill(s),
        ]
        for n, c, i, d, a, s in invoices
    ]


def _page(request: Request, title: str, body: str) -> HTMLResponse:
    user = request.headers.get("remote-user") or ""
    who = f"Signed in as <strong>{escape(user)}</strong>" if user else '<span class="muted">Not signed in</span>'
    nav = "".join(
        f'<a href="{href}"{" aria-current=page" if request.url.path == href else ""}>{label}</a>' for href, label in NAV
    )
    items = _notifications()
    notes = "".join(f"<li>{escape(str(item['text']))}</li>" for item in items)
    html = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<link rel="icon" href="data:,">
<title>{escape(title)} · Acme Billing</title>
<style>{CSS}</style>
<script src="/_lapse/widget.js" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to content</a>
<header class="top"><div class="wrap">
<a class="logo" href="/">Acme Billing</a>
<nav aria-label="Main">{nav}</nav>
<div class="account"><span>{who}</span>
<form method="post" action="/_lapse/logout"><input type="hidden" name="csrf_token" value="">
<button type="submit">Sign out</button></form></div>
</div></header>
<div class="wrap layout">
<main id="main">
<h1>{escape(title)}</h1>
{body}
</main>
<aside class="panel card" aria-labelledby="notif-h">
<h2 id="notif-h">Notifications <span class="badge" id="notif-count" aria-live="polite">{len(items)}</span></h2>
<ul id="notif-list">{notes}</ul>
</aside>
</div>
<script>{SCRIPT}</script>
</body>
</html>
"""
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


async def dashboard(request: Request) -> HTMLResponse:
    outstanding = sum(a for *_, a, s in INVOICES if s != "Paid")
    overdue = [inv for inv in INVOICES if inv[5] == "Overdue"]
    paid = sum(a for *_, a, s in INVOICES if s == "Paid")
    stats = "".join(
        f'<div class="card"><div class="muted">{label}</div><div class="stat">{value}</div></div>'
        for label, value in (
            ("Outstanding", _money(outstanding)),
            ("Overdue invoices", str(len(overdue))),
            ("Paid, last 30 days", _money(paid)),
        )
    )
    recent = _table(
        ["Invoice", "Customer", "Issued", "Due", "Amount", "Status"],
        _invoice_rows(INVOICES[:4]),
        "The four newest invoices",
    )
    body = (
        f'<div class="stats">{stats}</div><section class="card"><h2>Recent invoices</h2>{recent}'
        f'<p><a href="/invoices">All invoices</a></p></section>'
    )
    return _page(request, "Dashboard", body)


async def invoices(request: Request) -> HTMLResponse:
    table = _table(
        ["Invoice", "Customer", "Issued", "Due", "Amount", "Status"],
        _invoice_rows(INVOICES),
        f"{len(INVOICES)} invoices, newest first",
    )
    return _page(request, "Invoices", f'<section class="card">{table}</section>')


async def payments(request: Request) -> HTMLResponse:
    rows = [
        [
            f"<td>{escape(r)}</td>",
            f"<td>{escape(p)}</td>",
            f"<td>{escape(d)}</td>",
            f'<td class="num">{_money(a)}</td>',
            _pill(s),
        ]
        for r, p, d, a, s in PAYOUTS
    ]
    table = _table(["Reference", "Payee", "Date", "Amount", "Status"], rows, "Scheduled outgoing payments")
    body = (
        '<p class="note">Payments is a protected area: it signs you out sooner after inactivity than the rest '
        "of Acme Billing.</p>"
        '<section class="card"><h2>Payout account</h2><p>Acme Corp operating account · IBAN ending •••• 4821</p>'
        f'</section><section class="card"><h2>Scheduled payouts</h2>{table}</section>'
    )
    return _page(request, "Payments", body)


async def notifications(request: Request) -> JSONResponse:
    items = _notifications()
    return JSONResponse({"count": len(items), "items": items}, headers={"Cache-Control": "no-store"})


async def healthz(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def create_demo_app() -> Starlette:
    """The Acme Billing upstream (trusts ``Remote-User``: reachable through lapse only)."""
    return Starlette(
        routes=[
            Route("/", dashboard),
            Route("/invoices", invoices),
            Route("/payments", payments),
            Route("/api/notifications", notifications),
            Route("/healthz", healthz),
        ]
    )
