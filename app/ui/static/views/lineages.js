// #/lineages: your lineages and a form to create one.

import { allPages, api, currentSession, uploadForm } from "../api.js";
import { enc, fmtTime, h, problemText, progressBar, setProgress, statusBadge } from "../dom.js";

function lineageRow(lineage, names) {
  const last = lineage.stages[lineage.stages.length - 1];
  return h(
    "tr",
    {},
    h("td", {}, h("a", { href: `#/lineage/${enc(lineage.id)}` }, lineage.name)),
    h("td", {}, lineage.strategy),
    h("td", { class: "opt" }, lineage.base_model),
    h("td", {}, lineage.stages.map((st) => st.name).join(" → ") || h("span", { class: "muted" }, "no domain yet")),
    h("td", {}, last ? statusBadge(last.status) : "–"),
    h(
      "td",
      { class: "opt" },
      lineage.forked_from_id === null || lineage.forked_from_id === undefined
        ? "–"
        : `fork of ${names.get(String(lineage.forked_from_id)) || lineage.forked_from_id} after stage ${lineage.forked_from_position}`,
    ),
    h("td", { class: "opt" }, fmtTime(lineage.created_at)),
  );
}

function createForm(bases) {
  const error = h("p", { class: "error", role: "alert" });
  const bar = progressBar(0, "general corpus upload progress", "general-progress");
  bar.hidden = true;
  let uploaded = null; // {file, id}: a resubmitted form does not upload the same file again
  const strategies = currentSession().strategies.length ? currentSession().strategies : ["das"];
  const form = h(
    "form",
    { id: "create-lineage", class: "card", "aria-labelledby": "create-title" },
    h("h2", { id: "create-title" }, "New lineage"),
    h(
      "div",
      { class: "row" },
      h("div", {}, h("label", { for: "lineage-name" }, "Name"), h("input", { id: "lineage-name", name: "name", required: true, maxlength: 200 })),
      h(
        "div",
        {},
        h("label", { for: "lineage-base" }, "Base model"),
        h("select", { id: "lineage-base", name: "base_model" }, bases.map((b) => h("option", { value: b.id }, `${b.id} (${b.architecture}, ${b.objective})`))),
      ),
      h(
        "div",
        {},
        h("label", { for: "lineage-strategy" }, "Strategy"),
        h("select", { id: "lineage-strategy", name: "strategy" }, strategies.map((name) => h("option", { value: name }, name))),
      ),
    ),
    h("label", { for: "lineage-hp" }, "Hyper-parameters (JSON)"),
    h("textarea", { id: "lineage-hp", name: "hyperparameters", rows: 4, spellcheck: "false", "aria-describedby": "hp-help" }, "{}"),
    h("p", { id: "hp-help", class: "muted" }, 'e.g. {"max_steps": 20, "batch_size": 8, "block_size": 64}; see /docs for every field.'),
    h("label", { for: "lineage-general" }, "General corpus (optional)"),
    h("input", { id: "lineage-general", name: "general", type: "file", "aria-describedby": "general-help" }),
    h("p", { id: "general-help", class: "muted" }, "General-domain text on which every stage's forgetting of general knowledge is measured."),
    bar,
    h("button", { type: "submit" }, "Create lineage"),
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    let hyperparameters;
    try {
      hyperparameters = JSON.parse(form.hyperparameters.value || "{}");
    } catch {
      error.textContent = "the hyper-parameters are not valid JSON";
      return;
    }
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const body = { name: form.name.value, base_model: form.base_model.value, strategy: form.strategy.value, hyperparameters };
      const file = form.general.files[0];
      if (file && !(uploaded && uploaded.file === file)) {
        const data = new FormData();
        data.append("file", file);
        bar.hidden = false;
        const corpus = await uploadForm("/v1/corpora", data, (fraction) => setProgress(bar, fraction));
        uploaded = { file, id: corpus.id };
      }
      if (file) body.general_corpus_id = uploaded.id;
      const lineage = await api("/v1/lineages", { method: "POST", json: body });
      window.location.hash = `#/lineage/${enc(lineage.id)}`;
    } catch (failure) {
      const details = failure.problem && failure.problem.errors ? failure.problem.errors.map((e) => `${e.field || e.line}: ${e.message}`).join("; ") : "";
      error.textContent = details ? `${problemText(failure)} (${details})` : problemText(failure);
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

export async function renderLineages(view) {
  const [lineages, bases] = await Promise.all([allPages("/v1/lineages"), api("/v1/base-models").then((p) => p.data)]);
  const names = new Map(lineages.map((l) => [String(l.id), l.name]));
  const table = lineages.length
    ? h(
        "div",
        { class: "table-wrap" },
        h(
          "table",
          { "data-testid": "lineages" },
          h("caption", { class: "muted" }, `${lineages.length} lineage(s), oldest first`),
          h(
            "thead",
            {},
            h(
              "tr",
              {},
              h("th", { scope: "col" }, "Name"),
              h("th", { scope: "col" }, "Strategy"),
              h("th", { scope: "col", class: "opt" }, "Base model"),
              h("th", { scope: "col" }, "Domains"),
              h("th", { scope: "col" }, "Latest stage"),
              h("th", { scope: "col", class: "opt" }, "Fork"),
              h("th", { scope: "col", class: "opt" }, "Created"),
            ),
          ),
          h("tbody", {}, lineages.map((l) => lineageRow(l, names))),
        ),
      )
    : h("p", { class: "muted" }, "No lineage yet: create one below, then add domains to it.");
  view.replaceChildren(h("h1", {}, "Lineages"), table, createForm(bases));
}
