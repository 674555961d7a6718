// The upload page with the browser screen (issue 17). Once the screen has loaded, each PNG/JPEG
// chosen is screened at once and its PRELIMINARY finding shown; on submit each file goes to the
// API with its screen (`screen` field, untrusted input the server checks), and the server's read
// replaces the preliminary one when result.ready arrives. Until the screen loads, or when it
// cannot, nothing here runs and the form posts as it does without screening.
(function () {
  "use strict";
  var form = document.getElementById("upload-form");
  var panel = document.getElementById("screen");
  if (!form || !panel || !window.SightlineScreen) return;
  var input = form.querySelector("input[type=file]");
  var tbody = document.getElementById("screen-files");
  var tenant = form.dataset.tenant;
  var rows = [], byImage = {}, sending = false;

  function cell(row, role, text) {
    var td = document.createElement("td");
    td.dataset.role = role;
    td.textContent = text || "";
    row.appendChild(td);
    return td;
  }

  function set(entry, role, text, className) {
    var td = entry.row.querySelector("[data-role=" + role + "]");
    td.textContent = text;
    if (className !== undefined) td.className = className;
    return td;
  }

  function showScreen(entry, found) {
    entry.found = found;
    if (found.status !== "screened") {
      entry.row.dataset.finding = "not-screened";
      set(entry, "finding", "not screened" + (found.reason ? " (" + found.reason + ")" : ""), "muted");
      set(entry, "quality", "—");
      return;
    }
    entry.row.dataset.finding = "preliminary";
    var finding = set(entry, "finding", "", "preliminary");
    var mark = document.createElement("span");
    mark.className = "badge";
    mark.textContent = "preliminary";
    finding.appendChild(mark);
    finding.appendChild(document.createTextNode(" " + found.label + " (" + found.probability.toFixed(2) + ")"));
    var when = document.createElement("small");
    when.dataset.role = "latency";
    when.textContent = " · screened in your browser in " + found.latency_ms + " ms";
    finding.appendChild(when);
    var flags = found.quality.flags;
    entry.row.dataset.flags = flags.join(" ");
    set(entry, "quality", flags.length ? window.SightlineScreen.describeFlags(flags) : "looks fine",
        flags.length ? "warning" : "muted");
  }

  function choose() {
    // a new choice replaces the files not yet sent
    rows = rows.filter(function (entry) {
      if (entry.sent) return true;
      entry.row.remove();
      return false;
    });
    Array.prototype.forEach.call(input.files, function (file) {
      var row = document.createElement("tr");
      var entry = {file: file, row: row, sent: false};
      cell(row, "name", file.name);
      cell(row, "finding", "screening…");
      cell(row, "quality", "");
      cell(row, "state", "not sent yet");
      tbody.appendChild(row);
      entry.screening = window.SightlineScreen.screen(file).then(function (found) { showScreen(entry, found); },
        function () { showScreen(entry, {status: "failed", reason: "the screen failed"}); });
      rows.push(entry);
    });
  }

  function errorText(response) {
    return response.json().then(function (body) {
      return (body && body.error && body.error.message) || ("the server answered " + response.status);
    }, function () { return "the server answered " + response.status; });
  }

  function upload(entry) {
    var data = new FormData();
    data.append("file", entry.file, entry.file.name);
    if (entry.found && entry.found.status === "screened") data.append("screen", JSON.stringify(entry.found.screen));
    set(entry, "state", "uploading…");
    return fetch(form.dataset.api, {
      method: "POST", body: data, credentials: "same-origin",
      headers: {"Accept": "application/json", "X-Tenant": tenant,
                "X-CSRFToken": form.querySelector("input[name=csrfmiddlewaretoken]").value}
    }).then(function (response) {
      if (!response.ok) return errorText(response).then(function (text) { throw new Error(text); });
      return response.json();
    }).then(function (image) {
      entry.sent = true;
      entry.imageId = image.id;
      byImage[image.id] = entry;
      var state = set(entry, "state", "");
      var link = document.createElement("a");
      link.href = form.dataset.imageUrl.replace("/0/", "/" + image.id + "/");
      link.textContent = "#" + image.id;
      state.appendChild(document.createTextNode("uploaded, reading… "));
      state.appendChild(link);
      entry.row.dataset.image = image.id;
      refresh(entry);  // a read that ended before this answer came back
      return true;
    }, function (error) {
      set(entry, "state", "not uploaded: " + error.message, "error");
      return false;
    });
  }

  function submit(event) {
    event.preventDefault();
    if (sending) return;
    var chosen = rows.filter(function (entry) { return !entry.sent && !entry.skipped; });
    if (!chosen.length) return;
    sending = true;
    Promise.all(chosen.map(function (entry) { return entry.screening; })).then(function () {
      // a flagged file is sent only when its sender says so
      var toSend = chosen.filter(function (entry) {
        var flags = entry.found && entry.found.quality ? entry.found.quality.flags : [];
        if (!flags.length) return true;
        var words = entry.file.name + " " + window.SightlineScreen.describeFlags(flags) +
          " (a heuristic check in your browser). Send it anyway?";
        if (window.confirm(words)) return true;
        entry.skipped = true;
        set(entry, "state", "not sent (you chose not to)", "muted");
        return false;
      });
      return toSend.reduce(function (previous, entry) {
        return previous.then(function (count) { return upload(entry).then(function (ok) { return count + (ok ? 1 : 0); }); });
      }, Promise.resolve(0));
    }).then(function (count) {
      sending = false;
      input.value = "";  // what was sent is not sent again; the rows stay until the page is left
      if (count) input.required = false;
      form.dataset.uploaded = String((Number(form.dataset.uploaded) || 0) + count);
      var summary = document.getElementById("screen-summary");
      if (summary && count) {
        summary.textContent = count + " image" + (count !== 1 ? "s" : "") + " uploaded; AI reads are queued. " +
          "Each row shows the server's read when it is done; all of them are on the ";
        var link = document.createElement("a");
        link.href = form.dataset.imageList;
        link.textContent = "image list";
        summary.appendChild(link);
        summary.appendChild(document.createTextNode("."));
      }
    });
  }

  function showFinal(entry, image) {
    if (image.status !== "done" && image.status !== "failed") return;
    entry.row.dataset.finding = "final";
    var finding = set(entry, "finding", "", image.top_label ? "" : "error");
    var mark = document.createElement("span");
    mark.className = "badge final";
    mark.textContent = "server read";
    finding.appendChild(mark);
    finding.appendChild(document.createTextNode(" " + (image.top_label
      ? image.top_label + " (" + Number(image.top_probability).toFixed(2) + ")" : (image.error || "failed"))));
    if (entry.found && entry.found.status === "screened") {
      var before = document.createElement("small");
      before.className = "muted";
      before.textContent = " · the browser screen said " + entry.found.label;
      finding.appendChild(before);
    }
    var state = entry.row.querySelector("[data-role=state]");
    state.firstChild.textContent = image.status === "done" ? "read " : "read failed ";
  }

  function refresh(entry) {
    fetch(form.dataset.imageApi.replace("/0/", "/" + entry.imageId + "/"), {credentials: "same-origin",
      headers: {"Accept": "application/json", "X-Tenant": tenant}})
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (image) { showFinal(entry, image); })
      .catch(function () {});
  }

  window.SightlineScreen.load().then(function () {
    panel.hidden = false;
    form.dataset.screening = "on";
    input.addEventListener("change", choose);
    if (input.files.length) choose();
    form.addEventListener("submit", submit);
    window.SightlineFeed(tenant, {
      // reads that ended while the socket was down: the API has them
      onSubscribed: function () {
        rows.forEach(function (entry) { if (entry.imageId && entry.row.dataset.finding !== "final") refresh(entry); });
      },
      "result.ready": function (message) { if (byImage[message.image]) refresh(byImage[message.image]); }
    });
  }, function () {
    form.dataset.screening = "unavailable";  // the plain form, as without screening
  });
})();
