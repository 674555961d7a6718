// Small behaviours kept out of the HTML so the Content-Security-Policy can forbid inline script.
document.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
  select.addEventListener("change", function () { select.form.submit(); });
});
document.querySelectorAll("form[data-confirm]").forEach(function (form) {
  form.addEventListener("submit", function (event) {
    if (!window.confirm(form.dataset.confirm)) event.preventDefault();
  });
});
// Grad-CAM overlay on the image page: a toggle and an opacity slider.
(function () {
  var overlay = document.getElementById("heatmap");
  var toggle = document.getElementById("heatmap-toggle");
  var opacity = document.getElementById("heatmap-opacity");
  if (!overlay || !toggle) return;
  toggle.addEventListener("change", function () { overlay.hidden = !toggle.checked; });
  if (opacity) {
    var apply = function () { overlay.style.opacity = String(opacity.value / 100); };
    opacity.addEventListener("input", apply);
    apply();
  }
})();
