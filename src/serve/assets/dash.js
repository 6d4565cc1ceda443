// tend dashboard: keeps <main data-live> fresh, filters the fleet table,
// copies commands. No framework, nothing fetched from elsewhere; the pages
// read the same without it.
(function () {
  "use strict";
  var POLL_MS = 2000;
  var main = document.querySelector("main[data-live]");
  var live = document.getElementById("live");
  var tagSel = document.getElementById("f-tag");
  var stateSel = document.getElementById("f-state");

  function say(text, cls) {
    if (!live) return;
    live.textContent = text;
    live.className = "live " + (cls || "");
  }

  function params() {
    var q = new URLSearchParams(location.search);
    return { tag: q.get("tag") || "", state: q.get("state") || "" };
  }

  function fillTags() {
    if (!tagSel) return;
    var want = tagSel.value || params().tag;
    var seen = {};
    document.querySelectorAll("tr.host[data-tags]").forEach(function (tr) {
      tr.dataset.tags.split(" ").forEach(function (t) { if (t) seen[t] = true; });
    });
    var tags = Object.keys(seen).sort();
    var have = Array.prototype.slice.call(tagSel.options, 1).map(function (o) { return o.value; });
    if (have.join(" ") !== tags.join(" ")) {
      while (tagSel.options.length > 1) tagSel.remove(1);
      tags.forEach(function (t) {
        var o = document.createElement("option");
        o.value = t;
        o.textContent = t;
        tagSel.appendChild(o);
      });
    }
    tagSel.value = tags.indexOf(want) >= 0 ? want : "";
  }

  function filter() {
    if (!tagSel || !stateSel) return;
    var tag = tagSel.value, state = stateSel.value, shown = 0;
    document.querySelectorAll("tr.host").forEach(function (tr) {
      var ok = (!tag || (" " + tr.dataset.tags + " ").indexOf(" " + tag + " ") >= 0) &&
               (!state || tr.dataset.state === state);
      tr.hidden = !ok;
      if (ok) shown++;
    });
    var none = document.getElementById("none-shown");
    if (none) none.hidden = shown > 0;
  }

  function onFilter() {
    var q = new URLSearchParams(location.search);
    if (tagSel.value) q.set("tag", tagSel.value); else q.delete("tag");
    if (stateSel.value) q.set("state", stateSel.value); else q.delete("state");
    var s = q.toString();
    history.replaceState(null, "", location.pathname + (s ? "?" + s : ""));
    filter();
  }

  if (tagSel && stateSel) {
    stateSel.value = params().state;
    fillTags();
    filter();
    tagSel.addEventListener("change", onFilter);
    stateSel.addEventListener("change", onFilter);
  }

  document.addEventListener("click", function (e) {
    var b = e.target.closest ? e.target.closest("button.copy") : null;
    if (!b) return;
    var text = b.dataset.copy || "";
    function done(ok) {
      b.textContent = ok ? "copied" : "select and copy";
      setTimeout(function () { b.textContent = "copy"; }, 1500);
    }
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(text).then(function () { done(true); }, function () { done(false); });
    } else {
      done(false);
    }
  });

  if (!main) return;
  var src = main.dataset.live, last = null, busy = false;
  function tick() {
    if (busy || document.hidden) return;
    busy = true;
    fetch(src, { cache: "no-store", headers: { "Accept": "text/html" } })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.text();
      })
      .then(function (t) {
        if (t !== last) {
          main.innerHTML = t;
          last = t;
          fillTags();
          filter();
        }
        say("live · " + new Date().toLocaleTimeString(), "ok");
      })
      .catch(function (e) { say("not updating: " + e.message, "bad"); })
      .then(function () { busy = false; });
  }
  say("live", "ok");
  setInterval(tick, POLL_MS);
  document.addEventListener("visibilitychange", tick);
})();
