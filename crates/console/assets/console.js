// Holdfast console: progressive enhancement only. Every page works without this file;
// with it, the parts marked data-refresh="SECONDS" (and an id) are re-fetched from the
// same URL and swapped in place, so progress and lists stay current.
(function () {
  "use strict";

  function swap(el, html) {
    var doc = new DOMParser().parseFromString(html, "text/html");
    var fresh = doc.getElementById(el.id);
    if (!fresh) return;
    el.replaceChildren.apply(el, Array.prototype.map.call(fresh.childNodes, function (n) {
      return document.importNode(n, true);
    }));
    // A finished job's part stops refreshing (the server leaves the attribute off).
    if (!fresh.hasAttribute("data-refresh")) el.removeAttribute("data-refresh");
  }

  function watch(el) {
    var secs = parseInt(el.getAttribute("data-refresh"), 10);
    if (!(secs > 0) || !el.id) return;
    function tick() {
      if (!el.hasAttribute("data-refresh")) return;
      // Never pull content from under the keyboard focus, nor work in a hidden tab.
      if (document.hidden || el.contains(document.activeElement)) {
        setTimeout(tick, secs * 1000);
        return;
      }
      fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) { if (html) swap(el, html); })
        .catch(function () { /* the next tick tries again */ })
        .then(function () { setTimeout(tick, secs * 1000); });
    }
    setTimeout(tick, secs * 1000);
  }

  document.querySelectorAll("[data-refresh]").forEach(watch);
})();
