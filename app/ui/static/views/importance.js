// #/lineage/<id>/importance: per layer and unit kind, how much is protected (the share of
// units whose accumulated importance exceeds 0.5, and the mean), and how it grew stage by
// stage (GET /v1/lineages/<id>/importance).

import { api } from "../api.js";
import { heatmap, legend, lineChart } from "../charts.js";
import { enc, h } from "../dom.js";

const SNAPSHOTS = ["accumulated", "domain", "general"];

function mean(values) {
  return values.length ? values.reduce((a, b) => a + b, 0) / values.length : null;
}

function layerMatrix(snapshot, field) {
  const kinds = Object.keys(snapshot);
  const layers = Math.max(...kinds.map((k) => snapshot[k].layers));
  const matrix = Array.from({ length: layers }, (_, layer) => kinds.map((k) => (snapshot[k][field][layer] ?? null)));
  return { kinds, rows: Array.from({ length: layers }, (_, layer) => `layer ${layer}`), matrix };
}

function growth(stages) {
  const kinds = [...new Set(stages.flatMap((st) => Object.keys(st.snapshots.accumulated || {})))];
  const series = kinds.map((kind) => ({
    name: kind,
    points: stages
      .map((st, i) => [i + 1, st.snapshots.accumulated && st.snapshots.accumulated[kind] ? mean(st.snapshots.accumulated[kind].share_above_half) : null])
      .filter((p) => p[1] !== null),
  }));
  const names = ["", ...stages.map((st) => `${st.position}. ${st.name}`)];
  return [
    lineChart(series, {
      title: "Share of units above 0.5 in the accumulated importance, after each stage",
      xLabel: "after stage",
      yLabel: "share > 0.5",
      testid: "importance-growth",
      xTicks: (t) => (Number.isInteger(t) && names[t] ? names[t] : null),
    }),
    legend(series, h),
  ];
}

export async function renderImportance(view, lineageId) {
  const [lineage, summary] = await Promise.all([api(`/v1/lineages/${enc(lineageId)}`), api(`/v1/lineages/${enc(lineageId)}/importance`)]);
  const crumbs = h(
    "nav",
    { class: "crumbs", "aria-label": "breadcrumb" },
    h("a", { href: "#/lineages" }, "Lineages"),
    h("a", { href: `#/lineage/${enc(lineage.id)}` }, lineage.name),
    h("a", { href: `#/lineage/${enc(lineage.id)}/importance`, "aria-current": "page" }, "importance"),
  );
  const title = h("h1", {}, `Importance: ${lineage.name}`);
  if (!summary.stages.length) {
    view.replaceChildren(
      crumbs,
      title,
      h("p", { class: "card" }, `No importance snapshot yet: they are stored when a stage succeeds, by strategies that measure unit importance (this lineage: ${lineage.strategy}).`),
    );
    return;
  }
  const stageSelect = h(
    "select",
    { id: "imp-stage" },
    summary.stages.map((st, i) => h("option", { value: i, selected: i === summary.stages.length - 1 }, `${st.position}. ${st.name}`)),
  );
  const kindSelect = h("select", { id: "imp-snapshot" }, SNAPSHOTS.map((k) => h("option", { value: k }, k)));
  const maps = h("div", { class: "grid2" });

  function draw() {
    const stage = summary.stages[Number(stageSelect.value)];
    const snapshot = stage.snapshots[kindSelect.value];
    if (!snapshot || !Object.keys(snapshot).length) {
      maps.replaceChildren(h("p", { class: "muted" }, `stage ${stage.position} stored no ${kindSelect.value} snapshot`));
      return;
    }
    const share = layerMatrix(snapshot, "share_above_half");
    const avg = layerMatrix(snapshot, "mean");
    const units = share.kinds.map((k) => `${k}: ${snapshot[k].units} units × ${snapshot[k].layers} layers`).join("; ");
    maps.replaceChildren(
      h(
        "section",
        { class: "card", "aria-labelledby": "share-title" },
        h("h2", { id: "share-title" }, "Share of units above 0.5"),
        h("p", { class: "muted" }, `What the soft mask mostly protects. ${units}.`),
        h("div", { class: "chart-box" }, heatmap(share.matrix, share.rows, share.kinds, { title: "share of units above 0.5, per layer and unit kind", min: 0, max: 1, digits: 2, testid: "importance-share", cellWidth: 96 })),
      ),
      h(
        "section",
        { class: "card", "aria-labelledby": "mean-title" },
        h("h2", { id: "mean-title" }, "Mean importance"),
        h("p", { class: "muted" }, "Per layer and unit kind, in [0, 1)."),
        h("div", { class: "chart-box" }, heatmap(avg.matrix, avg.rows, avg.kinds, { title: "mean importance, per layer and unit kind", min: 0, max: 1, digits: 2, testid: "importance-mean", cellWidth: 96 })),
      ),
    );
  }
  stageSelect.addEventListener("change", draw);
  kindSelect.addEventListener("change", draw);
  view.replaceChildren(
    crumbs,
    title,
    h(
      "div",
      { class: "card row" },
      h("div", {}, h("label", { for: "imp-stage" }, "After stage"), stageSelect),
      h("div", {}, h("label", { for: "imp-snapshot" }, "Snapshot"), kindSelect),
    ),
    maps,
    h("section", { class: "card", "aria-labelledby": "growth-title" }, h("h2", { id: "growth-title" }, "How protection grew"), ...growth(summary.stages)),
  );
  draw();
}
