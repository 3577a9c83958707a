// The dashboard's entry point: the login form, and a router on the URL fragment
// (#/lineages, #/lineage/<id>, #/lineage/<id>/forgetting, #/lineage/<id>/importance,
// #/job/<id>). Ids are opaque strings, taken from the fragment as they were written.

import { currentSession, login, logout, restoreSession } from "./api.js";
import { h, problemText } from "./dom.js";
import { renderForgetting } from "./views/forgetting.js";
import { renderImportance } from "./views/importance.js";
import { renderJob } from "./views/job.js";
import { renderLineage } from "./views/lineage.js";
import { renderLineages } from "./views/lineages.js";

const ROUTES = [
  [/^#\/lineage\/([^/?]+)\/forgetting(?:\?(.*))?$/, renderForgetting],
  [/^#\/lineage\/([^/?]+)\/importance$/, renderImportance],
  [/^#\/lineage\/([^/?]+)$/, renderLineage],
  [/^#\/job\/([^/?]+)$/, renderJob],
  [/^#?\/?(?:lineages)?$/, renderLineages],
];

let cleanup = null;

function showLogin(show) {
  document.getElementById("login").hidden = !show;
  document.getElementById("who").hidden = show;
  if (show) {
    document.getElementById("view").replaceChildren();
    document.getElementById("api-key").focus();
  } else {
    document.getElementById("owner").textContent = currentSession().owner || "";
  }
}

async function route() {
  if (cleanup) {
    cleanup();
    cleanup = null;
  }
  if (!currentSession().owner) return;
  const view = document.getElementById("view");
  const hash = window.location.hash || "#/lineages";
  for (const [pattern, render] of ROUTES) {
    const match = hash.match(pattern);
    if (!match) continue;
    const params = match.slice(1).map((part) => (part === undefined ? undefined : decodeURIComponent(part)));
    view.replaceChildren(h("p", { class: "muted" }, "Loading…"));
    try {
      cleanup = (await render(view, ...params)) || null;
    } catch (error) {
      view.replaceChildren(h("h1", {}, "Something went wrong"), h("p", { class: "error", role: "alert" }, problemText(error)));
    }
    const heading = view.querySelector("h1");
    if (heading) document.title = `${heading.textContent} · DAS dashboard`;
    return;
  }
  view.replaceChildren(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/lineages" }, "Back to the lineages")));
}

async function start() {
  document.getElementById("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("api-key");
    const error = document.getElementById("login-error");
    error.textContent = "";
    try {
      await login(input.value.trim());
      input.value = "";
      showLogin(false);
      await route();
    } catch (failure) {
      error.textContent = problemText(failure);
      input.select();
    }
  });
  document.getElementById("logout").addEventListener("click", async () => {
    await logout().catch(() => {});
    if (cleanup) cleanup();
    cleanup = null;
    showLogin(true);
  });
  // the skip link moves the focus without touching the fragment (the router's address)
  document.querySelector(".skip").addEventListener("click", (event) => {
    event.preventDefault();
    document.getElementById("main").focus();
  });
  window.addEventListener("das:logged-out", () => showLogin(true));
  window.addEventListener("hashchange", () => {
    route();
    document.getElementById("main").focus({ preventScroll: true });
  });
  if (await restoreSession()) {
    showLogin(false);
    await route();
  } else {
    showLogin(true);
  }
}

start();
