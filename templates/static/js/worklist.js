// The worklist: rows update live (the socket says which study changed, the server renders the
// row), and j/k/Enter move through it. A reconnecting page re-renders its rows: it misses nothing.
(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("sightline-config").textContent);
  var table = document.querySelector("#worklist tbody");
  var notice = document.getElementById("worklist-new");
  var selected = null;

  function rows() { return Array.prototype.slice.call(table.querySelectorAll("tr[data-study]")); }

  function select(row) {
    if (selected) { selected.classList.remove("selected"); selected.removeAttribute("aria-selected"); }
    selected = row;
    if (!row) return;
    row.classList.add("selected");
    row.setAttribute("aria-selected", "true");
    row.focus({preventScroll: true});
    row.scrollIntoView({block: "nearest"});
  }

  // Each update asks for the row again. Two that arrive before the first answer would otherwise
  // lose the later one (the first answer replaces the row the second meant to replace), or let an
  // older answer overwrite a newer one: the row is looked up when its answer comes, and an answer
  // older than the one already shown is dropped.
  var asked = {}, shown = {};

  function current(studyId) { return table.querySelector('tr[data-study="' + studyId + '"]'); }

  function refreshRow(studyId) {
    if (!current(studyId)) {  // a study this page does not show: offer to reload instead of reshuffling the list
      if (notice) notice.hidden = false;
      return;
    }
    var mine = asked[studyId] = (asked[studyId] || 0) + 1;
    fetch(cfg.rowUrl.replace("/0/", "/" + studyId + "/"), {credentials: "same-origin"})
      .then(function (response) { if (!response.ok) throw new Error(response.status); return response.text(); })
      .then(function (html) {
        var row = current(studyId);
        if (!row || mine < (shown[studyId] || 0)) return;
        shown[studyId] = mine;
        var holder = document.createElement("tbody");
        holder.innerHTML = html.trim();  // server-rendered and escaped by Django's templates
        var fresh = holder.querySelector("tr[data-study]");
        if (!fresh) return;
        var wasSelected = row === selected;
        row.replaceWith(fresh);
        if (wasSelected) { selected = null; select(fresh); }
      })
      .catch(function () {});
  }

  function resync() { rows().forEach(function (row) { refreshRow(row.dataset.study); }); }

  document.addEventListener("keydown", function (event) {
    var target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (target.closest && target.closest("input, select, textarea, button")) return;
    var list = rows();
    if (!list.length) return;
    var index = list.indexOf(selected);
    if (event.key === "j") { select(list[Math.min(index + 1, list.length - 1)]); event.preventDefault(); }
    else if (event.key === "k") { select(list[Math.max(index - 1, 0)]); event.preventDefault(); }
    else if (event.key === "Enter" && selected) { window.location.href = selected.dataset.href; event.preventDefault(); }
  });
  table.addEventListener("click", function (event) {
    var row = event.target.closest("tr[data-study]");
    if (row && !event.target.closest("a")) select(row);
  });

  window.SightlineFeed(cfg.tenant, {
    onSubscribed: resync,  // whatever changed between the page's render (or the last connection) and now
    "study.updated": function (message) { refreshRow(message.study); }
  });
})();
