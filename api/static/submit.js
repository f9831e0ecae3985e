// The submit page: one image → its job page; several → one job each, listed here;
// an archive → its batch page. The server judges every file; these checks only help.
"use strict";

(() => {
  const form = document.getElementById("submit-form");
  const input = document.getElementById("files");
  const drop = document.getElementById("drop");
  const chosen = document.getElementById("chosen");
  const button = document.getElementById("submit");
  const tokenInput = document.getElementById("token");
  const ARCHIVE = /\.(zip|tar|tgz|tar\.gz)$/i;
  // The conv chain is defined for the ResNet family only (docs/design.md "Models").
  const CHAIN_MODELS = /^resnet(18|34|50)$/;
  const modelSelect = document.getElementById("opt-model");
  const modeSelect = document.getElementById("opt-mode");
  let files = [];

  if (tokenInput) tokenInput.value = FM.token();

  modelSelect.addEventListener("change", () => {
    // An upload's option names its architecture in its label.
    const option = modelSelect.selectedOptions[0];
    const architecture = option && option.parentElement.tagName === "OPTGROUP"
      ? option.textContent.replace(/^.* \(([a-z0-9_]+), uploaded\)$/, "$1")
      : modelSelect.value;
    if (!CHAIN_MODELS.test(architecture) && modeSelect.value === "chain") {
      modeSelect.value = "forward";
    }
  });

  function choose(list) {
    files = Array.from(list);
    chosen.textContent = files.length
      ? `${files.length} file(s): ${files.map((f) => f.name).join(", ")}`
      : "";
  }

  input.addEventListener("change", () => choose(input.files));
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    choose(event.dataTransfer.files);
  });

  function optionFields(data) {
    // Every choice the page draws is sent (the list comes from the server's options).
    for (const select of document.querySelectorAll(".options select")) {
      data.append(select.name, select.value);
    }
    for (const name of ["per_layer", "arrays"]) {
      data.append(name, document.getElementById(`opt-${name}`).checked ? "true" : "false");
    }
    return data;
  }

  async function submitImage(file) {
    const data = optionFields(new FormData());
    data.append("image", file, file.name);
    return FM.json("/jobs", { method: "POST", body: data });
  }

  async function submitArchive(file) {
    const data = optionFields(new FormData());
    data.append("archive", file, file.name);
    return FM.json("/batches", { method: "POST", body: data });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    FM.showMessage("");
    if (tokenInput) FM.setToken(tokenInput.value.trim());
    if (!files.length) {
      FM.showMessage("Choose or drop at least one image or an archive first.");
      input.focus();
      return;
    }
    if (FM.tokensRequired && !FM.token()) {
      FM.showMessage("This API needs a token: enter it above.");
      tokenInput.focus();
      return;
    }
    const archives = files.filter((f) => ARCHIVE.test(f.name));
    if (archives.length && files.length > 1) {
      FM.showMessage("Send an archive on its own (or the images without it).");
      return;
    }
    button.disabled = true;
    try {
      if (archives.length) {
        const accepted = await submitArchive(archives[0]);
        window.location.assign(`/ui/batches/${accepted.id}`);
        return;
      }
      if (files.length === 1) {
        const accepted = await submitImage(files[0]);
        window.location.assign(`/ui/jobs/${accepted.id}`);
        return;
      }
      await submitEach(files);
    } catch (error) {
      FM.showMessage(error.message);
    } finally {
      button.disabled = false;
    }
  });

  // -- your own weights: the token's uploads join the model list ------------------------

  const weightsForm = document.getElementById("weights-form");
  const uploads = document.getElementById("uploads");
  let uploadGroup = null;

  function offerUpload(model) {
    const label = `${model.name || model.id} (${model.architecture}, uploaded)`;
    if (!uploadGroup) {
      uploadGroup = FM.element("optgroup", { label: "your uploads" });
      modelSelect.append(uploadGroup);
    }
    if (!modelSelect.querySelector(`option[value="${model.id}"]`)) {
      uploadGroup.append(FM.element("option", { value: model.id, text: label }));
      uploads.append(FM.element("li", { "data-id": model.id, text: label }));
    }
  }

  async function loadUploads() {
    if (FM.tokensRequired && !FM.token()) return;
    try {
      const listed = await FM.json("/models");
      listed.uploads.forEach(offerUpload);
    } catch (error) {
      FM.showMessage(`Your uploaded weights could not be listed: ${error.message}`);
    }
  }

  weightsForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    FM.showMessage("");
    if (tokenInput) FM.setToken(tokenInput.value.trim());
    const file = document.getElementById("weights-file").files[0];
    if (!file) {
      FM.showMessage("Choose a weights file first.");
      return;
    }
    const data = new FormData();
    data.append("architecture", document.getElementById("weights-architecture").value);
    data.append("name", document.getElementById("weights-name").value.trim());
    data.append("weights", file, file.name);
    const upload = document.getElementById("weights-upload");
    upload.disabled = true;
    try {
      const model = await FM.json("/models", { method: "POST", body: data });
      offerUpload(model);
      modelSelect.value = model.id;
      modelSelect.dispatchEvent(new Event("change"));
      FM.showMessage(`Uploaded ${model.name || model.id}: chosen as the model above.`, "info");
    } catch (error) {
      FM.showMessage(error.message);
    } finally {
      upload.disabled = false;
    }
  });

  if (tokenInput) tokenInput.addEventListener("change", () => {
    FM.setToken(tokenInput.value.trim());
    loadUploads();
  });
  loadUploads();

  async function submitEach(list) {
    const section = document.getElementById("submitted-section");
    const listing = document.getElementById("submitted");
    section.hidden = false;
    const failures = [];
    for (const file of list) {
      try {
        const accepted = await submitImage(file);
        listing.append(
          FM.element("li", {}, FM.element("a", { href: `/ui/jobs/${accepted.id}`, text: file.name }))
        );
      } catch (error) {
        failures.push(`${file.name}: ${error.message}`);
        listing.append(FM.element("li", { class: "failed", text: `${file.name}: ${error.message}` }));
      }
    }
    if (failures.length) FM.showMessage(`${failures.length} of ${list.length} refused.`);
  }
})();
