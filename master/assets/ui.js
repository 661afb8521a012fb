// CIMaster web UI: the live parts. Everything else is plain HTML from the server.
(function () {
  "use strict";

  // Relative times ("5 min ago") kept fresh.
  function relative(iso) {
    var seconds = Math.round((Date.now() - Date.parse(iso)) / 1000);
    var ago = seconds >= 0, s = Math.abs(seconds), amount;
    if (s < 45) return "just now";
    if (s < 3600) amount = Math.round(s / 60) + " min";
    else if (s < 86400) amount = Math.round(s / 3600) + " h";
    else { var d = Math.round(s / 86400); amount = d + (d === 1 ? " day" : " days"); }
    return ago ? amount + " ago" : "in " + amount;
  }
  function refreshTimes(root) {
    (root || document).querySelectorAll("time[data-relative]").forEach(function (el) {
      el.textContent = relative(el.getAttribute("datetime"));
    });
  }
  setInterval(refreshTimes, 30000);

  // Replaces the parts of this page named by id with the server's newest rendering of them.
  function reload(ids) {
    return fetch(location.href, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        var fresh = new DOMParser().parseFromString(html, "text/html");
        ids.forEach(function (id) {
          var now = document.getElementById(id), next = fresh.getElementById(id);
          if (now && next) now.replaceWith(document.importNode(next, true));
        });
        return fresh;
      });
  }

  // The runs list updates itself while any of its runs is active.
  function watchList() {
    var region = document.getElementById("live-region");
    if (!region || !region.dataset.refresh) return;
    setTimeout(function () {
      reload(["live-region"]).then(watchList, function () { setTimeout(watchList, 10000); });
    }, Number(region.dataset.refresh) * 1000);
  }

  // The console: server-sent events of rendered lines, resumed by the browser after a reconnect
  // (Last-Event-ID); "end" when the attempt has ended.
  function followConsole() {
    var pre = document.getElementById("console");
    if (!pre || !window.EventSource) return;
    var state = document.getElementById("console-state");
    var follow = document.getElementById("follow");
    var anchor = location.hash.indexOf("#L") === 0 ? location.hash.slice(1) : null;
    if (anchor && follow) follow.checked = false;
    var source = new EventSource(pre.dataset.stream);
    var lines = 0;
    state.textContent = "Waiting for output…";
    source.addEventListener("lines", function (event) {
      pre.insertAdjacentHTML("beforeend", event.data);
      lines = pre.childElementCount;
      state.textContent = lines + " lines";
      if (anchor) {
        var target = document.getElementById(anchor);
        if (target) { target.scrollIntoView({ block: "center" }); anchor = null; }
      } else if (follow && follow.checked) {
        window.scrollTo(0, document.body.scrollHeight);
      }
    });
    source.addEventListener("end", function () {
      source.close();
      state.textContent = lines + " lines · the attempt has ended";
      reload(["summary", "junit", "facts", "results"]);
    });
    source.onerror = function () {
      if (source.readyState === EventSource.CONNECTING) state.textContent = lines + " lines · reconnecting…";
    };
  }

  // A run's facts (status, timings, agent) refresh while it is active; the console has its stream.
  function watchRun() {
    var summary = document.getElementById("summary");
    if (!summary || summary.dataset.active !== "true") return;
    setTimeout(function () {
      reload(["summary", "facts"]).then(watchRun, function () { setTimeout(watchRun, 10000); });
    }, 3000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    refreshTimes();
    watchList();
    watchRun();
    followConsole();
  });
})();
