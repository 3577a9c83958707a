// The /v1 API through the session cookie. Writes carry the session's CSRF token header;
// the API key itself never reaches this page after the login form sends it.

import { enc } from "./dom.js";

const session = { owner: null, csrfHeader: "X-CSRF-Token", csrfToken: null, strategies: [] };

export class ApiError extends Error {
  constructor(status, problem) {
    super((problem && (problem.detail || problem.title)) || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

export function currentSession() {
  return session;
}

function remember(body) {
  session.owner = body.owner;
  session.csrfHeader = body.csrf_header || session.csrfHeader;
  session.csrfToken = body.csrf_token;
  session.strategies = body.strategies || session.strategies;
}

function forget() {
  session.owner = null;
  session.csrfToken = null;
}

async function parse(response) {
  const type = response.headers.get("content-type") || "";
  if (response.status === 204) return null;
  if (type.includes("json")) return response.json();
  return response.text();
}

/** fetch + problem+json errors: a 401 sends the page back to the login form. */
export async function api(path, { method = "GET", json, headers = {} } = {}) {
  const init = { method, headers: { Accept: "application/json", ...headers }, credentials: "same-origin" };
  if (method !== "GET" && method !== "HEAD") init.headers[session.csrfHeader] = session.csrfToken || "";
  if (json !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(json);
  }
  const response = await fetch(path, init);
  const body = await parse(response);
  if (!response.ok) {
    if (response.status === 401) {
      forget();
      window.dispatchEvent(new CustomEvent("das:logged-out"));
    }
    throw new ApiError(response.status, typeof body === "object" ? body : null);
  }
  return body;
}

/** Every item of a cursor-paged list (bounded, for a dashboard). */
export async function allPages(path, maxPages = 20) {
  const items = [];
  let after = null;
  for (let page = 0; page < maxPages; page += 1) {
    const sep = path.includes("?") ? "&" : "?";
    const body = await api(after === null ? path : `${path}${sep}after=${enc(after)}`);
    items.push(...body.data);
    if (!body.has_more || body.next_after === null) break;
    after = body.next_after;
  }
  return items;
}

export async function restoreSession() {
  try {
    remember(await api("/ui/session"));
    return true;
  } catch (error) {
    if (error instanceof ApiError && error.status === 401) return false;
    throw error;
  }
}

export async function login(apiKey) {
  remember(await api("/ui/login", { method: "POST", json: { api_key: apiKey } }));
}

export async function logout() {
  try {
    await api("/ui/logout", { method: "POST" });
  } finally {
    forget();
  }
}

/**
 * POST a multipart form with upload progress (fetch has none): onProgress(fraction) while
 * the body is sent; resolves with the JSON answer, rejects with an ApiError.
 */
export function uploadForm(path, formData, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", path);
    xhr.setRequestHeader("Accept", "application/json");
    xhr.setRequestHeader(session.csrfHeader, session.csrfToken || "");
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) onProgress(event.loaded / event.total);
    });
    xhr.upload.addEventListener("load", () => onProgress(1));
    xhr.addEventListener("load", () => {
      let body = null;
      try {
        body = JSON.parse(xhr.responseText);
      } catch {
        body = null;
      }
      if (xhr.status >= 200 && xhr.status < 300) resolve(body);
      else reject(new ApiError(xhr.status, body));
    });
    xhr.addEventListener("error", () => reject(new ApiError(0, { detail: "network error during the upload" })));
    xhr.addEventListener("abort", () => reject(new ApiError(0, { detail: "upload aborted" })));
    xhr.send(formData);
  });
}
