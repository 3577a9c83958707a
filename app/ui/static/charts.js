// Charts as inline SVG (no library): a heatmap and a line chart, both labelled for screen
// readers (role="img", <title>) and each cell / point with its value as a tooltip.

import { fmtNumber, s } from "./dom.js";

const PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"];

export function seriesColor(index) {
  return PALETTE[index % PALETTE.length];
}

// light (low) -> dark blue (high)
const LOW = [237, 248, 251];
const HIGH = [8, 48, 107];

function shade(t) {
  const c = LOW.map((lo, i) => Math.round(lo + (HIGH[i] - lo) * t));
  return { fill: `rgb(${c.join(",")})`, ink: t > 0.55 ? "#fff" : "#111" };
}

function finite(values) {
  return values.filter((v) => typeof v === "number" && Number.isFinite(v));
}

function truncate(label, max) {
  const text = String(label);
  return text.length > max ? `${text.slice(0, max - 1)}…` : text;
}

/**
 * A heatmap of matrix[row][col]; null cells are drawn hatched-grey ("not measured").
 * options: {title, rowTitle, colTitle, min, max, digits, testid, cellWidth}
 */
export function heatmap(matrix, rowLabels, colLabels, options = {}) {
  const values = finite(matrix.flat());
  const min = options.min ?? (values.length ? Math.min(...values) : 0);
  const max = options.max ?? (values.length ? Math.max(...values) : 1);
  const span = max - min || 1;
  const cw = options.cellWidth || 84;
  const ch = 38;
  const left = 120;
  const top = 46;
  const width = left + cw * colLabels.length + 10;
  const height = top + ch * rowLabels.length + 44;
  const svg = s("svg", {
    viewBox: `0 0 ${width} ${height}`,
    width: Math.round(width * 1.35), // drawn a little larger; max-width: 100% on a phone
    class: "chart heatmap",
    role: "img",
    "aria-label": options.title || "heatmap",
    "data-testid": options.testid,
    "data-rows": rowLabels.length,
    "data-cols": colLabels.length,
  });
  svg.append(s("title", {}, options.title || "heatmap"));
  colLabels.forEach((label, j) => {
    svg.append(
      s("text", { x: left + cw * j + cw / 2, y: top - 8, "text-anchor": "middle", class: "axis-label" }, truncate(label, 10)),
    );
  });
  if (options.colTitle) {
    svg.append(s("text", { x: left + (cw * colLabels.length) / 2, y: 14, "text-anchor": "middle", class: "axis-title" }, options.colTitle));
  }
  rowLabels.forEach((label, i) => {
    svg.append(
      s("text", { x: left - 8, y: top + ch * i + ch / 2 + 4, "text-anchor": "end", class: "axis-label" }, truncate(label, 16)),
    );
    colLabels.forEach((col, j) => {
      const v = matrix[i] ? matrix[i][j] : null;
      const ok = typeof v === "number" && Number.isFinite(v);
      const { fill, ink } = ok ? shade((v - min) / span) : { fill: "#e5e5e5", ink: "#555" };
      const text = ok ? fmtNumber(v, options.digits ?? 3) : "–";
      const cell = s(
        "rect",
        {
          x: left + cw * j + 1,
          y: top + ch * i + 1,
          width: cw - 2,
          height: ch - 2,
          fill,
          class: ok ? "cell" : "cell empty",
          "data-row": i,
          "data-col": j,
        },
        s("title", {}, `${label} × ${col}: ${ok ? text : "not measured"}`),
      );
      svg.append(cell);
      svg.append(
        s("text", { x: left + cw * j + cw / 2, y: top + ch * i + ch / 2 + 4, "text-anchor": "middle", fill: ink, class: "cell-value" }, text),
      );
    });
  });
  if (options.rowTitle) {
    svg.append(s("text", { x: 4, y: top - 8, class: "axis-title" }, options.rowTitle));
  }
  // legend: the colour scale
  const ly = top + ch * rowLabels.length + 14;
  const steps = 5;
  for (let k = 0; k < steps; k += 1) {
    svg.append(s("rect", { x: left + k * 24, y: ly, width: 24, height: 12, fill: shade(k / (steps - 1)).fill }));
  }
  svg.append(s("text", { x: left - 8, y: ly + 10, "text-anchor": "end", class: "axis-label" }, fmtNumber(min, 2)));
  svg.append(s("text", { x: left + steps * 24 + 6, y: ly + 10, class: "axis-label" }, fmtNumber(max, 2)));
  return svg;
}

function ticks(lo, hi, count = 4) {
  if (lo === hi) return [lo];
  return Array.from({ length: count + 1 }, (_, k) => lo + ((hi - lo) * k) / count);
}

/**
 * Lines of {name, points: [[x, y], ...]} on shared axes.
 * options: {title, xLabel, yLabel, testid, height}
 */
export function lineChart(series, options = {}) {
  const width = 560;
  const height = options.height || 260;
  const pad = { left: 58, right: 40, top: 24, bottom: 44 };
  const xs = finite(series.flatMap((line) => line.points.map((p) => p[0])));
  const ys = finite(series.flatMap((line) => line.points.map((p) => p[1])));
  const svg = s("svg", {
    viewBox: `0 0 ${width} ${height}`,
    width,
    class: "chart line-chart",
    role: "img",
    "aria-label": options.title || "chart",
    "data-testid": options.testid,
  });
  svg.append(s("title", {}, options.title || "chart"));
  if (!xs.length || !ys.length) {
    svg.append(s("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "axis-label" }, "no data yet"));
    return svg;
  }
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  if (y0 === y1) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const px = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const py = (y) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  svg.append(s("line", { x1: pad.left, y1: height - pad.bottom, x2: width - pad.right, y2: height - pad.bottom, class: "axis" }));
  svg.append(s("line", { x1: pad.left, y1: pad.top, x2: pad.left, y2: height - pad.bottom, class: "axis" }));
  for (const t of ticks(y0, y1)) {
    svg.append(s("line", { x1: pad.left, y1: py(t), x2: width - pad.right, y2: py(t), class: "grid" }));
    svg.append(s("text", { x: pad.left - 6, y: py(t) + 4, "text-anchor": "end", class: "axis-label" }, fmtNumber(t, 2)));
  }
  // whole numbers on the x axis (steps, stages) get whole-number ticks
  const wholeX = xs.every(Number.isInteger);
  const xTicks = wholeX ? [...new Set(ticks(x0, x1).map(Math.round))] : ticks(x0, x1);
  for (const t of xTicks) {
    const label = options.xTicks ? options.xTicks(t) : fmtNumber(Math.round(t * 100) / 100, 2);
    if (label === null) continue;
    svg.append(s("text", { x: px(t), y: height - pad.bottom + 16, "text-anchor": "middle", class: "axis-label" }, label));
  }
  if (options.xLabel) svg.append(s("text", { x: (pad.left + width - pad.right) / 2, y: height - 6, "text-anchor": "middle", class: "axis-title" }, options.xLabel));
  if (options.yLabel) svg.append(s("text", { x: 4, y: 14, class: "axis-title" }, options.yLabel));
  series.forEach((line, index) => {
    const color = line.color || seriesColor(index);
    const pts = line.points.filter((p) => Number.isFinite(p[0]) && Number.isFinite(p[1]));
    if (pts.length > 1) {
      svg.append(s("polyline", { points: pts.map((p) => `${px(p[0])},${py(p[1])}`).join(" "), fill: "none", stroke: color, "stroke-width": 2, class: "series" }));
    }
    for (const p of pts) {
      svg.append(s("circle", { cx: px(p[0]), cy: py(p[1]), r: 3, fill: color, class: "point" }, s("title", {}, `${line.name}: ${fmtNumber(p[1])} at ${fmtNumber(p[0])}`)));
    }
  });
  return svg;
}

/** A legend for lineChart's series, as an HTML list. */
export function legend(series, h) {
  return h(
    "ul",
    { class: "legend" },
    series.map((line, index) => {
      const swatch = h("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.background = line.color || seriesColor(index);
      return h("li", {}, swatch, line.name);
    }),
  );
}
