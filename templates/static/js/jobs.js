// Live job progress: the socket says which job changed; the API has its counts.
(function () {
  "use strict";
  var cfg = JSON.parse(document.getElementById("sightline-config").textContent);
  var pending = {}, again = {};
  var REFRESH_GAP_MS = 300;  // at most one fetch per job this often while a job is busy

  // which actions a job in this state offers (the page renders the same rule)
  var ACTIONS = {
    add: function (job) { return job.state === "open"; },
    start: function (job) { return job.state === "open"; },
    cancel: function (job) { return job.state === "open" || job.state === "running"; },
    retry: function (job) { return (job.state === "running" || job.state === "finished") && job.counts.failed > 0; }
  };

  function render(card, job) {
    var finished = job.counts.done + job.counts.failed + job.counts.cancelled;
    card.querySelector("[data-role=state]").textContent = job.state;
    card.querySelector("[data-role=summary]").textContent = finished + " of " + job.total + " finished";
    var rate = "";
    if (job.images_per_s) rate += "· " + job.images_per_s + " images/s";
    if (job.eta_s) rate += " · about " + Math.round(job.eta_s) + " s left";
    card.querySelector("[data-role=rate]").textContent = rate;
    var bar = card.querySelector("[data-role=bar]");
    bar.max = job.total || 1;
    bar.value = finished;
    var counts = Object.keys(job.counts).filter(function (k) { return job.counts[k]; })
      .map(function (k) { return k + " " + job.counts[k]; }).join(" ");
    card.querySelector("[data-role=counts]").textContent = counts;
    var unpacking = card.querySelector("[data-role=unpacking]");
    if (unpacking && !job.uploads_pending) unpacking.remove();
    Object.keys(ACTIONS).forEach(function (name) {
      var form = card.querySelector('[data-action="' + name + '"]');
      if (form) form.hidden = !ACTIONS[name](job);
    });
  }

  function refresh(jobId) {
    var card = document.querySelector('[data-job="' + jobId + '"]');
    if (!card) return;
    if (pending[jobId]) { again[jobId] = true; return; }  // fetch once more when this one is back
    pending[jobId] = true;
    // at most one fetch per job in flight, and at most every REFRESH_GAP_MS while a job is busy
    setTimeout(function () {
      fetch(cfg.apiJob.replace("/0/", "/" + jobId + "/"), {credentials: "same-origin",
        headers: {"Accept": "application/json", "X-Tenant": cfg.tenant}})
        .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
        .then(function (job) { render(card, job); })
        .catch(function () {})
        .then(function () {
          pending[jobId] = false;
          if (again[jobId]) { again[jobId] = false; refresh(jobId); }
        });
    }, REFRESH_GAP_MS);
  }

  function resync() {
    document.querySelectorAll("[data-job]").forEach(function (card) { refresh(card.dataset.job); });
  }

  // Files or one zip dropped on a job that is still open go in through its Add form.
  document.querySelectorAll("[data-job]").forEach(function (card) {
    var form = card.querySelector('[data-action="add"]');
    if (!form) return;
    card.addEventListener("dragover", function (event) {
      if (form.hidden) return;
      event.preventDefault();
      card.classList.add("dropping");
    });
    card.addEventListener("dragleave", function () { card.classList.remove("dropping"); });
    card.addEventListener("drop", function (event) {
      card.classList.remove("dropping");
      var files = event.dataTransfer && event.dataTransfer.files;
      if (form.hidden || !files || !files.length) return;
      event.preventDefault();
      var zip = files.length === 1 && /\.zip$/i.test(files[0].name);
      form.querySelector(zip ? "input[name=archive]" : "input[name=files]").files = files;
      form.requestSubmit();
    });
  });

  // The browser screen (issue 17), once it has loaded: files chosen for a job are screened at once,
  // their preliminary finding shown, and sent one per request with their `screen` field; a zip is
  // "not screened" and goes in as before. Without the screen the Add form posts as it always did.
  function screenJobs(screener) {
    document.body.dataset.screening = "on";
    var csrf = document.querySelector("input[name=csrfmiddlewaretoken]");
    document.querySelectorAll("[data-job]").forEach(function (card) {
      var form = card.querySelector('[data-action="add"]'), table = card.querySelector("[data-role=screen]");
      if (!form || !table) return;
      var files = form.querySelector("input[name=files]"), archive = form.querySelector("input[name=archive]");
      var entries = [], shown = null;

      function row(name, finding, quality, state) {
        var tr = document.createElement("tr");
        [["name", name], ["finding", finding], ["quality", quality], ["state", state]].forEach(function (pair) {
          var td = document.createElement("td");
          td.dataset.role = pair[0];
          td.textContent = pair[1];
          tr.appendChild(td);
        });
        table.tBodies[0].appendChild(tr);
        table.hidden = false;
        return tr;
      }

      function show(entry, found) {
        entry.found = found;
        var finding = entry.row.querySelector("[data-role=finding]"), quality = entry.row.querySelector("[data-role=quality]");
        if (found.status !== "screened") {
          entry.row.dataset.finding = "not-screened";
          finding.textContent = "not screened" + (found.reason ? " (" + found.reason + ")" : "");
          return;
        }
        entry.row.dataset.finding = "preliminary";
        entry.row.dataset.flags = found.quality.flags.join(" ");
        finding.textContent = "preliminary: " + found.label + " (" + found.probability.toFixed(2) + ") · " +
          found.latency_ms + " ms in your browser";
        quality.textContent = found.quality.flags.length ? screener.describeFlags(found.quality.flags) : "looks fine";
      }

      function choose() {
        if (shown === files.files) return;
        shown = files.files;
        entries.forEach(function (entry) { if (!entry.sent) entry.row.remove(); });
        entries = entries.filter(function (entry) { return entry.sent; });
        Array.prototype.forEach.call(files.files, function (file) {
          var entry = {file: file, row: row(file.name, "screening…", "", "not sent yet")};
          entry.screening = screener.screen(file).then(function (found) { show(entry, found); },
            function () { show(entry, {status: "failed", reason: "the screen failed"}); });
          entries.push(entry);
        });
      }

      function send(entry) {
        var data = new FormData();
        data.append("files", entry.file, entry.file.name);
        if (entry.found && entry.found.status === "screened") data.append("screen", JSON.stringify(entry.found.screen));
        var state = entry.row.querySelector("[data-role=state]");
        state.textContent = "uploading…";
        return fetch(cfg.apiJob.replace("/0/", "/" + card.dataset.job + "/") + "items/", {
          method: "POST", body: data, credentials: "same-origin",
          headers: {"Accept": "application/json", "X-Tenant": cfg.tenant, "X-CSRFToken": csrf ? csrf.value : ""}
        }).then(function (response) {
          if (response.ok) { entry.sent = true; state.textContent = "added"; return; }
          return response.json().then(function (body) {
            state.textContent = "not added: " + ((body.error && body.error.message) || response.status);
          }, function () { state.textContent = "not added: " + response.status; });
        }, function () { state.textContent = "not added: the connection failed"; });
      }

      files.addEventListener("change", choose);
      if (files.files.length) choose();  // chosen before the screen had loaded
      archive.addEventListener("change", function () {
        if (archive.files.length) row(archive.files[0].name, "not screened (zip)", "—", "sent with Add");
      });
      form.addEventListener("submit", function (event) {
        if (archive.files.length || !files.files.length) return;  // a zip goes in as before
        event.preventDefault();
        choose();  // files dropped on the card arrive without a change event
        var chosen = entries.filter(function (entry) { return !entry.sent && !entry.asked; });
        Promise.all(chosen.map(function (entry) { return entry.screening; })).then(function () {
          var go = chosen.filter(function (entry) {
            var flags = entry.found && entry.found.quality ? entry.found.quality.flags : [];
            entry.asked = true;
            if (!flags.length || window.confirm(entry.file.name + " " + screener.describeFlags(flags) +
                " (a heuristic check in your browser). Add it anyway?")) return true;
            entry.row.querySelector("[data-role=state]").textContent = "not sent (you chose not to)";
            return false;
          });
          return go.reduce(function (previous, entry) {
            return previous.then(function () { return send(entry); });
          }, Promise.resolve());
        }).then(function () {
          files.value = "";
          shown = null;
          refresh(card.dataset.job);
        });
      });
    });
  }

  if (window.SightlineScreen) window.SightlineScreen.load().then(screenJobs, function () {});

  window.SightlineFeed(cfg.tenant, {
    onSubscribed: resync,
    "job.progress": function (message) { refresh(message.job); }
  });
})();
