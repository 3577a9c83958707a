// #/lineage/<id>/forgetting[?vs=<id>]: the loss matrix as a heatmap (rows: after stage,
// columns: domain), each domain's loss over the stages, FR/BWT/FWT, the general corpus,
// and a sibling lineage (a fork, another strategy) side by side.

import { allPages, api } from "../api.js";
import { heatmap, legend, lineChart } from "../charts.js";
import { enc, fmtNumber, h } from "../dom.js";

function kpis(m) {
  const general = m.general || {};
  const losses = (general.losses || []).filter((v) => v !== null);
  const last = losses.length ? losses[losses.length - 1] : null;
  const items = [
    ["Forgetting rate", m.forgetting_rate, "mean over domains of (final loss − loss after its own stage), relative"],
    ["BWT", m.bwt, "backward transfer: negative means forgetting"],
    ["FWT", m.fwt, "forward transfer against the base model"],
    ["Max forgetting", m.max_forgetting, "the largest forgetting of one domain"],
  ];
  if (general.base_loss !== undefined || losses.length) {
    items.push(["General loss (base → last)", null, "the general corpus's loss: what the model keeps of general knowledge"]);
  }
  return h(
    "dl",
    { class: "kpi", "data-testid": "forgetting-summary" },
    items.map(([label, value, help]) =>
      h(
        "div",
        { title: help },
        h("dt", {}, label),
        h("dd", {}, label.startsWith("General") ? `${fmtNumber(general.base_loss)} → ${fmtNumber(last)}` : fmtNumber(value, 4)),
      ),
    ),
  );
}

function domainCurves(m) {
  const base = m.base_losses || [];
  const series = m.domains.map((domain, j) => ({
    name: domain,
    points: [
      ...(typeof base[j] === "number" ? [[0, base[j]]] : []),
      ...m.loss_matrix.map((row, i) => [i + 1, row[j]]).filter((p) => typeof p[1] === "number"),
    ],
  }));
  const general = m.general || {};
  if (general.losses && general.losses.some((v) => v !== null)) {
    series.push({
      name: "general corpus",
      color: "#444",
      points: [
        ...(typeof general.base_loss === "number" ? [[0, general.base_loss]] : []),
        ...general.losses.map((v, i) => [i + 1, v]).filter((p) => typeof p[1] === "number"),
      ],
    });
  }
  const names = ["base", ...m.domains];
  return [
    lineChart(series, {
      title: "Held-out loss of each domain after each stage",
      xLabel: "after stage",
      yLabel: "loss",
      testid: "domain-curves",
      xTicks: (t) => (Number.isInteger(t) && names[t] !== undefined ? names[t] : null),
    }),
    legend(series, h),
  ];
}

function perDomainTable(m) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      {},
      h("thead", {}, h("tr", {}, ["Domain", "Base", "After own stage", "Final", "Forgetting"].map((t) => h("th", { scope: "col" }, t)))),
      h(
        "tbody",
        {},
        m.per_domain.map((d) =>
          h("tr", {}, h("td", {}, d.domain), h("td", {}, fmtNumber(d.base_loss)), h("td", {}, fmtNumber(d.loss_after_own_stage)), h("td", {}, fmtNumber(d.final_loss)), h("td", {}, fmtNumber(d.forgetting))),
        ),
      ),
    ),
  );
}

/** The heatmap's figures as a table, for screen readers and copying. */
function matrixTable(m, rows) {
  return h(
    "details",
    {},
    h("summary", {}, "The loss matrix as a table"),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        {},
        h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "after stage"), m.domains.map((d) => h("th", { scope: "col" }, d)))),
        h(
          "tbody",
          {},
          m.loss_matrix.map((row, i) => h("tr", {}, h("th", { scope: "row" }, rows[i]), row.map((v) => h("td", {}, fmtNumber(v))))),
        ),
      ),
    ),
  );
}

function panel(lineage, m, testid) {
  const rows = m.domains.map((domain, i) => `after ${i + 1}. ${domain}`);
  const body = m.domains.length
    ? [
        kpis(m),
        h("h3", {}, "Loss matrix"),
        h("p", { class: "muted" }, "Row: the model after that stage; column: held-out loss on that domain (darker: higher)."),
        h("div", { class: "chart-box" }, heatmap(m.loss_matrix, rows, m.domains, { title: `Loss matrix of ${lineage.name}`, rowTitle: "after stage", colTitle: "evaluated on", testid: `${testid}-heatmap` })),
        matrixTable(m, rows),
        h("h3", {}, "Each domain over the stages"),
        ...domainCurves(m),
        h("h3", {}, "Per domain"),
        perDomainTable(m),
      ]
    : [h("p", { class: "muted" }, "No stage has succeeded yet: the matrix fills in as stages finish.")];
  return h(
    "section",
    { class: "card", "aria-label": `forgetting of ${lineage.name}`, "data-testid": testid },
    h("h2", {}, h("a", { href: `#/lineage/${enc(lineage.id)}` }, lineage.name), " ", h("span", { class: "muted" }, `(${lineage.strategy})`)),
    ...body,
  );
}

function related(lineage, other) {
  return String(other.forked_from_id) === String(lineage.id) || String(lineage.forked_from_id) === String(other.id);
}

export async function renderForgetting(view, lineageId, query) {
  const vs = new URLSearchParams(query || "").get("vs");
  const [lineage, metrics, lineages] = await Promise.all([
    api(`/v1/lineages/${enc(lineageId)}`),
    api(`/v1/lineages/${enc(lineageId)}/metrics`),
    allPages("/v1/lineages"),
  ]);
  const others = lineages
    .filter((l) => String(l.id) !== String(lineage.id))
    .sort((a, b) => Number(related(lineage, b)) - Number(related(lineage, a)));
  const select = h(
    "select",
    { id: "sibling", name: "sibling" },
    h("option", { value: "" }, "— none —"),
    others.map((l) =>
      h("option", { value: l.id, selected: vs !== null && String(l.id) === vs }, `${l.name} (${l.strategy}${related(lineage, l) ? ", fork" : ""})`),
    ),
  );
  select.addEventListener("change", () => {
    const base = `#/lineage/${enc(lineage.id)}/forgetting`;
    window.location.hash = select.value ? `${base}?vs=${enc(select.value)}` : base;
  });
  const panels = [panel(lineage, metrics, "main")];
  if (vs) {
    const [sibling, siblingMetrics] = await Promise.all([api(`/v1/lineages/${enc(vs)}`), api(`/v1/lineages/${enc(vs)}/metrics`)]);
    panels.push(panel(sibling, siblingMetrics, "sibling"));
  }
  view.replaceChildren(
    h(
      "nav",
      { class: "crumbs", "aria-label": "breadcrumb" },
      h("a", { href: "#/lineages" }, "Lineages"),
      h("a", { href: `#/lineage/${enc(lineage.id)}` }, lineage.name),
      h("a", { href: `#/lineage/${enc(lineage.id)}/forgetting`, "aria-current": "page" }, "forgetting"),
    ),
    h("h1", {}, `Forgetting: ${lineage.name}`),
    h("div", { class: "card row" }, h("div", {}, h("label", { for: "sibling" }, "Compare side by side with"), select)),
    h("div", { class: panels.length > 1 ? "grid2" : "" }, panels),
  );
}
