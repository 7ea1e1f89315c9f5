/*! lapse session-timeout widget: warns before the idle or absolute deadline, keeps every tab in agreement.
 * <script src="/_lapse/widget.js" defer></script>  (docs/widget.md: data-* texts, --lapse-* colours)
 * Deadlines come from the server (SSE /_lapse/events, passive /_lapse/session as fallback), never
 * from counted ticks: each timer is recomputed from the wall clock, so a throttled, frozen or
 * sleeping tab is right the moment it runs again. */
(function () {
  "use strict";
  var W = window, D = document;
  if (W.lapse && W.lapse.v) return; // injected by the proxy and added by hand: run once
  var S = D.currentScript || D.querySelector('script[src*="/_lapse/widget.js"]');
  var ds = (S && S.dataset) || {};
  var BASE = (ds.base || "/_lapse").replace(/\/$/, "");
  var TXT = {
    idleTitle: "Are you still there?",
    idle: "Your session will expire in {seconds} seconds.",
    stay: "Stay signed in",
    signout: "Sign out",
    absoluteTitle: "Your session is ending",
    absolute: "Your session ends at {time} (in {seconds} seconds). Save your work.",
    relogin: "Sign in again now",
    dismiss: "Dismiss"
  };
  function t(k) { return ds["text" + k.charAt(0).toUpperCase() + k.slice(1)] || TXT[k]; }
  function fill(s, n, at) { return s.split("{seconds}").join(n).split("{time}").join(at || ""); }

  var now = function () { return Date.now(); };
  var path = location.pathname;
  var Q = "?path=" + encodeURIComponent(path);
  var me = Math.random().toString(36).slice(2);

  // ---- state: deadlines are local wall-clock ms ------------------------------------------
  var s = null;          // the last session body
  var idleAt = null, absAt = null, warnMs = 0, idleLimit = 0;
  var off = null;        // server clock minus local clock, ms (from server_time)
  var lastInput = 0, lastBeat = 0, beating = false, pending = 0;
  var shown = null;      // null | "idle" | "absolute"
  var dismissed = 0;     // the absAt whose warning was dismissed
  var gone = false, timer = 0, lastCheck = 0, es = null, esFails = 0, polling = false, lastAnn = 0;

  function interval() { // heartbeat spacing, from the app's idle limit
    var i = idleLimit / 4;
    if (i >= 5000) i = Math.min(i, 300000); else i = Math.max(1000, i);
    return Math.min(i, Math.max(1000, (idleLimit - warnMs) / 2));
  }

  function apply(b, t0, t1, fromPeer) {
    if (!b || gone) return;
    if (b.authenticated === false) { if (s) expire(b.reason || "missing"); return; } // a page without a session: stay quiet
    var srv = b.server_time * 1000, base;
    if (t0 != null) { // a request of ours: half the round trip is the best guess of "server time now"
      off = srv - (t0 + t1) / 2;
      base = t0; // never late: the server answered after we asked
    } else {
      var est = srv - now();
      if (off == null || est > off) off = est; // an event that sat in a buffer says nothing new
      base = srv - off;
    }
    if (fromPeer) base = Math.min(base, now());
    s = b;
    warnMs = (b.warn_before || 0) * 1000;
    idleAt = b.idle_expires_in == null ? null : base + b.idle_expires_in * 1000;
    absAt = b.absolute_expires_in == null ? null : base + b.absolute_expires_in * 1000;
    var lim = b.idle_timeout != null ? b.idle_timeout * 1000 : (b.idle_expires_in || 0) * 1000;
    if (b.idle_timeout != null || lim > idleLimit) idleLimit = lim;
    tick();
  }

  // ---- server ------------------------------------------------------------------------------
  function req(url, opt) {
    var t0 = now(), ctl = W.AbortController ? new AbortController() : null;
    var to = setTimeout(function () { if (ctl) ctl.abort(); }, 8000);
    opt.credentials = "same-origin"; opt.cache = "no-store"; if (ctl) opt.signal = ctl.signal;
    return fetch(url, opt).then(function (r) {
      clearTimeout(to);
      return r.json().then(function (b) { return { st: r.status, b: b, t0: t0, t1: now() }; });
    }, function (e) { clearTimeout(to); throw e; });
  }
  function check() { // PASSIVE: never moves a deadline
    if (gone) return Promise.resolve();
    lastCheck = now();
    return req(BASE + "/session" + Q, { headers: { "X-Lapse-Activity": "passive" } })
      .then(function (r) { apply(r.b, r.t0, r.t1); return r.b; }, function () { return null; });
  }
  function beat(force) { // ACTIVE heartbeat: only after real input (or the Stay button)
    if (gone || beating || !s || !s.csrf_token) return;
    var gap = interval(), n = now();
    if (!force && (lastInput <= lastBeat || n - lastBeat < gap)) {
      if (lastInput > lastBeat && !pending) pending = setTimeout(function () { pending = 0; beat(); }, lastBeat + gap - n + 5);
      return;
    }
    beating = true; lastBeat = n; send({ t: "beat", at: n });
    req(BASE + "/session/activity" + Q, { method: "POST", headers: { "X-CSRF-Token": s.csrf_token } })
      .then(function (r) {
        beating = false;
        if (r.st === 403) return check();
        apply(r.b, r.t0, r.t1);
        if (r.b && r.b.authenticated) send({ t: "beat", at: r.t0, b: r.b, p: path });
      }, function () { beating = false; });
  }
  function input(e) {
    if (e && (e.isTrusted === false || (host && e.target === host))) return; // the dialog's own keys and clicks are not "activity"
    var n = now();
    if (e && e.type === "pointermove") {
      // Chromium synthesises moves when the layout shifts under a resting pointer: only a move that moved counts
      if (!(e.movementX || e.movementY) || n - lastInput < 1000) return; // and throttled
    }
    lastInput = n;
    if (n - lastSent > 1000) { lastSent = n; send({ t: "input", at: n }); }
    if (shown === "idle") beat(true); else beat();
  }
  var lastSent = 0;

  function events() {
    if (!W.EventSource || es || gone) return poll();
    es = new EventSource(BASE + "/events" + Q);
    es.addEventListener("session", function (e) { esFails = 0; try { apply(JSON.parse(e.data)); } catch (x) { /* bad frame */ } });
    es.addEventListener("expired", function (e) {
      var r = "idle"; try { r = JSON.parse(e.data).reason || r; } catch (x) { /* keep */ }
      expire(r);
    });
    var opened = false;
    es.onopen = function () { esFails = 0; opened = true; };
    es.onerror = function () { // EventSource retries by itself; never opened, or failing again and again: poll
      if (gone) return;
      if (!opened || ++esFails >= 3 || es.readyState === 2) { es.close(); es = null; polling = true; tick(); }
      check();
    };
  }
  function poll() { polling = true; check(); }

  // ---- tabs ----------------------------------------------------------------------------------
  var bc = null;
  try { bc = new BroadcastChannel("lapse"); } catch (x) { bc = null; }
  function send(m) {
    m.from = me;
    try {
      if (bc) bc.postMessage(m);
      else localStorage.setItem("lapse", JSON.stringify(m) + Math.random()); // fires 'storage' in the others
    } catch (x) { /* private mode */ }
  }
  // Any script of this origin can post on the channel: a peer's times are never later than now, and a
  // peer's session body is used only when every number in it is a number.
  function peerTime(v) { v = +v; return isFinite(v) ? Math.min(v, now()) : null; }
  function num(v) { return v == null || (typeof v === "number" && isFinite(v)); }
  function sane(b) {
    return !!b && typeof b === "object" && typeof b.server_time === "number" && isFinite(b.server_time) &&
      num(b.idle_expires_in) && num(b.absolute_expires_in) && num(b.idle_timeout) && num(b.warn_before);
  }
  function hear(m) {
    if (!m || m.from === me || gone) return;
    var at = peerTime(m.at);
    if (m.t === "input") { if (at != null) lastInput = Math.max(lastInput, at); }
    else if (m.t === "beat") {
      if (at != null) lastBeat = Math.max(lastBeat, at);
      if (sane(m.b)) { if (m.p === path) apply(m.b, null, null, true); else check(); }
    } else if (m.t === "dismiss") { if (num(m.abs)) { dismissed = m.abs; tick(); } }
    else if (m.t === "exp") { check().then(function (b) { if (!b) expire(m.r); }); }
  }
  if (bc) bc.onmessage = function (e) { hear(e.data); };
  W.addEventListener("storage", function (e) {
    if (e.key === "lapse" && e.newValue) try { hear(JSON.parse(e.newValue.replace(/\}[^}]*$/, "}"))); } catch (x) { /* ignore */ }
  });

  // ---- the clock: one timer, always recomputed from deadlines ------------------------------
  function tick() {
    clearTimeout(timer);
    if (gone || !s) return;
    var n = now(), end = Math.min(idleAt == null ? Infinity : idleAt, absAt == null ? Infinity : absAt);
    if (end === Infinity) { hide(); return; }
    var kind = absAt != null && (idleAt == null || absAt <= idleAt) ? "absolute" : "idle";
    var left = end - n;
    if (left <= 0) { // the deadline passed (maybe while the tab slept): ask, then leave
      check().then(function (b) {
        if (!b) expire(kind); else if (b.authenticated) { var e2 = Math.min(idleAt || Infinity, absAt || Infinity); if (e2 <= now()) expire(kind); }
      });
      timer = setTimeout(tick, 2000);
      return;
    }
    var warnAt = end - warnMs, next;
    var off2 = kind === "absolute" && Math.abs(dismissed - absAt) < 3000;
    if (n >= warnAt && !off2 && kind === "idle" && !shown && lastInput > lastBeat && !beating) {
      beat(true); // input nobody reported yet: report it instead of warning
      next = 1000;
    } else if (n >= warnAt && !off2) {
      show(kind, left);
      next = left % 1000 || 1000; // on the second boundary, so the number moves every second
    } else {
      hide();
      next = off2 ? left : warnAt - n;
      if (polling) {
        var gap = Math.max(2000, Math.min(30000, idleLimit / 3 || 15000));
        if (n - lastCheck >= gap) check();
        next = Math.min(next, gap);
      }
    }
    timer = setTimeout(tick, Math.min(Math.max(next + 15, 20), 60000));
  }

  function expire(reason) {
    if (gone) return;
    gone = true; clearTimeout(timer);
    if (es) es.close();
    send({ t: "exp", r: reason });
    location.assign(BASE + "/login?next=" + encodeURIComponent(location.pathname + location.search + location.hash) +
      "&reason=" + encodeURIComponent(reason));
  }

  // ---- the dialog ----------------------------------------------------------------------------
  var host, root, bk, dlg, h, msg, live, b1, b2, back;
  var CSS = ":host{all:initial}" +
    ".bk{position:fixed;inset:0;z-index:2147483647;display:flex;align-items:center;justify-content:center;" +
    "background:var(--lapse-backdrop,rgba(0,0,0,.45));font:var(--lapse-font,16px/1.45 system-ui,sans-serif)}" +
    ".bk[hidden]{display:none}" +
    ".d{background:var(--lapse-bg,#fff);color:var(--lapse-fg,#1a1a1a);border-radius:var(--lapse-radius,10px);" +
    "padding:1.4em 1.6em;max-width:min(28em,92vw);box-shadow:0 10px 40px rgba(0,0,0,.35);outline:none}" +
    "h2{margin:0 0 .5em;font-size:1.2em}p{margin:0 0 1.2em}" +
    ".b{display:flex;gap:.6em;flex-wrap:wrap;justify-content:flex-end}" +
    "button{font:inherit;padding:.5em 1em;border-radius:6px;cursor:pointer;border:2px solid var(--lapse-accent,#0b57d0);" +
    "background:transparent;color:var(--lapse-accent,#0b57d0)}" +
    "button.p{background:var(--lapse-accent,#0b57d0);color:var(--lapse-accent-fg,#fff)}" +
    "button:focus-visible{outline:3px solid var(--lapse-focus,#e8a317);outline-offset:2px}" +
    ".sr{position:absolute;width:1px;height:1px;overflow:hidden;clip:rect(0 0 0 0);white-space:nowrap}";
  function el(tag, attrs, parent) {
    var e = D.createElement(tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function build() {
    host = el("div", { id: "lapse-widget" });
    root = host.attachShadow ? host.attachShadow({ mode: "open" }) : host;
    try { // a constructed sheet needs no CSP 'unsafe-inline'; else a <style> with the script's nonce
      var sh = new CSSStyleSheet(); sh.replaceSync(CSS); root.adoptedStyleSheets = [sh];
    } catch (x) { var st = el("style", {}, root); if (S && S.nonce) st.nonce = S.nonce; st.textContent = CSS; }
    bk = el("div", { "class": "bk", hidden: "" }, root);
    dlg = el("div", { "class": "d", role: "alertdialog", "aria-modal": "true", "aria-labelledby": "lapse-t",
      "aria-describedby": "lapse-m", tabindex: "-1" }, bk);
    h = el("h2", { id: "lapse-t" }, dlg);
    msg = el("p", { id: "lapse-m" }, dlg);
    live = el("p", { "class": "sr", "aria-live": "polite", "aria-atomic": "true" }, dlg);
    var row = el("div", { "class": "b" }, dlg);
    b1 = el("button", { type: "button", "class": "p" }, row);
    b2 = el("button", { type: "button" }, row);
    b1.onclick = function () { primary(); };
    b2.onclick = function () { secondary(); };
    dlg.addEventListener("keydown", function (e) {
      if (e.key === "Escape") { e.preventDefault(); e.stopPropagation(); secondaryOrStay(); }
      else if (e.key === "Tab") { // trap focus between the two buttons
        var a = root.activeElement || D.activeElement;
        if (e.shiftKey && (a === b1 || a === dlg)) { e.preventDefault(); b2.focus(); }
        else if (!e.shiftKey && a === b2) { e.preventDefault(); b1.focus(); }
      }
    });
    (D.body || D.documentElement).appendChild(host);
  }
  function primary() {
    if (shown === "idle") { stay(); }
    else { gone = true; location.assign(BASE + "/login?next=" + encodeURIComponent(location.pathname + location.search)); }
  }
  function secondary() {
    if (shown === "idle") signOut();
    else { dismissed = absAt; send({ t: "dismiss", abs: absAt }); hide(); tick(); }
  }
  function secondaryOrStay() { if (shown === "idle") stay(); else secondary(); }
  function stay() { lastInput = now(); hide(); beat(true); }
  function signOut() {
    gone = true; clearTimeout(timer);
    send({ t: "exp", r: "signed_out" });
    var f = el("form", { method: "post", action: BASE + "/logout", hidden: "" });
    el("input", { type: "hidden", name: "csrf_token", value: (s && s.csrf_token) || "" }, f);
    (D.body || D.documentElement).appendChild(f);
    f.submit();
  }
  function show(kind, left) {
    if (!host) build();
    var n = Math.ceil(left / 1000), at = "";
    if (kind === "absolute") {
      try { at = new Date(absAt).toLocaleTimeString(D.documentElement.lang || [], { hour: "2-digit", minute: "2-digit" }); }
      catch (x) { at = new Date(absAt).toTimeString().slice(0, 5); }
    }
    var text = fill(t(kind), n, at), first = shown !== kind;
    msg.textContent = text;
    if (first) {
      h.textContent = t(kind + "Title");
      b1.textContent = t(kind === "idle" ? "stay" : "relogin");
      b2.textContent = t(kind === "idle" ? "signout" : "dismiss");
      if (!shown) {
        var a = D.activeElement;
        back = a && a !== D.body ? a : null;
      }
      shown = kind; bk.hidden = false; host.setAttribute("data-kind", kind);
      lastAnn = now(); live.textContent = "";
      b1.focus();
    } else if (now() - lastAnn >= 15000) { // polite, and not every second
      lastAnn = now(); live.textContent = text;
    }
  }
  function hide() {
    if (!shown) return;
    shown = null; bk.hidden = true; live.textContent = "";
    if (back && back.focus && D.contains(back)) try { back.focus(); } catch (x) { /* gone */ }
    back = null;
  }

  // ---- wiring -------------------------------------------------------------------------------
  // Only what a person does. Not "scroll": scrollTo/scrollBy, auto-scrolling logs and carousels fire it too;
  // a person scrolls with the wheel, keys, a pointer or touch, each of which is here.
  ["keydown", "pointerdown", "pointermove", "wheel", "touchstart"].forEach(function (ev) {
    W.addEventListener(ev, input, { capture: true, passive: true });
  });
  function recheck() { if (D.visibilityState !== "hidden") { check(); tick(); } }
  D.addEventListener("visibilitychange", recheck);
  W.addEventListener("focus", recheck);
  W.addEventListener("online", recheck);
  W.addEventListener("pageshow", function (e) { if (e.persisted) recheck(); });
  D.addEventListener("resume", recheck);

  W.lapse = {
    v: 1,
    check: check,
    state: function () {
      return { session: s, idleAt: idleAt, absAt: absAt, skew: off, shown: shown, polling: polling,
        lastInput: lastInput, lastBeat: lastBeat, interval: interval(), sse: !!es };
    }
  };
  check().then(function (b) { if (b && b.authenticated) events(); else if (!b) poll(); });
})();
