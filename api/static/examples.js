// The dataset examples page: choose a layer, see each of its channels' best items (tiles cut
// out of the layer's sheets with background-position; a sheet is one request, loaded when
// its channels come near the viewport), open a channel to see them large with their names.
"use strict";

(() => {
  const batchId = document.getElementById("page").dataset.batchId;
  const base = `/batches/${encodeURIComponent(batchId)}`;
  const RETRY_MS = 2000;
  const LARGE = 192;
  const summaryLine = document.getElementById("summary");
  const select = document.getElementById("layer");
  const grid = document.getElementById("channels");
  const viewer = document.getElementById("viewer");
  const sheets = new Map(); // sheet URL -> Promise of its decoded image, for the large view
  let summary = null; // GET /batches/<id>/examples
  let layer = null; // the chosen layer's full entry
  let observer = null;
  let generation = 0; // a layer that arrives after another was chosen is dropped
  let timer = null;

  async function load() {
    clearTimeout(timer);
    try {
      summary = await FM.json(`${base}/examples`);
    } catch (error) {
      summary = null;
      if (error.status === 409) {
        FM.showMessage("");
        summaryLine.textContent =
          "The batch is still running: its examples are drawn once it has ended. " +
          "This page checks again every few seconds.";
        timer = setTimeout(load, RETRY_MS);
      } else {
        summaryLine.textContent =
          error.status === 404 ? "No dataset examples for this batch." : "Examples unavailable.";
        FM.showMessage(error.message);
      }
      return;
    }
    FM.showMessage("");
    const missing = summary.missing.length
      ? ` · ${summary.missing.length} slice(s) failed to draw: their tiles are grey`
      : "";
    summaryLine.textContent =
      `${summary.items} items scored · the ${summary.k} best per channel by ` +
      `${summary.score} activation · mode ${summary.mode}${missing}`;
    select.replaceChildren(
      ...summary.layers.map((entry) =>
        FM.element("option", {
          value: String(entry.index),
          text: `${entry.index} · ${entry.name} (${entry.channels} channels)`,
        }),
      ),
    );
    const wanted = summary.layers.find((entry) => `#${entry.index}` === window.location.hash);
    select.value = String((wanted || summary.layers[0]).index);
    document.getElementById("chooser").hidden = false;
    document.getElementById("grid-hint").hidden = false;
    showLayer();
  }

  async function showLayer() {
    const entry = summary.layers.find((candidate) => String(candidate.index) === select.value);
    const mine = ++generation;
    if (observer) observer.disconnect();
    grid.replaceChildren();
    const [c, h, w] = entry.shape;
    document.getElementById("layer-info").textContent = `${c} channels of ${h}×${w}`;
    let doc;
    try {
      doc = await FM.json(entry.url);
    } catch (error) {
      FM.showMessage(error.message);
      return;
    }
    if (mine !== generation) return;
    layer = doc;
    buildGrid();
  }

  // One cell per channel, built once per layer in a fragment; the sheets' URLs are set only
  // when a cell comes near the viewport (512 channels × 9 tiles stay a few requests).
  function buildGrid() {
    const tile = summary.tile;
    // A row up to 4, then a square: 9 as 3 × 3, 64 as 8 × 8.
    const columns = summary.k <= 4 ? Math.max(1, summary.k) : Math.ceil(Math.sqrt(summary.k));
    grid.style.setProperty("--tile", `${tile}px`);
    grid.style.setProperty("--columns", String(columns));
    grid.style.setProperty("--cell", `${columns * (tile + 2) + 12}px`);
    observer = new IntersectionObserver(reveal, { rootMargin: "800px 0px" });
    const fragment = document.createDocumentFragment();
    layer.top.forEach((entries, channel) => {
      const row = channel % summary.sheet_channels;
      const strip = FM.element("span", { class: "strip" });
      entries.forEach((entry, rank) => {
        const example = FM.element("span", {
          class: "example",
          role: "img",
          "aria-label": `${entry.name}, score ${FM.number(entry.score)}`,
        });
        example.style.backgroundPosition = `${-tile * rank}px ${-tile * row}px`;
        strip.append(example);
      });
      const best = entries.length ? FM.number(entries[0].score) : "–";
      const button = FM.element(
        "button",
        { type: "button", class: "channel", "data-channel": String(channel) },
        strip,
        FM.element("span", { class: "caption" }, FM.element("b", { text: `#${channel}` }),
          ` best ${best}`),
      );
      const cell = FM.element("li", { "data-channel": String(channel) }, button);
      fragment.append(cell);
      observer.observe(cell);
    });
    grid.replaceChildren(fragment);
  }

  function sheetOf(channel) {
    return layer.sheets[Math.floor(channel / summary.sheet_channels)];
  }

  function reveal(records) {
    for (const record of records) {
      if (!record.isIntersecting) continue;
      observer.unobserve(record.target);
      const url = sheetOf(Number(record.target.dataset.channel));
      for (const example of record.target.querySelectorAll(".example")) {
        example.style.backgroundImage = `url("${url}")`;
      }
      record.target.dataset.shown = "true";
    }
  }

  grid.addEventListener("click", (event) => {
    const button = event.target.closest("button.channel");
    if (button) openChannel(Number(button.dataset.channel));
  });

  // -- one channel, large ---------------------------------------------------------------

  function sheet(url) {
    if (!sheets.has(url)) {
      const image = new Image();
      image.src = url;
      sheets.set(url, image.decode().then(() => image));
    }
    return sheets.get(url);
  }

  function openChannel(channel) {
    const tile = summary.tile;
    const row = channel % summary.sheet_channels;
    const url = sheetOf(channel);
    document.getElementById("viewer-title").textContent = `${layer.name} · channel ${channel}`;
    document.getElementById("viewer-stats").textContent =
      `score over all ${summary.items} items: mean ${FM.number(layer.channel_mean[channel])}, ` +
      `max ${FM.number(layer.channel_max[channel])}`;
    const scale = window.devicePixelRatio || 1;
    const cards = layer.top[channel].map((entry, rank) => {
      const canvas = FM.element("canvas", {
        width: String(Math.round(LARGE * scale)),
        height: String(Math.round(LARGE * scale)),
        role: "img",
        "aria-label": `${entry.name}: where channel ${channel} fires`,
      });
      sheet(url).then(
        (image) => draw(canvas, image, tile * rank, tile * row, tile),
        () => { canvas.dataset.drawn = "failed"; },
      );
      const name = FM.element("a", { class: "name", text: entry.name, target: "_blank",
        rel: "noopener" });
      linkFigure(name, entry.item_id);
      return FM.element("li", { "data-item-id": entry.item_id }, canvas, name,
        FM.element("div", { class: "score", text: `#${rank + 1} · score ${FM.number(entry.score)}` }));
    });
    document.getElementById("viewer-examples").replaceChildren(...cards);
    if (!viewer.open) viewer.showModal();
  }

  // The tile is copied out at its own size first: scaling straight from the sheet would
  // blend the neighbouring tiles into its edges.
  function draw(canvas, image, x, y, tile) {
    const cut = document.createElement("canvas");
    cut.width = tile;
    cut.height = tile;
    cut.getContext("2d").drawImage(image, x, y, tile, tile, 0, 0, tile, tile);
    const context = canvas.getContext("2d");
    context.imageSmoothingEnabled = true;
    context.imageSmoothingQuality = "high";
    context.drawImage(cut, 0, 0, canvas.width, canvas.height);
    canvas.dataset.drawn = "true";
  }

  // Items have no page of their own: an item's name links to its figure, found through the
  // items page at its member position (the number its id ends with).
  async function linkFigure(anchor, itemId) {
    const position = Number.parseInt(itemId.slice(itemId.lastIndexOf("-") + 1), 10);
    if (!Number.isFinite(position)) return;
    try {
      const page = await FM.json(`${base}/items?cursor=${position}&limit=1`);
      const item = page.items.find((candidate) => candidate.id === itemId);
      if (item && item.figure_url) anchor.href = item.figure_url;
    } catch (_) {
      // the name stays plain text: the figure may have expired with its record
    }
  }

  document.getElementById("viewer-close").addEventListener("click", () => viewer.close());
  select.addEventListener("change", () => {
    history.replaceState(null, "", `#${select.value}`);
    showLayer();
  });
  FM.wireTokenForm(load);
  load();
})();
