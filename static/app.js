// diffmine's small page behaviours: upload progress, label filter, heatmap opacity/threshold.
// The Content-Security-Policy allows no inline script or style attribute (docs/security.md):
// pages give computed geometry as data-style, and behaviours as data- attributes handled here.
(function () {
  "use strict";

  // Upload progress: htmx reports the XHR upload's progress events.
  document.addEventListener("htmx:xhr:progress", function (event) {
    var form = event.target.closest && event.target.closest("#upload-form");
    if (!form || !event.detail.lengthComputable) return;
    var bar = form.querySelector("#upload-progress");
    bar.hidden = false;
    bar.value = Math.round(100 * event.detail.loaded / event.detail.total);
  });

  // A file over the server's limit is refused here, before minutes of uploading.
  document.addEventListener("htmx:beforeRequest", function (event) {
    var form = event.target.closest && event.target.closest("#upload-form");
    if (!form) return;
    var input = form.querySelector("input[type=file]");
    var file = input && input.files && input.files[0];
    var note = form.querySelector("#upload-too-large");
    note.hidden = true;
    if (file && file.size > Number(form.dataset.maxBytes)) {
      event.preventDefault();
      note.textContent = file.name + " is larger than the upload limit of " + form.dataset.maxText +
        ": put it on the server and give its folder path instead.";
      note.hidden = false;
    }
  });

  // Label list: filter as you type; mark the label being shown.
  document.addEventListener("input", function (event) {
    if (!event.target.classList.contains("label-filter")) return;
    var needle = event.target.value.toLowerCase();
    event.target.closest(".label-nav").querySelectorAll("li").forEach(function (li) {
      li.hidden = needle && li.textContent.toLowerCase().indexOf(needle) < 0;
    });
  });
  document.addEventListener("click", function (event) {
    var link = event.target.closest && event.target.closest(".label-nav a, .similar-block .scope a");
    if (!link) return;
    link.closest("ul, .scope").querySelectorAll("a.current").forEach(function (a) { a.classList.remove("current"); });
    link.classList.add("current");
  });
  document.addEventListener("change", function (event) {
    if (event.target.matches("select[data-autosubmit]")) {
      event.target.form.submit();
      return;
    }
    if (event.target.matches("select[data-go]")) {
      location.href = event.target.dataset.go + encodeURIComponent(event.target.value);
      return;
    }
    if (event.target.classList.contains("show-boxes")) {
      var viewer = event.target.closest(".viewer-wrap").querySelector(".viewer");
      viewer.classList.toggle("hide-boxes", !event.target.checked);
    }
  });

  // Heatmaps: the PNG's alpha is the typicality (0-255); pixels under the threshold are
  // hidden, the rest drawn fully, and the opacity slider fades the whole layer.
  function drawHeatmap(canvas) {
    var wrap = canvas.closest(".viewer-wrap");
    var threshold = wrap.querySelector(".heat-threshold");
    var opacity = wrap.querySelector(".heat-opacity");
    var source = canvas._source;
    if (!source) return;
    canvas.width = source.naturalWidth;
    canvas.height = source.naturalHeight;
    var context = canvas.getContext("2d", { willReadFrequently: true });
    context.drawImage(source, 0, 0);
    var cut = threshold ? Math.round(2.55 * threshold.value) : 0;
    var pixels = context.getImageData(0, 0, canvas.width, canvas.height);
    var d = pixels.data;
    for (var i = 3; i < d.length; i += 4) {
      d[i] = d[i] < cut || d[i] === 0 ? 0 : Math.max(d[i], 96);
    }
    context.putImageData(pixels, 0, 0);
    canvas.style.opacity = opacity ? opacity.value / 100 : 0.7;
  }

  document.addEventListener("click", function (event) {
    var back = event.target.closest && event.target.closest("a.go-back");
    if (back && history.length > 1) {
      event.preventDefault();
      history.back();
    }
  });

  // Computed geometry (bars, boxes, aspect ratios): set through the CSSOM, which the policy
  // allows, where a style attribute would be refused.
  function applyStyles(root) {
    var elements = Array.prototype.slice.call(root.querySelectorAll("[data-style]"));
    if (root.matches && root.matches("[data-style]")) elements.push(root);
    elements.forEach(function (element) {
      if (element._styled) return;  // once: scripts may style it further (heatmap opacity)
      element._styled = true;
      element.style.cssText = element.dataset.style;
    });
  }

  function setUp(root) {
    applyStyles(root);
    root.querySelectorAll("canvas.heatmap[data-src]").forEach(function (canvas) {
      if (canvas._source) return;
      var image = new Image();
      image.onload = function () { canvas._source = image; drawHeatmap(canvas); };
      image.src = canvas.dataset.src;
      var wrap = canvas.closest(".viewer-wrap");
      wrap.querySelectorAll(".heat-threshold, .heat-opacity").forEach(function (slider) {
        slider.addEventListener("input", function () { drawHeatmap(canvas); });
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () { setUp(document); });
  document.addEventListener("htmx:load", function (event) { setUp(event.target); });
})();
