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

  window.SightlineFeed(cfg.tenant, {
    onSubscribed: resync,
    "job.progress": function (message) { refresh(message.job); }
  });
})();
