// The batch page: a live progress bar (counts, rate, ETA), a paged gallery of thumbnails,
// failed and skipped members with their reason, result links (and its dataset examples),
// and cancel.
"use strict";

(() => {
  const batchId = document.getElementById("page").dataset.batchId;
  const base = `/batches/${encodeURIComponent(batchId)}`;
  const FINISHED = ["succeeded", "failed", "canceled"];
  const POLL_MS = 700;
  const PAGE_SIZE = 24;
  const progress = document.getElementById("progress");
  const cancel = document.getElementById("cancel");
  let cursors = ["0"]; // cursor of each page seen so far
  let page = 0;
  let nextCursor = null;
  let timer = null;
  let done = false;

  function seconds(value) {
    if (value === null || value === undefined) return "–";
    if (value < 90) return `${Math.round(value)} s`;
    return `${Math.floor(value / 60)} min ${Math.round(value % 60)} s`;
  }

  // One shard: manifest.jsonl and results.zip as ever; more: both files of each shard, with
  // the members (1-based positions) it holds.
  function downloadLinks(shards) {
    if (shards.length === 1) {
      return [
        FM.link(shards[0].manifest_url, "manifest.jsonl"),
        FM.link(shards[0].archive_url, "results.zip (every figure)"),
      ];
    }
    return shards.flatMap((shard) => {
      const number = String(shard.index).padStart(5, "0");
      const members = `members ${shard.first + 1}–${shard.first + shard.items}`;
      return [
        FM.link(shard.manifest_url, `manifest-${number}.jsonl (${members})`),
        FM.link(shard.archive_url, `results-${number}.zip (figures of ${members})`),
      ];
    });
  }

  // The dataset examples (docs/design.md), when the batch was run with them.
  function examplesLinks(doc) {
    if (!doc.result.examples_url) return [];
    return [
      FM.element("li", {}, FM.element("a", {
        href: doc.links.examples_page, id: "examples-link", text: "Dataset examples (per channel)",
      })),
      FM.link(doc.result.examples_url, "examples.json"),
    ];
  }

  async function poll() {
    let doc;
    try {
      doc = await FM.json(base);
    } catch (error) {
      document.getElementById("status").textContent = "Status unknown";
      FM.showMessage(error.message);
      return;
    }
    FM.showMessage(doc.error ? `${doc.error.message} [${doc.error.code}]` : "");
    const counts = doc.counts;
    const skipped = counts.skipped || 0;
    const ended = counts.succeeded + counts.failed + counts.canceled + skipped;
    const percent = Math.round(doc.progress * 100);
    progress.value = percent;
    progress.textContent = `${percent} %`;
    document.getElementById("percent").textContent = `${percent} %`;
    document.getElementById("status").textContent = `Status: ${doc.status}`;
    document.getElementById("status").dataset.status = doc.status;
    const rate = doc.rate ? `${doc.rate.toFixed(1)} images/s` : "–";
    document.getElementById("counts").textContent =
      `${ended} of ${counts.total} done · ${counts.succeeded} succeeded · ${counts.failed} failed · ` +
      `${counts.canceled} canceled · ${skipped} skipped · ${counts.running} running · ` +
      `rate ${rate} · ETA ${seconds(doc.eta_s)}`;
    done = FINISHED.includes(doc.status) && Boolean(doc.result);
    cancel.disabled = FINISHED.includes(doc.status);
    if (doc.result) {
      document.getElementById("downloads").replaceChildren(
        ...downloadLinks(doc.result.shards), ...examplesLinks(doc));
    }
    await loadPage();
    if (!done) timer = setTimeout(poll, POLL_MS);
  }

  async function loadPage() {
    let body;
    try {
      body = await FM.json(`${base}/items?cursor=${cursors[page]}&limit=${PAGE_SIZE}`);
    } catch (error) {
      FM.showMessage(error.message);
      return;
    }
    const gallery = [];
    const failed = [];
    const skippedItems = [];
    for (const item of body.items) {
      if (item.status === "succeeded") {
        const image = item.thumbnail_url
          ? FM.element("img", { src: item.thumbnail_url, alt: `Feature maps of ${item.name}` })
          : null;
        gallery.push(FM.element("li", { class: "item" },
          FM.element("a", { href: item.figure_url, target: "_blank", rel: "noopener" }, image,
            FM.element("span", { text: item.name }))));
      } else if (item.status === "failed") {
        const reason = item.error ? `${item.error.code}: ${item.error.message}` : "failed";
        failed.push(FM.element("li", {}, FM.element("code", { text: item.name }), ` — ${reason}`));
      } else if (item.status === "skipped") {
        const reason = item.skip_reason ? item.skip_reason.message : "skipped";
        skippedItems.push(FM.element("li", {}, FM.element("code", { text: item.name }), ` — ${reason}`));
      }
    }
    document.getElementById("gallery").replaceChildren(...gallery);
    document.getElementById("failed").replaceChildren(...failed);
    document.getElementById("failed-section").hidden = failed.length === 0;
    document.getElementById("skipped").replaceChildren(...skippedItems);
    document.getElementById("skipped-section").hidden = skippedItems.length === 0;
    nextCursor = body.next_cursor;
    document.getElementById("prev").disabled = page === 0;
    document.getElementById("next").disabled = !nextCursor;
    document.getElementById("page-label").textContent = `Page ${page + 1}`;
  }

  document.getElementById("next").addEventListener("click", () => {
    if (!nextCursor) return;
    cursors = cursors.slice(0, page + 1).concat([nextCursor]);
    page += 1;
    loadPage();
  });
  document.getElementById("prev").addEventListener("click", () => {
    if (page === 0) return;
    page -= 1;
    loadPage();
  });

  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      await FM.api(base, { method: "DELETE" });
    } catch (error) {
      FM.showMessage(error.message);
    }
    clearTimeout(timer);
    poll();
  });

  FM.wireTokenForm(() => {
    clearTimeout(timer);
    poll();
  });
  poll();
})();
