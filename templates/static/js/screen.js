// The browser screen (issue 17): the hospital's screening model in ONNX Runtime Web gives a
// PRELIMINARY read of a PNG/JPEG and a heuristic quality check before the file is sent. The
// server still reads every image; its read is the result. Without WebAssembly, without the page
// config (#sightline-screening, json_script) or when the runtime fails to load, `load()` rejects
// and the page stays the plain form it is without screening.
window.SightlineScreen = (function () {
  "use strict";
  var configElement = document.getElementById("sightline-screening");
  var cfg = configElement ? JSON.parse(configElement.textContent) : null;

  // Pillow's 8-bit resampling precision (libImaging/Resample.c: PRECISION_BITS = 32 - 8 - 2)
  var PRECISION_BITS = 22;
  // Quality gate, heuristics on the pixels the model sees (0-255 units). A film's grain alone has a
  // std of several levels; under BLANK_STD the image is one flat colour to the eye.
  var BLANK_STD = 2.0;
  // share of channel values at 0 or 255 above which an image is called saturated (clipped exposure)
  var SATURATED_SHARE = 0.25;
  // ood_score: how far the image's statistics lie outside the training set's 1st-99th percentile
  // range, in units of that range's width (capped at 1); above this it is called unfamiliar
  var UNFAMILIAR_SCORE = 0.25;
  // a PNG's IHDR bit depth (byte 24) and colour type (byte 25): 16-bit files the server stretches to
  // 8 bits by their own range (handler.to_rgb), which a canvas cannot reproduce; a canvas keeps
  // pixels premultiplied, so wherever alpha < 255 it cannot give back the RGB that PIL's
  // convert("RGB") keeps (colour types 4 and 6, or a tRNS chunk): neither is screened
  var PNG_BIT_DEPTH_OFFSET = 24, PNG_16_BIT = 16, PNG_COLOUR_TYPE_OFFSET = 25, PNG_ALPHA_TYPES = [4, 6];
  var PNG_FIRST_CHUNK = 8, PNG_CHUNK_OVERHEAD = 12;  // signature; length + type + CRC
  // createImageBitmap applies a JPEG's EXIF orientation (Chromium ignores imageOrientation "none"),
  // Pillow does not: a rotated JPEG, or a CMYK one (4 components), is not screened
  var JPEG_EXIF_ORIENTATION = 0x0112, JPEG_CMYK_COMPONENTS = 4;
  var HEAD_BYTES = 65536;  // PNG chunks before the first IDAT and a JPEG's APPn and SOF segments live here

  var loading = null, queue = Promise.resolve();

  function supported() {
    return !!cfg && typeof WebAssembly === "object" && typeof createImageBitmap === "function";
  }

  function loadScript(src) {
    return new Promise(function (resolve, reject) {
      if (window.ort) { resolve(); return; }
      var script = document.createElement("script");
      script.src = src;
      script.onload = function () { resolve(); };
      script.onerror = function () { reject(new Error("the runtime did not load")); };
      document.head.appendChild(script);
    });
  }

  function hex(buffer) {
    return Array.prototype.map.call(new Uint8Array(buffer), function (b) {
      return ("0" + b.toString(16)).slice(-2);
    }).join("");
  }

  function fetchModel() {
    return fetch(cfg.model_url, {credentials: "same-origin"}).then(function (response) {
      if (!response.ok) throw new Error("the screening model answered " + response.status);
      return response.arrayBuffer();
    }).then(function (bytes) {
      // crypto.subtle exists in secure contexts only (https, localhost): elsewhere the model cannot
      // be checked, so the page does not screen (it works as without screening)
      if (!cfg.model_sha256 || !(window.crypto && crypto.subtle)) {
        throw new Error("the screening model cannot be checked here (no SHA-256 outside https)");
      }
      return crypto.subtle.digest("SHA-256", bytes).then(function (digest) {
        if (hex(digest) !== cfg.model_sha256) throw new Error("the screening model's checksum does not match");
        return bytes;
      });
    });
  }

  // Resolves to the screener once the runtime and the model are in; rejects when the page cannot screen.
  function load() {
    if (loading) return loading;
    if (!supported()) {
      loading = Promise.reject(new Error(cfg ? "this browser has no WebAssembly" : "screening is off"));
      loading.catch(function () {});
      return loading;
    }
    var started = performance.now();
    loading = Promise.all([loadScript(cfg.ort.script), fetchModel()]).then(function (parts) {
      ort.env.wasm.wasmPaths = {mjs: cfg.ort.mjs, wasm: cfg.ort.wasm};  // hashed static names
      // threads need SharedArrayBuffer, which only a cross-origin isolated page has
      ort.env.wasm.numThreads = window.crossOriginIsolated ? Math.min(4, navigator.hardwareConcurrency || 1) : 1;
      return ort.InferenceSession.create(new Uint8Array(parts[1]), {executionProviders: ["wasm"]});
    }).then(function (session) {
      api.session = session;
      // one run on a blank input while the page settles: the runtime's first run prepares its
      // kernels (hundreds of ms, bench/screening_browser.py), so the first file chosen is not slowed
      return run(new Uint8Array(3 * cfg.input_size * cfg.input_size)).then(function () {
        api.load_ms = Math.round(performance.now() - started);
        return api;
      });
    });
    return loading;
  }

  // ---- what a file is -------------------------------------------------------------------
  function pngKind(b) {
    if (b[PNG_BIT_DEPTH_OFFSET] === PNG_16_BIT) return "png16";
    if (PNG_ALPHA_TYPES.indexOf(b[PNG_COLOUR_TYPE_OFFSET]) >= 0) return "alpha";
    var view = new DataView(b.buffer, b.byteOffset, b.byteLength);
    for (var at = PNG_FIRST_CHUNK; at + 8 <= b.length; at += PNG_CHUNK_OVERHEAD + view.getUint32(at)) {
      var type = String.fromCharCode(b[at + 4], b[at + 5], b[at + 6], b[at + 7]);
      if (type === "tRNS") return "alpha";
      if (type === "IDAT" || type === "IEND") break;
    }
    return "png";
  }

  // the EXIF Orientation in an APP1 segment (1 when there is none or it cannot be read)
  function exifOrientation(view, start, length) {
    if (length < 14 || view.getUint32(start) !== 0x45786966) return 1;  // "Exif"
    var tiff = start + 6, little = view.getUint16(tiff) === 0x4949;
    var ifd = tiff + view.getUint32(tiff + 4, little);
    if (ifd + 2 > start + length) return 1;
    var count = view.getUint16(ifd, little);
    for (var i = 0; i < count; i++) {
      var entry = ifd + 2 + i * 12;
      if (entry + 12 > start + length) return 1;
      if (view.getUint16(entry, little) === JPEG_EXIF_ORIENTATION) return view.getUint16(entry + 8, little);
    }
    return 1;
  }

  function jpegKind(b) {
    var view = new DataView(b.buffer, b.byteOffset, b.byteLength);
    for (var at = 2; at + 4 <= b.length && b[at] === 0xff;) {
      var marker = b[at + 1], length = view.getUint16(at + 2);
      if (marker === 0xe1 && at + 2 + length <= b.length && exifOrientation(view, at + 4, length - 2) !== 1) {
        return "rotated";
      }
      var frame = marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc;
      if (frame) return at + 9 < b.length && b[at + 9] === JPEG_CMYK_COMPONENTS ? "cmyk" : "jpeg";
      if (marker === 0xda) break;  // scan data: no frame header before it
      at += 2 + length;
    }
    return "jpeg";
  }

  function sniff(file) {
    return file.slice(0, HEAD_BYTES).arrayBuffer().then(function (head) {
      var b = new Uint8Array(head);
      if (b[0] === 0x89 && b[1] === 0x50 && b[2] === 0x4e && b[3] === 0x47) return pngKind(b);
      if (b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return jpegKind(b);
      return "other";
    }).catch(function () { return "other"; });  // a header that cannot be read is not screened
  }

  function decode(file) {
    var options = {colorSpaceConversion: "none", premultiplyAlpha: "none"};
    return createImageBitmap(file, options).then(function (bitmap) {
      var canvas = document.createElement("canvas");
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
      var context = canvas.getContext("2d", {willReadFrequently: true});
      context.drawImage(bitmap, 0, 0);  // native size: the resize below is Pillow's, not the canvas's
      var data = context.getImageData(0, 0, bitmap.width, bitmap.height);
      bitmap.close();
      return data;
    });
  }

  // RGBA (canvas) → RGB planes, as PIL's convert("RGB"): alpha dropped, a grey PNG's L copied to R, G, B
  function planes(image) {
    var n = image.width * image.height, rgba = image.data;
    var out = [new Uint8Array(n), new Uint8Array(n), new Uint8Array(n)];
    for (var i = 0, j = 0; i < n; i++, j += 4) {
      out[0][i] = rgba[j];
      out[1][i] = rgba[j + 1];
      out[2][i] = rgba[j + 2];
    }
    return out;
  }

  // ---- Pillow's Image.resize(size, BILINEAR), exactly (libImaging/Resample.c) ----------------
  // precompute_coeffs: a triangle filter whose support grows with the downscale factor, weights
  // normalised to sum 1, then normalize_coeffs_8bpc's fixed point
  function coefficients(inSize, outSize) {
    var scale = inSize / outSize, filterscale = Math.max(scale, 1.0);
    var support = 1.0 * filterscale, ss = 1.0 / filterscale;
    var ksize = Math.ceil(support) * 2 + 1;
    var bounds = new Int32Array(outSize * 2), kk = new Int32Array(outSize * ksize);
    var weights = new Float64Array(ksize);
    for (var xx = 0; xx < outSize; xx++) {
      var center = (xx + 0.5) * scale, ww = 0.0;
      var xmin = Math.trunc(center - support + 0.5);  // C's (int): toward zero
      if (xmin < 0) xmin = 0;
      var xmax = Math.trunc(center + support + 0.5);
      if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      for (var x = 0; x < xmax; x++) {
        var t = Math.abs((x + xmin - center + 0.5) * ss);
        var w = t < 1.0 ? 1.0 - t : 0.0;
        weights[x] = w;
        ww += w;
      }
      for (x = 0; x < xmax; x++) {
        var k = ww !== 0.0 ? weights[x] / ww : weights[x];
        kk[xx * ksize + x] = k < 0 ? Math.trunc(-0.5 + k * (1 << PRECISION_BITS))
                                   : Math.trunc(0.5 + k * (1 << PRECISION_BITS));
      }
      bounds[xx * 2] = xmin;
      bounds[xx * 2 + 1] = xmax;
    }
    return {ksize: ksize, bounds: bounds, kk: kk};
  }

  function clip8(ss) {  // clip8(): the sum shifted back to 8 bits, clamped to 0-255
    var v = ss >> PRECISION_BITS;
    return v < 0 ? 0 : v > 255 ? 255 : v;
  }

  // one plane; horizontal pass first into an 8-bit intermediate, then vertical, as ImagingResampleInner
  function resizePlane(src, width, height, outW, outH) {
    var plane = src, w = width;
    if (outW !== width) {
      var h = coefficients(width, outW), tmp = new Uint8Array(outW * height);
      for (var y = 0; y < height; y++) {
        var row = y * width;
        for (var xx = 0; xx < outW; xx++) {
          var xmin = h.bounds[xx * 2], xmax = h.bounds[xx * 2 + 1], k = xx * h.ksize;
          var ss = 1 << (PRECISION_BITS - 1);
          for (var x = 0; x < xmax; x++) ss += src[row + xmin + x] * h.kk[k + x];
          tmp[y * outW + xx] = clip8(ss);
        }
      }
      plane = tmp;
      w = outW;
    }
    if (outH === height) return plane;
    var v = coefficients(height, outH), out = new Uint8Array(w * outH);
    for (var yy = 0; yy < outH; yy++) {
      var ymin = v.bounds[yy * 2], ymax = v.bounds[yy * 2 + 1], kv = yy * v.ksize;
      for (var c = 0; c < w; c++) {
        var sum = 1 << (PRECISION_BITS - 1);
        for (var yi = 0; yi < ymax; yi++) sum += plane[(ymin + yi) * w + c] * v.kk[kv + yi];
        out[yy * w + c] = clip8(sum);
      }
    }
    return out;
  }

  // ---- the model's input, its run, the quality gate -----------------------------------------
  function pixels(image) {
    var size = cfg.input_size, rgb = planes(image), n = size * size;
    var tensor = new Uint8Array(3 * n);
    for (var c = 0; c < 3; c++) tensor.set(resizePlane(rgb[c], image.width, image.height, size, size), c * n);
    return tensor;
  }

  function saturatedShare(image) {
    var rgba = image.data, clipped = 0, values = 0;
    for (var i = 0; i < rgba.length; i += 4) {
      for (var c = 0; c < 3; c++) {
        var v = rgba[i + c];
        if (v === 0 || v === 255) clipped++;
      }
      values += 3;
    }
    return values ? clipped / values : 0;
  }

  function meanStd(u8) {
    var sum = 0, sq = 0;
    for (var i = 0; i < u8.length; i++) { sum += u8[i]; sq += u8[i] * u8[i]; }
    var mean = sum / u8.length;
    return {mean: mean, std: Math.sqrt(Math.max(0, sq / u8.length - mean * mean))};
  }

  function energy(logits) {  // -logsumexp(logits): low (very negative) for inputs like the training set
    var peak = Math.max.apply(null, logits), total = 0;
    for (var i = 0; i < logits.length; i++) total += Math.exp(logits[i] - peak);
    return -(peak + Math.log(total));
  }

  function outside(value, range) {
    if (!range || range.length !== 2) return 0;
    var width = Math.max(range[1] - range[0], 1e-6);
    if (value < range[0]) return (range[0] - value) / width;
    if (value > range[1]) return (value - range[1]) / width;
    return 0;
  }

  function quality(tensor, image, logits) {
    var stats = meanStd(tensor), reference = cfg.reference || {}, flags = [];
    if (stats.std < BLANK_STD) flags.push("blank");
    if (saturatedShare(image) > SATURATED_SHARE) flags.push("saturated");
    var score = Math.min(1, Math.max(
      outside(stats.mean, reference.mean), outside(stats.std, reference.std), outside(energy(logits), reference.energy)));
    if (score > UNFAMILIAR_SCORE) flags.push("unfamiliar");
    return {flags: flags, ood_score: Math.round(score * 1000) / 1000};
  }

  function normalised(tensor) {  // what the server's model sees after its own normalisation, for tests
    var n = cfg.input_size * cfg.input_size, out = new Float32Array(tensor.length);
    for (var i = 0; i < tensor.length; i++) {
      var c = Math.floor(i / n);
      out[i] = (tensor[i] / 255 - cfg.mean[c]) / cfg.std[c];
    }
    return out;
  }

  function run(tensor) {
    var size = cfg.input_size;
    var feeds = {pixels: new ort.Tensor("uint8", tensor, [1, 3, size, size])};
    // one run at a time: a session does not take concurrent runs
    var result = queue.then(function () { return api.session.run(feeds); });
    queue = result.catch(function () {});
    return result;
  }

  // A File → {status: "screened", label, probability, probabilities, latency_ms, quality, screen}
  // or {status: "not-screened" | "failed", reason}. options.tensor adds the normalised tensor.
  function screen(file, options) {
    var started = performance.now();
    return sniff(file).then(function (kind) {
      var unscreened = {png16: "16-bit PNG", alpha: "transparency", rotated: "EXIF-rotated JPEG", cmyk: "CMYK JPEG"};
      if (unscreened[kind]) return {status: "not-screened", reason: unscreened[kind]};
      if (kind === "other") return {status: "not-screened", reason: /\.zip$/i.test(file.name) ? "zip" : "not PNG or JPEG"};
      return decode(file).then(function (image) {
        var tensor = pixels(image);
        return run(tensor).then(function (outputs) {
          var probs = Array.from(outputs.probabilities.data), logits = Array.from(outputs.logits.data);
          var best = 0;
          for (var i = 1; i < probs.length; i++) if (probs[i] > probs[best]) best = i;
          var probabilities = {};
          cfg.labels.forEach(function (label, index) { probabilities[label] = probs[index]; });
          var latency = Math.round(performance.now() - started);
          var checked = quality(tensor, image, logits);
          var found = {
            status: "screened", label: cfg.labels[best], probability: probs[best], probabilities: probabilities,
            negative: cfg.labels[best] === cfg.negative_label, latency_ms: latency, quality: checked,
            width: image.width, height: image.height,
            screen: {version_id: cfg.version_id, probabilities: probabilities, latency_ms: latency, quality: checked}
          };
          if (options && options.tensor) found.tensor = Array.from(normalised(tensor));
          if (options && options.pixels) found.pixels = Array.from(tensor);
          return found;
        });
      }, function () {
        return {status: "failed", reason: "the browser could not decode it"};
      });
    });
  }

  var FLAG_WORDS = {blank: "looks blank", saturated: "looks saturated (many pixels at black or white)",
                    unfamiliar: "looks unlike the images the screen was trained on"};

  function describeFlags(flags) {
    return flags.map(function (flag) { return FLAG_WORDS[flag] || flag; }).join("; ");
  }

  var api = {config: cfg, supported: supported, load: load, screen: screen, describeFlags: describeFlags,
             session: null, load_ms: null};
  return api;
})();
