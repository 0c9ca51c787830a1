// The patch map (templates/map.html): every mined patch of a run at the 2D position the mining
// job gave it, on a <canvas>. Zoomed out a patch is a dot of its label's colour; zoomed in, its
// thumbnail from a sprite atlas (1,024 thumbnails per PNG, in the points' Z-order, so a zoomed-in
// view loads only the atlases of its neighbourhood). Only the points in view are visited, through
// a grid of buckets; a frame is drawn only when something changed. Scroll or +/- zooms, dragging
// or the arrow keys pan, a click opens the patch, the label menu (or the legend) filters.
(function () {
  "use strict";

  var DOT_BELOW = 16;     // on-screen thumbnail size (px) under which patches are drawn as dots
  var GRID = 64;          // buckets per axis of the spatial index
  var MAX_THUMB_PX = 320; // zooming stops when a thumbnail would be larger
  var CLICK_SLOP = 5;     // px a press may move and still be a click

  function PatchMap(canvas) {
    this.canvas = canvas;
    this.context = canvas.getContext("2d", { alpha: false });
    this.perAtlas = Number(canvas.dataset.perAtlas);
    this.columns = Number(canvas.dataset.columns);
    this.thumb = Number(canvas.dataset.thumb);
    this.atlasBase = canvas.dataset.atlasBase;
    this.atlases = {};
    this.filter = null;   // label id shown, or null for all
    this.stats = { draws: 0, firstDrawMs: null, lastDrawMs: 0, drawMs: [], shownLog: [], mode: null, shown: 0 };
    canvas.patchMap = this;  // for the page's tests and benchmark (tests/test_patch_map_browser.py)
    this.readLegend();
    this.resize();
    this.bindEvents();
    var self = this;
    fetch(canvas.dataset.points).then(function (response) {
      if (!response.ok) throw new Error("points: HTTP " + response.status);
      return response.arrayBuffer();
    }).then(function (buffer) { self.load(buffer); })
      .catch(function (error) { self.status("Could not load the map: " + error.message); });
  }

  PatchMap.prototype.readLegend = function () {
    var legend = document.querySelectorAll(".map-legend [data-label]");
    this.colours = [];
    this.labelIndex = {};
    for (var i = 0; i < legend.length; i++) {
      this.labelIndex[legend[i].dataset.label] = i;
      this.colours.push(pixelWord(legend[i].dataset.colour));
    }
  };

  // A CSS colour as the 32-bit word of an RGBA pixel in an ImageData buffer (little-endian).
  var swatch = document.createElement("canvas").getContext("2d", { willReadFrequently: true });
  function pixelWord(colour) {
    swatch.fillStyle = colour;
    swatch.fillRect(0, 0, 1, 1);
    var d = swatch.getImageData(0, 0, 1, 1).data;
    return ((255 << 24) | (d[2] << 16) | (d[1] << 8) | d[0]) >>> 0;
  }
  var WHITE = 0xffffffff, FAINT = pixelWord("#d5d9de");

  // Records of 16 bytes: patch id (uint32), x, y (float32), label id (uint32), little-endian.
  PatchMap.prototype.load = function (buffer) {
    var n = buffer.byteLength / 16, words = new Uint32Array(buffer), floats = new Float32Array(buffer);
    this.count = n;
    this.ids = new Uint32Array(n);
    this.xs = new Float32Array(n);
    this.ys = new Float32Array(n);
    this.labels = new Uint16Array(n);  // index into the legend's colours
    for (var i = 0; i < n; i++) {
      this.ids[i] = words[4 * i];
      this.xs[i] = floats[4 * i + 1];
      this.ys[i] = floats[4 * i + 2];
      this.labels[i] = this.labelIndex[words[4 * i + 3]] || 0;
    }
    this.buildGrid();
    // A patch's size in map units: about the spacing of evenly spread points.
    this.size = Math.min(0.05, 0.6 / Math.sqrt(Math.max(n, 1)));
    this.visible = new Int32Array(n);
    this.byLabel = new Int32Array(n);
    this.labelCounts = new Int32Array(this.colours.length + 1);
    this.reset();
  };

  PatchMap.prototype.buildGrid = function () {
    var n = this.count, cells = new Int32Array(n), start = new Int32Array(GRID * GRID + 1);
    for (var i = 0; i < n; i++) {
      var gx = Math.min(GRID - 1, Math.max(0, Math.floor(this.xs[i] * GRID)));
      var gy = Math.min(GRID - 1, Math.max(0, Math.floor(this.ys[i] * GRID)));
      cells[i] = gy * GRID + gx;
      start[cells[i] + 1]++;
    }
    for (var c = 0; c < GRID * GRID; c++) start[c + 1] += start[c];
    var fill = start.slice(0, GRID * GRID), items = new Int32Array(n);
    for (i = 0; i < n; i++) items[fill[cells[i]]++] = i;
    this.gridStart = start;
    this.gridItems = items;
  };

  PatchMap.prototype.resize = function () {
    var ratio = window.devicePixelRatio || 1, rect = this.canvas.getBoundingClientRect();
    this.width = Math.max(1, rect.width);
    this.height = Math.max(1, rect.height);
    this.canvas.width = Math.round(this.width * ratio);
    this.canvas.height = Math.round(this.height * ratio);
    this.ratio = ratio;
    this.pixels = this.context.createImageData(this.canvas.width, this.canvas.height);
    this.words = new Uint32Array(this.pixels.data.buffer);
    this.redraw();
  };

  PatchMap.prototype.reset = function () {
    this.cx = 0.5;
    this.cy = 0.5;
    this.scale = Math.min(this.width, this.height) * 0.92;
    this.minScale = this.scale * 0.25;
    this.redraw();
  };

  PatchMap.prototype.redraw = function () {
    if (this.pending) return;
    this.pending = true;
    var self = this;
    requestAnimationFrame(function () { self.pending = false; self.draw(); });
  };

  PatchMap.prototype.toScreen = function (x, y) {
    return [(x - this.cx) * this.scale + this.width / 2, (y - this.cy) * this.scale + this.height / 2];
  };

  PatchMap.prototype.toWorld = function (sx, sy) {
    return [(sx - this.width / 2) / this.scale + this.cx, (sy - this.height / 2) / this.scale + this.cy];
  };

  // Indices of the points whose square meets the rectangle [x0, x1] x [y0, y1] (map units), into
  // this.visible; returns how many.
  PatchMap.prototype.collect = function (x0, y0, x1, y1) {
    var half = this.size / 2, count = 0;
    var gx0 = Math.max(0, Math.floor((x0 - half) * GRID)), gx1 = Math.min(GRID - 1, Math.floor((x1 + half) * GRID));
    var gy0 = Math.max(0, Math.floor((y0 - half) * GRID)), gy1 = Math.min(GRID - 1, Math.floor((y1 + half) * GRID));
    for (var gy = gy0; gy <= gy1; gy++) {
      for (var gx = gx0; gx <= gx1; gx++) {
        var cell = gy * GRID + gx;
        for (var k = this.gridStart[cell]; k < this.gridStart[cell + 1]; k++) {
          var i = this.gridItems[k], x = this.xs[i], y = this.ys[i];
          if (x + half >= x0 && x - half <= x1 && y + half >= y0 && y - half <= y1) this.visible[count++] = i;
        }
      }
    }
    return count;
  };

  // The visible points grouped by label (a counting sort), so each colour is set once a frame.
  PatchMap.prototype.groupByLabel = function (count) {
    var counts = this.labelCounts, labels = this.labels, visible = this.visible, out = this.byLabel;
    counts.fill(0);
    for (var k = 0; k < count; k++) counts[labels[visible[k]] + 1]++;
    for (var l = 1; l < counts.length; l++) counts[l] += counts[l - 1];
    var starts = counts.slice();
    for (k = 0; k < count; k++) out[starts[labels[visible[k]]]++] = visible[k];
    return counts;  // label l's points are out[counts[l] .. counts[l + 1])
  };

  // Dots (and the label-coloured frames behind thumbnails) are written straight into one pixel
  // buffer and put on the canvas at once: 30,000 fillRect calls cost a frame's budget and more on
  // a CPU-rendered canvas. Thumbnails are then drawn over them.
  PatchMap.prototype.draw = function () {
    var began = performance.now();
    this.words.fill(WHITE);
    if (!this.count) {
      this.context.putImageData(this.pixels, 0, 0);
      this.finish(began, "empty", 0);
      return;
    }
    var topLeft = this.toWorld(0, 0), bottomRight = this.toWorld(this.width, this.height);
    var count = this.collect(topLeft[0], topLeft[1], bottomRight[0], bottomRight[1]);
    var starts = this.groupByLabel(count), px = this.size * this.scale;
    var mode = px < DOT_BELOW ? "dots" : "thumbnails", shown = 0;
    var filter = this.filter === null ? -1 : this.labelIndex[this.filter];
    for (var l = 0; l < this.colours.length; l++) {
      if (filter >= 0 && l !== filter) {  // the other labels stay as faint dots, for context
        this.drawDots(starts[l], starts[l + 1], Math.min(px, 3), FAINT);
        continue;
      }
      shown += starts[l + 1] - starts[l];
      this.drawDots(starts[l], starts[l + 1], mode === "dots" ? Math.max(2.5, px * 0.7) : px + 4, this.colours[l]);
    }
    this.context.putImageData(this.pixels, 0, 0);
    if (mode === "thumbnails") this.drawThumbnails(starts, filter, px);
    this.finish(began, mode, shown);
  };

  // Squares of `side` CSS px centred on the points byLabel[from .. to), in one colour word.
  PatchMap.prototype.drawDots = function (from, to, side, word) {
    var r = this.ratio, s = this.scale * r, ox = (this.width / 2 - this.cx * this.scale) * r,
        oy = (this.height / 2 - this.cy * this.scale) * r, w = this.canvas.width, h = this.canvas.height;
    var d = Math.max(1, Math.round(side * r)), half = d / 2, words = this.words;
    for (var k = from; k < to; k++) {
      var i = this.byLabel[k];
      var x0 = Math.round(this.xs[i] * s + ox - half), y0 = Math.round(this.ys[i] * s + oy - half);
      var x1 = Math.min(w, x0 + d), y1 = Math.min(h, y0 + d);
      if (x0 < 0) x0 = 0;
      if (y0 < 0) y0 = 0;
      for (var y = y0; y < y1; y++) words.fill(word, y * w + x0, y * w + x1);
    }
  };

  PatchMap.prototype.drawThumbnails = function (starts, filter, px) {
    var c = this.context;
    c.setTransform(this.ratio, 0, 0, this.ratio, 0, 0);
    var s = this.scale, ox = this.width / 2 - this.cx * s, oy = this.height / 2 - this.cy * s;
    var thumb = this.thumb, columns = this.columns, half = px / 2;
    c.imageSmoothingEnabled = px < thumb;  // pixel-art crops enlarge by whole pixels
    var from = filter >= 0 ? starts[filter] : 0, to = filter >= 0 ? starts[filter + 1] : starts[starts.length - 1];
    for (var k = from; k < to; k++) {
      var i = this.byLabel[k], atlas = this.atlas(Math.floor(i / this.perAtlas));
      if (!atlas) continue;  // its label-coloured square stands in until the atlas arrives
      var cell = i % this.perAtlas;
      c.drawImage(atlas, (cell % columns) * thumb, Math.floor(cell / columns) * thumb, thumb, thumb,
                  this.xs[i] * s + ox - half, this.ys[i] * s + oy - half, px, px);
    }
  };

  PatchMap.prototype.atlas = function (number) {
    var entry = this.atlases[number];
    if (entry) return entry.ready ? entry.image : null;
    // Decoded once into an ImageBitmap: drawn from an <img>, a CPU-rendered canvas may decode the
    // PNG again when many atlases are in use (200 ms a frame with 30 of them).
    var image = new Image(), self = this;
    entry = this.atlases[number] = { image: null, ready: false };
    image.onload = function () {
      createImageBitmap(image).then(function (bitmap) {
        entry.image = bitmap;
        entry.ready = true;
        self.redraw();
      });
    };
    image.src = this.atlasBase + "/atlas-" + String(number).padStart(3, "0") + ".png";
    return null;
  };

  PatchMap.prototype.finish = function (began, mode, shown) {
    var now = performance.now(), stats = this.stats;
    stats.draws++;
    stats.lastDrawMs = now - began;
    stats.drawMs.push(stats.lastDrawMs);
    if (stats.drawMs.length > 1000) stats.drawMs.shift();
    if (stats.firstDrawMs === null && this.count !== undefined) stats.firstDrawMs = now;
    stats.mode = mode;
    stats.shown = shown;
    stats.shownLog.push(shown);
    if (stats.shownLog.length > 1000) stats.shownLog.shift();
    this.canvas.dataset.mode = mode;
    this.canvas.dataset.shown = shown;
  };

  PatchMap.prototype.zoom = function (factor, sx, sy) {
    var before = this.toWorld(sx, sy);
    var most = MAX_THUMB_PX / this.size;
    this.scale = Math.min(most, Math.max(this.minScale, this.scale * factor));
    var after = this.toWorld(sx, sy);
    this.cx += before[0] - after[0];
    this.cy += before[1] - after[1];
    this.redraw();
  };

  PatchMap.prototype.pan = function (dx, dy) {
    this.cx -= dx / this.scale;
    this.cy -= dy / this.scale;
    this.redraw();
  };

  // The shown patch under a point of the canvas (CSS px), or -1.
  PatchMap.prototype.hit = function (sx, sy) {
    if (!this.count) return -1;
    var world = this.toWorld(sx, sy), px = this.size * this.scale;
    var reach = Math.max(px, 6) / 2 / this.scale;  // dots are small: give the pointer a few px
    var count = this.collect(world[0] - reach, world[1] - reach, world[0] + reach, world[1] + reach);
    var filter = this.filter === null ? -1 : this.labelIndex[this.filter], best = -1, bestDistance = Infinity;
    for (var k = 0; k < count; k++) {
      var i = this.visible[k];
      if (filter >= 0 && this.labels[i] !== filter) continue;
      var dx = this.xs[i] - world[0], dy = this.ys[i] - world[1];
      if (Math.abs(dx) > reach || Math.abs(dy) > reach) continue;
      var distance = dx * dx + dy * dy;
      if (distance < bestDistance) { best = i; bestDistance = distance; }
    }
    return best;
  };

  // Where a patch is drawn (CSS px in the canvas), or null: for tests and the benchmark.
  PatchMap.prototype.screenOf = function (patchId) {
    for (var i = 0; i < this.count; i++) {
      if (this.ids[i] === patchId) return this.toScreen(this.xs[i], this.ys[i]);
    }
    return null;
  };

  PatchMap.prototype.setFilter = function (labelId) {
    this.filter = labelId === "" || labelId === null ? null : labelId;
    document.querySelectorAll(".map-legend [data-label]").forEach(function (item) {
      item.classList.toggle("current", item.dataset.label === labelId);
    });
    this.redraw();
  };

  PatchMap.prototype.status = function (text) {
    var status = document.querySelector(".map-status");
    if (status) status.textContent = text;
  };

  PatchMap.prototype.bindEvents = function () {
    var self = this, canvas = this.canvas, press = null;
    canvas.addEventListener("wheel", function (event) {
      event.preventDefault();
      var rect = canvas.getBoundingClientRect();
      var delta = event.deltaMode === 1 ? event.deltaY * 16 : event.deltaY;
      self.zoom(Math.exp(-delta * 0.0015), event.clientX - rect.left, event.clientY - rect.top);
    }, { passive: false });
    canvas.addEventListener("pointerdown", function (event) {
      canvas.setPointerCapture(event.pointerId);
      press = { x: event.clientX, y: event.clientY, lastX: event.clientX, lastY: event.clientY, moved: false };
    });
    canvas.addEventListener("pointermove", function (event) {
      var rect = canvas.getBoundingClientRect();
      if (!press) {
        var under = self.hit(event.clientX - rect.left, event.clientY - rect.top);
        canvas.classList.toggle("over-patch", under >= 0);
        if (under >= 0) self.status("patch " + self.ids[under]);
        return;
      }
      if (Math.abs(event.clientX - press.x) + Math.abs(event.clientY - press.y) > CLICK_SLOP) press.moved = true;
      if (press.moved) self.pan(event.clientX - press.lastX, event.clientY - press.lastY);
      press.lastX = event.clientX;
      press.lastY = event.clientY;
    });
    canvas.addEventListener("pointerup", function (event) {
      var wasClick = press && !press.moved;
      press = null;
      if (!wasClick) return;
      var rect = canvas.getBoundingClientRect();
      var under = self.hit(event.clientX - rect.left, event.clientY - rect.top);
      if (under >= 0) location.href = "/patches/" + self.ids[under];
    });
    canvas.addEventListener("pointercancel", function () { press = null; });
    canvas.addEventListener("keydown", function (event) {
      var step = 60, keys = {
        "+": function () { self.zoom(1.25, self.width / 2, self.height / 2); },
        "=": function () { self.zoom(1.25, self.width / 2, self.height / 2); },
        "-": function () { self.zoom(0.8, self.width / 2, self.height / 2); },
        "ArrowLeft": function () { self.pan(step, 0); }, "ArrowRight": function () { self.pan(-step, 0); },
        "ArrowUp": function () { self.pan(0, step); }, "ArrowDown": function () { self.pan(0, -step); },
        "0": function () { self.reset(); }
      };
      if (keys[event.key]) { event.preventDefault(); keys[event.key](); }
    });
    var select = document.querySelector(".map-label");
    if (select) select.addEventListener("change", function () { self.setFilter(select.value); });
    document.querySelectorAll(".map-legend [data-label]").forEach(function (item) {
      item.addEventListener("click", function () {
        var value = self.filter === item.dataset.label ? "" : item.dataset.label;
        if (select) select.value = value;
        self.setFilter(value);
      });
    });
    var reset = document.querySelector(".map-reset");
    if (reset) reset.addEventListener("click", function () { self.reset(); });
    if (window.ResizeObserver) new ResizeObserver(function () { self.resize(); }).observe(canvas);
  };

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("canvas.patch-map[data-points]").forEach(function (canvas) { new PatchMap(canvas); });
  });
})();
