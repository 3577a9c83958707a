// Small DOM helpers: every text goes in through textContent / attributes, never innerHTML.

const SVG_NS = "http://www.w3.org/2000/svg";

function fill(node, attrs, children) {
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      node.addEventListener(name.slice(2), value);
    } else {
      node.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** h("a", {href: "#/x"}, "text", child...) -> an HTML element */
export function h(tag, attrs, ...children) {
  return fill(document.createElement(tag), attrs, children);
}

/** s("rect", {x: 1}) -> an SVG element */
export function s(tag, attrs, ...children) {
  return fill(document.createElementNS(SVG_NS, tag), attrs, children);
}

/** The path segment or query value of an opaque id (ids are strings, never numbers). */
export const enc = (id) => encodeURIComponent(String(id));

export function fmtNumber(value, digits = 3) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  if (typeof value !== "number") return String(value);
  if (Number.isInteger(value)) return value.toLocaleString("en");
  return value.toFixed(digits);
}

export function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${s % 60} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function secondsBetween(start, end) {
  if (!start) return null;
  const a = Date.parse(start);
  const b = end ? Date.parse(end) : Date.now();
  return Number.isFinite(a) && Number.isFinite(b) ? (b - a) / 1000 : null;
}

export function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return Number.isNaN(d.getTime()) ? iso : d.toLocaleString("en-GB", { hour12: false });
}

/** A progress bar: role=progressbar with its value, and a visible percentage. */
export function progressBar(fraction, label, id) {
  const pct = Math.round(Math.min(1, Math.max(0, fraction || 0)) * 100);
  const bar = h("div", { class: "bar" }, h("div", { class: "bar-fill" }));
  bar.firstChild.style.width = `${pct}%`;
  return h(
    "div",
    {
      class: "progress",
      role: "progressbar",
      "aria-label": label,
      "aria-valuemin": 0,
      "aria-valuemax": 100,
      "aria-valuenow": pct,
      "data-testid": id,
    },
    bar,
    h("span", { class: "progress-text" }, `${pct}%`),
  );
}

export function setProgress(node, fraction) {
  const pct = Math.round(Math.min(1, Math.max(0, fraction || 0)) * 100);
  node.setAttribute("aria-valuenow", pct);
  node.querySelector(".bar-fill").style.width = `${pct}%`;
  node.querySelector(".progress-text").textContent = `${pct}%`;
}

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}

export function problemText(error) {
  return error && error.message ? error.message : String(error);
}
