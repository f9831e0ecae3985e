// Shared by every page: the token (session storage), calls to the JSON API, readable errors.
"use strict";

const FM = (() => {
  const TOKEN_KEY = "featuremaps-token";
  const tokensRequired = document.body.dataset.tokensRequired === "true";

  const STATUS_HINTS = {
    400: "The request was refused",
    401: "The token was refused",
    404: "Not found (unknown, expired, or another token's)",
    409: "Not possible in this state",
    413: "Too large",
    415: "Not an accepted type",
    422: "The file could not be used",
    429: "Too many requests",
    503: "The service is busy or a dependency is down",
  };

  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || "";
  }

  function setToken(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else sessionStorage.removeItem(TOKEN_KEY);
  }

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  // fetch() against the API with the token; resolves to the Response, or rejects with an
  // ApiError whose message is the server's own, prefixed with what the status means.
  async function api(path, options = {}) {
    const headers = new Headers(options.headers || {});
    if (token()) headers.set("Authorization", `Bearer ${token()}`);
    let response;
    try {
      response = await fetch(path, { ...options, headers });
    } catch (error) {
      throw new ApiError(0, "network", `The API could not be reached (${error.message}).`);
    }
    if (response.ok) return response;
    let code = `http_${response.status}`;
    let message = response.statusText;
    try {
      const body = await response.json();
      code = body.error.code;
      message = body.error.message;
    } catch (_) {
      // not our JSON error body (a proxy's page): keep the status text
    }
    const hint = STATUS_HINTS[response.status] || `HTTP ${response.status}`;
    if (response.status === 429 && response.headers.get("Retry-After")) {
      message += ` (retry after ${response.headers.get("Retry-After")} s)`;
    }
    throw new ApiError(response.status, code, `${hint}: ${message} [${code}]`);
  }

  async function json(path, options) {
    return (await api(path, options)).json();
  }

  function showMessage(text, kind = "error") {
    const box = document.getElementById("message");
    if (!box) return;
    box.hidden = !text;
    box.textContent = text || "";
    box.dataset.kind = kind;
  }

  // The token form on job and batch pages: a shared link opened in a new tab has no token yet.
  function wireTokenForm(onToken) {
    const form = document.getElementById("token-form");
    if (!form) return;
    const input = document.getElementById("token");
    input.value = token();
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      setToken(input.value.trim());
      showMessage("");
      onToken();
    });
  }

  function element(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) {
      if (name === "text") node.textContent = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function number(value) {
    if (value === null || value === undefined) return "–";
    const magnitude = Math.abs(value);
    if (magnitude !== 0 && (magnitude < 1e-3 || magnitude >= 1e5)) return value.toExponential(3);
    return value.toFixed(4);
  }

  function link(href, text) {
    return element("li", {}, element("a", { href, text, target: "_blank", rel: "noopener" }));
  }

  return {
    tokensRequired, token, setToken, api, json, showMessage, wireTokenForm, element, number,
    link, ApiError,
  };
})();
