// The job page: live status, then the input beside the figure, one tile per layer (open it,
// read values under the cursor), top-5 labels, downloads, and the model and weights that made it.
"use strict";

(() => {
  const jobId = document.getElementById("page").dataset.jobId;
  const statusLine = document.getElementById("status");
  const FINISHED = ["succeeded", "failed", "canceled"];
  const POLL_MS = 700;
  const layerCache = new Map();
  let timer = null;

  function describeWeights(weights) {
    if (!weights) return "weights: unknown";
    if (weights.name === "imagenet") return `weights: ImageNet ${weights.id || ""}`;
    if (weights.name === "random") return `weights: random, seed ${weights.seed} (untrained)`;
    if (weights.name === "state_dict") return `weights: state_dict ${weights.path || ""}`;
    if (weights.name === "upload") {
      return `weights: uploaded ${weights.label} (sha256 ${weights.sha256.slice(0, 12)})`;
    }
    return `weights: ${JSON.stringify(weights)}`;
  }

  async function poll() {
    let doc;
    try {
      doc = await FM.json(`/jobs/${encodeURIComponent(jobId)}`);
    } catch (error) {
      statusLine.textContent = "Status unknown";
      FM.showMessage(error.message);
      return;
    }
    FM.showMessage("");
    const where = doc.worker ? ` on ${doc.worker}` : "";
    statusLine.textContent = `Status: ${doc.status}${where}`;
    statusLine.dataset.status = doc.status;
    if (!FINISHED.includes(doc.status)) {
      timer = setTimeout(poll, POLL_MS);
      return;
    }
    if (doc.status === "succeeded") show(doc);
    else if (doc.error) FM.showMessage(`${doc.error.message} [${doc.error.code}]`);
  }

  function show(doc) {
    const result = doc.result;
    document.getElementById("result").hidden = false;
    const input = document.getElementById("input");
    input.closest("figure").hidden = !result.input_url;
    if (result.input_url) input.src = result.input_url;
    // A PDF cannot be an <img>: its thumbnail stands in, linked to the PDF.
    const shown = doc.options.format === "pdf" ? result.thumbnail_url : result.figure_url;
    document.getElementById("figure").src = shown;
    document.getElementById("figure-link").href = result.figure_url;
    // The precision that ran (exact or fast), never the option as sent: "auto" resolves on
    // the worker's device. A reused result names the record it was copied from.
    // A model that did not compute in float32 says so (fast on a CPU with native bfloat16).
    const dtype = result.precision && result.precision.dtype && result.precision.dtype !== "float32"
      ? ` (${result.precision.dtype})` : "";
    const precision = result.precision ? ` · precision=${result.precision.mode}${dtype}` : "";
    const reused = result.reused ? ` · reused from ${result.reused_from}` : "";
    // Records made before the model option existed ran ResNet-18.
    const model = doc.options.model || "resnet18";
    document.getElementById("weights").textContent =
      `model=${model} · ${describeWeights(result.weights)} · mode=${doc.options.mode} · ` +
      `reduction=${doc.options.reduction}${precision}${reused}`;

    const downloads = document.getElementById("downloads");
    downloads.replaceChildren(
      FM.link(result.figure_url, `figure (${doc.options.format})`),
      FM.link(result.manifest_url, "manifest.json"),
    );
    if (result.arrays_url) downloads.append(FM.link(result.arrays_url, "maps.npz"));

    const predictions = result.predictions || [];
    if (predictions.length) {
      document.getElementById("predictions-section").hidden = false;
      document.getElementById("predictions").replaceChildren(
        ...predictions.map((p) =>
          FM.element("li", { text: `${p.label} — ${(p.probability * 100).toFixed(1)} %` })),
      );
    }
    showLayers(result);
  }

  function showLayers(result) {
    const urls = result.layer_urls || [];
    const tiles = result.layers.map((layer, index) => {
      const [c, h, w] = layer.shape;
      const stats = `min ${FM.number(layer.min)} · mean ${FM.number(layer.mean)} · max ${FM.number(layer.max)}`;
      const button = FM.element("button", { type: "button", class: "tile", "data-layer": layer.name });
      if (urls[index]) {
        button.append(FM.element("img", {
          src: urls[index], alt: `Map of layer ${layer.name}`, width: "112", height: "112",
        }));
      }
      button.append(
        FM.element("span", { class: "name", text: layer.name }),
        FM.element("span", { class: "shape", text: `${c}×${h}×${w}` }),
        FM.element("span", { class: "stats", text: stats }),
      );
      button.addEventListener("click", () => openLayer(layer, urls[index], stats));
      return FM.element("li", {}, button);
    });
    document.getElementById("layers").replaceChildren(...tiles);
  }

  // -- the layer viewer -----------------------------------------------------------------

  const viewer = document.getElementById("viewer");
  const viewerImage = document.getElementById("viewer-image");
  const probe = document.getElementById("probe");
  let current = null; // {layer, map: {shape, data} | null, row, col}

  document.getElementById("viewer-close").addEventListener("click", () => viewer.close());

  async function openLayer(layer, url, stats) {
    const [c, h, w] = layer.shape;
    document.getElementById("viewer-title").textContent = `${layer.name} (${c}×${h}×${w})`;
    document.getElementById("viewer-stats").textContent = stats;
    current = { layer, map: null, row: 0, col: 0 };
    if (url) {
      viewerImage.hidden = false;
      viewerImage.src = url;
      viewerImage.alt = `Layer ${layer.name} at full resolution`;
    } else {
      viewerImage.hidden = true;
      viewerImage.removeAttribute("src");
    }
    probe.textContent = "Loading the layer's values…";
    viewer.showModal();
    try {
      current.map = await layerMap(layer.name);
      probe.textContent = url
        ? "Move the pointer over the map, or focus it and use the arrow keys."
        : "This job has no per-layer images (per_layer was off).";
    } catch (error) {
      probe.textContent = error.message;
    }
  }

  async function layerMap(name) {
    if (!layerCache.has(name)) {
      const path = `/jobs/${encodeURIComponent(jobId)}/layers/${encodeURIComponent(name)}`;
      layerCache.set(name, FM.json(path).catch((error) => {
        layerCache.delete(name);
        throw error;
      }));
    }
    return layerCache.get(name);
  }

  function report() {
    const { map, row, col } = current;
    const value = map.data[row][col];
    probe.textContent = `row ${row}, column ${col}: ${FM.number(value)}`;
    probe.dataset.value = String(value);
  }

  viewerImage.addEventListener("pointermove", (event) => {
    if (!current || !current.map) return;
    const [h, w] = current.map.shape;
    const box = viewerImage.getBoundingClientRect();
    current.col = Math.min(w - 1, Math.max(0, Math.floor(((event.clientX - box.left) / box.width) * w)));
    current.row = Math.min(h - 1, Math.max(0, Math.floor(((event.clientY - box.top) / box.height) * h)));
    report();
  });

  viewerImage.addEventListener("keydown", (event) => {
    if (!current || !current.map) return;
    const [h, w] = current.map.shape;
    const moves = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
    const move = moves[event.key];
    if (!move) return;
    event.preventDefault();
    current.row = Math.min(h - 1, Math.max(0, current.row + move[0]));
    current.col = Math.min(w - 1, Math.max(0, current.col + move[1]));
    report();
  });

  FM.wireTokenForm(() => {
    clearTimeout(timer);
    poll();
  });
  poll();
})();
