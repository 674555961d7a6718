// Live AI results. The socket only says "something changed"; the API is the truth, so a
// page that reconnects fetches what it may have missed.
(function () {
  "use strict";
  var configElement = document.getElementById("sightline-config");
  var cfg = configElement ? JSON.parse(configElement.textContent) : {};
  var table = document.querySelector("#images tbody");

  function api(url) {
    return fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json", "X-Tenant": cfg.tenant || ""}})
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); });
  }

  function cell(text) { var td = document.createElement("td"); td.textContent = text || "—"; return td; }

  function statusSpan(status) {
    var span = document.createElement("span");
    span.dataset.role = "status";
    span.className = "status status-" + (status || "none");
    span.textContent = status || "no read";
    return span;
  }

  function findingText(image) {
    if (image.top_label) return image.top_label + " (" + Number(image.top_probability).toFixed(2) + ")";
    return image.error || "—";
  }

  function render(row, image) {
    var status = row.querySelector("[data-role=status]");
    status.replaceWith(statusSpan(image.status));
    var finding = row.querySelector("[data-role=finding]");
    finding.textContent = findingText(image);
    finding.classList.toggle("error", !image.top_label && !!image.error);
  }

  function insert(image) {
    var empty = table.querySelector("tr.empty");
    if (empty) empty.remove();
    var row = document.createElement("tr");
    row.dataset.image = image.id;
    var link = document.createElement("a");
    link.href = cfg.imageUrl.replace("/0/", "/" + image.id + "/");
    link.textContent = "#" + image.id;
    var first = document.createElement("td");
    first.appendChild(link);
    row.appendChild(first);
    row.appendChild(cell(image.study.patient_id));
    row.appendChild(cell(image.study.accession_number));
    row.appendChild(cell(image.study.modality));
    row.appendChild(cell(new Date(image.created).toISOString().slice(0, 16).replace("T", " ")));
    var statusTd = document.createElement("td");
    statusTd.appendChild(statusSpan(image.status));
    row.appendChild(statusTd);
    var finding = cell("");
    finding.dataset.role = "finding";
    row.appendChild(finding);
    table.insertBefore(row, table.firstChild);
    render(row, image);
  }

  function upsert(image) {
    var row = table.querySelector('tr[data-image="' + image.id + '"]');
    if (row) render(row, image); else insert(image);
  }

  function resync() {
    if (cfg.reloadOnImage) {
      api(cfg.apiImage).then(function (image) {
        if (image.status === "done" || image.status === "failed") window.location.reload();
      }).catch(function () {});
      return;
    }
    if (!table) return;
    api(cfg.apiList).then(function (page) { page.results.slice().reverse().forEach(upsert); }).catch(function () {});
  }

  function onResult(message) {
    if (cfg.reloadOnImage) {
      if (message.image === cfg.reloadOnImage) window.location.reload();
      return;
    }
    if (!table) return;
    var row = table.querySelector('tr[data-image="' + message.image + '"]');
    if (row) {
      render(row, {status: message.status, top_label: message.top_label, top_probability: message.probability,
                   error: message.status === "failed" ? "failed" : ""});
    }
    // the API has the error text and study fields; fetch the row to be exact
    api(cfg.apiImage.replace("/0/", "/" + message.image + "/")).then(upsert).catch(function () {});
  }

  // the viewer asked for this image's heatmap: it fetches it again (the database is the truth)
  function heatmapNudge() {
    document.querySelectorAll("figure.viewer").forEach(function (fig) {
      fig.dispatchEvent(new CustomEvent("sightline:heatmap-ready"));
    });
  }

  function onHeatmap(message) {
    if (cfg.heatmapImage && message.image === cfg.heatmapImage) heatmapNudge();
  }

  window.SightlineFeed(cfg.tenant, {
    // whatever finished between the page's render (or the last connection) and now
    onSubscribed: function () {
      resync();
      if (cfg.heatmapImage) heatmapNudge();
    },
    "result.ready": onResult,
    "heatmap.ready": onHeatmap
  });
})();
