// Diagnostic image viewer on a <canvas>: fit, zoom about the cursor, pan, window/level and a heatmap overlay.
// Markup: <figure class="viewer" data-image-url data-width data-height [data-pixels-url data-window-center
// data-window-width] [data-heatmap-url]> with a .viewer-toolbar and a canvas.viewer-canvas (see viewer.css).
// Mouse: wheel zooms about the cursor, left-drag pans, right-drag or shift+left-drag sets window/level
// (right = wider, down = higher centre). Keys on the focused canvas: + / - zoom, arrows move, 0 resets.
// Hooks for tests: canvas.dataset.window = "C/W", canvas.dataset.zoom (1 = fit), figure.dataset.ready = "1"
// after the first frame is painted ("error" if nothing could be loaded), figure.dataset.heatmap = the
// heatmap's state (loading, computing, ready, none).
// The heatmap is made on request: GET data-heatmap-url answers the PNG, or 202 while a worker makes it;
// the viewer then shows "computing…" (.heatmap-state) until the page's feed dispatches
// "sightline:heatmap-ready" on the figure (heatmap.ready on the WebSocket), or its slow fallback poll.
(function () {
  "use strict";
  // Window presets in Hounsfield units: [centre, width].
  var PRESETS = {lung: [-600, 1500], bone: [400, 1800], soft: [40, 400], brain: [40, 80]};
  var MIN_ZOOM = 0.1, MAX_ZOOM = 20;
  // the push (heatmap.ready) normally ends "computing…"; this poll only covers a lost one
  var HEAT_POLL_FIRST_MS = 15000, HEAT_POLL_MAX_MS = 60000;
  var WINDOW_DRAG_STEPS = 512;  // a drag across 512 px sweeps the image's whole value range
  var WHEEL_ZOOM_RATE = 0.002;  // zoom factor exp(-rate * pixels scrolled)
  var WHEEL_LINE_PX = 16;  // a wheel that scrolls in lines: pixels per line
  var KEY_ZOOM = 1.25, KEY_PAN_PX = 40;  // "+" zooms in by KEY_ZOOM, "-" out by its inverse

  function clamp(v, lo, hi) { return v < lo ? lo : v > hi ? hi : v; }
  function num(v) { return String(Math.round(v * 100) / 100); }

  function loadImage(url) {
    return new Promise(function (resolve, reject) {
      var img = new Image();
      img.onload = function () { resolve(img); };
      img.onerror = function () { reject(new Error("could not load " + url)); };
      img.src = url;
    });
  }

  // Raw modality values: little-endian Float32, rows*columns, row-major.
  function loadPixels(url, count) {
    return fetch(url, {credentials: "same-origin"}).then(function (response) {
      if (!response.ok) throw new Error(url + ": HTTP " + response.status);
      return response.arrayBuffer();
    }).then(function (buffer) {
      if (!count || buffer.byteLength !== count * 4) throw new Error(url + ": expected " + count + " Float32 values");
      var view = new DataView(buffer), out = new Float32Array(count);
      for (var i = 0; i < count; i++) out[i] = view.getFloat32(i * 4, true);
      return out;
    });
  }

  function init(fig) {
    var canvas = fig.querySelector(".viewer-canvas");
    if (!canvas || !canvas.getContext) return;
    var ctx = canvas.getContext("2d");
    var d = fig.dataset;
    var status = fig.querySelector(".viewer-status");
    var presetBox = fig.querySelector(".viewer-presets");
    var presetButtons = fig.querySelectorAll("[data-preset]");
    var toggle = fig.querySelector("#heatmap-toggle");
    var opacity = fig.querySelector("#heatmap-opacity");
    var heatNote = fig.querySelector(".heatmap-state");
    var W = Number(d.width) || 0, H = Number(d.height) || 0;
    var off = document.createElement("canvas"), offCtx = off.getContext("2d"), offData = null;
    var pixels = null, source = null, heat = null;
    var range = 256, step = 0.5, minWidth = 1;
    var defaults = {c: 128, w: 256}, win = {c: 128, w: 256};
    var view = {x: 0, y: 0, z: 1}; // image point at the canvas centre, zoom relative to fit
    var drag = null, frame = 0, windowDirty = true;

    function setAspect() { if (W && H) canvas.style.aspectRatio = W + " / " + H; }
    setAspect();

    function fit() { return Math.min(canvas.clientWidth / W, canvas.clientHeight / H) || 1; }
    function scale() { return fit() * view.z; } // CSS pixels per image pixel
    function request() { if (!frame) frame = window.requestAnimationFrame(draw); }

    function setWindow(c, w) {
      win.c = c;
      win.w = Math.max(minWidth, w);
      windowDirty = true;
      request();
    }

    function reset() {
      view = {x: W / 2, y: H / 2, z: 1};
      setWindow(defaults.c, defaults.w);
    }

    // Zoom by factor keeping the image point under (mx, my) (CSS pixels in the canvas) where it is.
    function zoomAt(factor, mx, my) {
      var before = scale();
      view.z = clamp(view.z * factor, MIN_ZOOM, MAX_ZOOM);
      var after = scale();
      view.x += (mx - canvas.clientWidth / 2) * (1 / before - 1 / after);
      view.y += (my - canvas.clientHeight / 2) * (1 / before - 1 / after);
      request();
    }

    function pan(dx, dy) {
      var s = scale();
      view.x -= dx / s;
      view.y -= dy / s;
      request();
    }

    // Grey (or per channel) = floor((v - (C - W/2)) * 256 / W), clamped to 0..255: C128 W256 is the identity.
    function renderWindow() {
      var out = offData.data, lo = win.c - win.w / 2, k = 256 / win.w, i, v;
      if (pixels) {
        for (i = 0; i < pixels.length; i++) {
          v = (pixels[i] - lo) * k;
          out[i * 4] = out[i * 4 + 1] = out[i * 4 + 2] = v < 0 ? 0 : v > 255 ? 255 : v | 0;
        }
      } else if (source) {
        var lut = new Uint8ClampedArray(256);
        for (i = 0; i < 256; i++) lut[i] = Math.floor((i - lo) * k);
        for (i = 0; i < source.length; i += 4) {
          out[i] = lut[source[i]];
          out[i + 1] = lut[source[i + 1]];
          out[i + 2] = lut[source[i + 2]];
          out[i + 3] = source[i + 3];
        }
      } else {
        return; // a cross-origin PNG cannot be read back: it stays as drawn, without window/level
      }
      offCtx.putImageData(offData, 0, 0);
    }

    function report() {
      canvas.dataset.window = num(win.c) + "/" + num(win.w);
      canvas.dataset.zoom = String(view.z);
      var fmt = range < 100 ? num : Math.round;
      if (status) status.textContent = "W " + fmt(win.w) + " / L " + fmt(win.c) + " · " + Math.round(view.z * 100) + "%";
      presetButtons.forEach(function (button) {
        var p = PRESETS[button.dataset.preset];
        button.setAttribute("aria-pressed", String(Boolean(p && p[0] === win.c && p[1] === win.w)));
      });
      if (fig.dataset.ready !== "1") fig.dataset.ready = "1";
    }

    function draw() {
      frame = 0;
      var dpr = window.devicePixelRatio || 1;
      var bw = Math.round(canvas.clientWidth * dpr), bh = Math.round(canvas.clientHeight * dpr);
      if (canvas.width !== bw || canvas.height !== bh) {
        canvas.width = bw;
        canvas.height = bh;
      }
      ctx.setTransform(1, 0, 0, 1, 0, 0);
      ctx.clearRect(0, 0, bw, bh);
      if (!offData) return;
      if (windowDirty) {
        renderWindow();
        windowDirty = false;
      }
      var s = scale() * dpr; // device pixels per image pixel
      ctx.setTransform(s, 0, 0, s, bw / 2 - view.x * s, bh / 2 - view.y * s);
      ctx.imageSmoothingEnabled = s < 2; // show real pixels once they are big enough to see
      ctx.drawImage(off, 0, 0);
      if (heat && toggle && toggle.checked) {
        ctx.imageSmoothingEnabled = true;
        ctx.globalAlpha = opacity ? clamp(Number(opacity.value) / 100, 0, 1) : 0.5;
        ctx.drawImage(heat, 0, 0, W, H);
        ctx.globalAlpha = 1;
      }
      report();
    }

    function setup(image, raw, heatmap) {
      if (!image && !raw) {
        fig.dataset.ready = "error";
        if (status) status.textContent = "The image could not be loaded.";
        return;
      }
      W = W || image.naturalWidth;
      H = H || image.naturalHeight;
      setAspect();
      off.width = W;
      off.height = H;
      offData = offCtx.createImageData(W, H);
      pixels = raw;
      if (pixels) {
        var lo = Infinity, hi = -Infinity;
        for (var i = 0; i < pixels.length; i++) {
          if (pixels[i] < lo) lo = pixels[i];
          if (pixels[i] > hi) hi = pixels[i];
        }
        range = hi > lo ? hi - lo : 1;
        defaults = {c: isFinite(lo) ? (lo + hi) / 2 : 0, w: range};
        for (i = 3; i < offData.data.length; i += 4) offData.data[i] = 255;
      } else {
        if (presetBox) presetBox.hidden = true; // presets are in modality units; an 8-bit PNG has none
        offCtx.drawImage(image, 0, 0, W, H);
        try { source = offCtx.getImageData(0, 0, W, H).data; } catch (e) { source = null; }
      }
      if (d.windowCenter !== undefined && Number(d.windowWidth) > 0) {
        defaults = {c: Number(d.windowCenter), w: Number(d.windowWidth)};
      }
      step = range / WINDOW_DRAG_STEPS;
      minWidth = Math.min(1, range / 100);
      heat = heatmap;
      showHeatControls();
      reset();
    }

    // --- the heatmap, asked for when the viewer opens ---
    var heatPoll = 0, heatNudged = false, heatDelay = HEAT_POLL_FIRST_MS;

    function setHeatState(state) {
      fig.dataset.heatmap = state;
      if (heatNote) heatNote.hidden = state !== "computing";
      showHeatControls();
    }

    function showHeatControls() {
      [toggle, opacity].forEach(function (el) { if (el) el.closest("label").hidden = !heat; });
    }

    // → an ImageBitmap (no blob: URL, which the site's img-src does not allow), or null while computing
    function fetchHeatmap() {
      setHeatState("loading");
      return fetch(d.heatmapUrl, {credentials: "same-origin"}).then(function (response) {
        if (response.status === 202) return null;
        if (!response.ok) throw new Error(d.heatmapUrl + ": HTTP " + response.status);
        return response.blob().then(function (blob) { return window.createImageBitmap(blob); });
      }).then(function (bitmap) {
        if (bitmap) {
          heat = bitmap;
          window.clearTimeout(heatPoll);
          setHeatState("ready");
          request();
        } else {
          setHeatState("computing");
          if (heatNudged) { heatNudged = false; fetchHeatmap(); return null; } // it became ready meanwhile
          // a lost push, or a request the server sends again after its stall time: ask again, slowly
          window.clearTimeout(heatPoll);
          heatPoll = window.setTimeout(fetchHeatmap, heatDelay);
          heatDelay = Math.min(heatDelay * 2, HEAT_POLL_MAX_MS);
        }
        return bitmap;
      }).catch(function (error) {
        setHeatState("none");
        warn(error);
        return null;
      });
    }

    fig.addEventListener("sightline:heatmap-ready", function () {
      if (fig.dataset.heatmap === "computing") fetchHeatmap();
      else if (fig.dataset.heatmap === "loading") heatNudged = true;
    });

    canvas.addEventListener("wheel", function (e) {
      if (!offData) return;
      e.preventDefault();
      var unit = e.deltaMode === 1 ? WHEEL_LINE_PX : e.deltaMode === 2 ? canvas.clientHeight : 1;
      var rect = canvas.getBoundingClientRect();
      zoomAt(Math.exp(-e.deltaY * unit * WHEEL_ZOOM_RATE), e.clientX - rect.left, e.clientY - rect.top);
    }, {passive: false});

    canvas.addEventListener("pointerdown", function (e) {
      if (!offData || (e.button !== 0 && e.button !== 2)) return;
      drag = {windowing: e.button === 2 || e.shiftKey, x: e.clientX, y: e.clientY, id: e.pointerId};
      canvas.setPointerCapture(e.pointerId);
      canvas.classList.add(drag.windowing ? "is-windowing" : "is-panning");
      canvas.focus({preventScroll: true});
    });
    canvas.addEventListener("pointermove", function (e) {
      if (!drag || e.pointerId !== drag.id) return;
      var dx = e.clientX - drag.x, dy = e.clientY - drag.y;
      drag.x = e.clientX;
      drag.y = e.clientY;
      if (drag.windowing) setWindow(win.c + dy * step, win.w + dx * step);
      else pan(dx, dy);
    });
    function endDrag(e) {
      if (!drag || e.pointerId !== drag.id) return;
      drag = null;
      canvas.classList.remove("is-windowing", "is-panning");
    }
    ["pointerup", "pointercancel", "lostpointercapture"].forEach(function (type) {
      canvas.addEventListener(type, endDrag);
    });
    canvas.addEventListener("contextmenu", function (e) { e.preventDefault(); });

    canvas.addEventListener("keydown", function (e) {
      if (!offData || e.ctrlKey || e.metaKey || e.altKey) return;
      var cx = canvas.clientWidth / 2, cy = canvas.clientHeight / 2, by = KEY_PAN_PX;
      switch (e.key) {
        case "+": case "=": zoomAt(KEY_ZOOM, cx, cy); break;
        case "-": case "_": zoomAt(1 / KEY_ZOOM, cx, cy); break;
        case "0": reset(); break;
        case "ArrowLeft": pan(-by, 0); break;
        case "ArrowRight": pan(by, 0); break;
        case "ArrowUp": pan(0, -by); break;
        case "ArrowDown": pan(0, by); break;
        default: return;
      }
      e.preventDefault();
    });

    presetButtons.forEach(function (button) {
      button.addEventListener("click", function () {
        var p = PRESETS[button.dataset.preset];
        if (p && pixels) setWindow(p[0], p[1]);
      });
    });
    var resetButton = fig.querySelector("[data-action=reset]");
    if (resetButton) resetButton.addEventListener("click", function () { if (offData) reset(); });
    if (toggle) toggle.addEventListener("change", request);
    if (opacity) opacity.addEventListener("input", request);
    if (window.ResizeObserver) new ResizeObserver(function () { request(); }).observe(canvas);
    else window.addEventListener("resize", request);

    function warn(error) { console.warn("viewer:", error.message); return null; }
    Promise.all([
      d.imageUrl ? loadImage(d.imageUrl).catch(warn) : null,
      d.pixelsUrl ? loadPixels(d.pixelsUrl, W * H).catch(warn) : null,
      d.heatmapUrl ? fetchHeatmap() : null,
    ]).then(function (loaded) { setup(loaded[0], loaded[1], loaded[2]); });
  }

  window.SightlineViewer = {init: init};
  function start() { document.querySelectorAll("figure.viewer").forEach(init); }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
