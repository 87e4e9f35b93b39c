// blobctl serve: progressive enhancement of a page that works without this file.
// Forms post with fetch (JSON answer) and the sections are re-read from the server's
// own HTML; live transfers arrive as server-sent events from /ui/events.
(function () {
  "use strict";
  var notice = document.getElementById("notice");
  var states = {};

  function say(ok, text) {
    notice.innerHTML = "";
    var p = document.createElement("p");
    p.className = "note " + (ok ? "ok" : "error");
    p.textContent = text;
    notice.appendChild(p);
  }

  function refresh(focused) {
    focused = focused || (document.activeElement && document.activeElement.id);
    return fetch("/", { headers: { Accept: "text/html" }, credentials: "same-origin" })
      .then(function (r) { return r.text(); })
      .then(function (text) {
        var doc = new DOMParser().parseFromString(text, "text/html");
        ["usage", "models", "bench"].forEach(function (id) {
          var fresh = doc.getElementById(id), old = document.getElementById(id);
          if (fresh && old) { old.replaceWith(fresh); }
          else if (fresh) { document.querySelector("main").appendChild(fresh); }
          else if (old) { old.remove(); }
        });
        var ms = doc.getElementById("render-ms"), here = document.getElementById("render-ms");
        if (ms && here) { here.textContent = ms.textContent; }
        var again = focused && document.getElementById(focused);
        if (again) { again.focus(); }
        else if (focused) {
          var h = document.getElementById("models-h");
          if (h) { h.setAttribute("tabindex", "-1"); h.focus(); }
        }
      });
  }

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var action = form.getAttribute("action") || "";
    if (action.indexOf("/ui/actions/") !== 0) { return; }
    ev.preventDefault();
    var body = new URLSearchParams(new FormData(form));
    if (action === "/ui/actions/remove") {
      if (!window.confirm("Remove " + body.get("name") + "?")) { return; }
      body.set("confirm", "yes");
    }
    // not disabled: a disabled button would lose the keyboard focus
    if (form.getAttribute("aria-busy") === "true") { return; }
    form.setAttribute("aria-busy", "true");
    var focused = document.activeElement && document.activeElement.id;
    fetch(action, {
      method: "POST", body: body, credentials: "same-origin",
      headers: { Accept: "application/json" }
    }).then(function (r) {
      if (r.status === 401) { window.location.href = "/ui/login"; return null; }
      return r.json().then(function (doc) { say(doc.ok, doc.message); return doc; });
    }).catch(function (err) {
      say(false, "request failed: " + err);
    }).then(function (doc) {
      form.removeAttribute("aria-busy");
      if (doc && doc.ok && form.id === "pull-form") { form.reset(); }
      return refresh(focused);
    });
  });

  function onActivity(ev) {
    var doc = JSON.parse(ev.data);
    var list = document.getElementById("activity");
    if (!list) { return; }
    list.innerHTML = doc.html;
    var none = document.querySelector("#transfers .none");
    if (none) { none.hidden = doc.items.length > 0; }
    var finished = false;
    doc.items.forEach(function (a) {
      if (states[a.id] === "running" && a.state !== "running") { finished = true; }
      states[a.id] = a.state;
    });
    if (finished) { refresh(); }
  }

  if (window.EventSource) {
    var source = new EventSource("/ui/events");
    source.addEventListener("activity", onActivity);
    document.documentElement.setAttribute("data-live", "1");
  }
})();
