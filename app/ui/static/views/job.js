// #/job/<id>: live progress, phase, ETA, the training-loss and tokens/s curves
// (GET /v1/jobs/<id>/metrics) and the event log, fed by the job's server-sent events.

import { api, allPages } from "../api.js";
import { lineChart } from "../charts.js";
import { enc, fmtDuration, fmtNumber, fmtTime, h, problemText, progressBar, setProgress, statusBadge } from "../dom.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const METRICS_EVERY_MS = 1500;

function kpi(label, id) {
  return h("div", {}, h("dt", {}, label), h("dd", { "data-testid": id }, "–"));
}

function eventRow(event) {
  return h(
    "tr",
    { class: `level-${event.level}` },
    h("td", {}, fmtTime(event.created_at)),
    h("td", { class: "opt" }, event.level),
    h("td", {}, event.type),
    h("td", { class: "msg" }, event.message),
  );
}

export async function renderJob(view, jobId) {
  let job = await api(`/v1/jobs/${enc(jobId)}`);
  const lineage = await api(`/v1/lineages/${enc(job.lineage_id)}`);
  let source = null;
  let pollTimer = null;
  let metricsTimer = null;
  let stopped = false;
  let lastMetrics = 0;

  const bar = progressBar(job.progress, "job progress", "job-progress");
  const status = h("span", { "data-testid": "job-status" });
  const stats = h(
    "dl",
    { class: "kpi" },
    kpi("Phase", "job-phase"),
    kpi("Step", "job-step"),
    kpi("ETA", "job-eta"),
    kpi("Training loss", "job-loss"),
    kpi("Tokens/s", "job-tps"),
    kpi("Tokens trained", "job-tokens"),
  );
  const lossBox = h("div", { class: "chart-box" });
  const speedBox = h("div", { class: "chart-box" });
  const evalBox = h("div", {});
  const errorBox = h("p", { class: "error", role: "alert" });
  const cancelButton = h("button", { type: "button", class: "danger" }, "Cancel job");
  const tbody = h("tbody", {});
  const seen = new Set();
  let lastEventId = null; // the events' cursor, as the API wrote it (an opaque string)

  function showJob(next) {
    job = next;
    status.replaceChildren(statusBadge(job.status));
    setProgress(bar, job.progress);
    const set = (id, value) => {
      stats.querySelector(`[data-testid="${id}"]`).textContent = value;
    };
    set("job-phase", TERMINAL.has(job.status) ? "done" : job.phase || "–");
    set("job-step", job.total_steps ? `${fmtNumber(job.step ?? 0)} / ${fmtNumber(job.total_steps)}` : fmtNumber(job.step));
    set("job-eta", TERMINAL.has(job.status) ? "–" : fmtDuration(job.eta_seconds));
    set("job-loss", fmtNumber(job.loss));
    set("job-tokens", fmtNumber(job.trained_tokens));
    errorBox.textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
    cancelButton.hidden = TERMINAL.has(job.status) || job.status === "cancelling";
  }

  function addEvents(events) {
    const box = tbody.closest(".events");
    const atBottom = !box || box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    for (const event of events) {
      const key = String(event.id);
      if (seen.has(key)) continue;
      seen.add(key);
      lastEventId = event.id;
      tbody.append(eventRow(event));
    }
    if (box && atBottom) box.scrollTop = box.scrollHeight; // follow the newest, unless scrolled up
  }

  async function loadMetrics() {
    lastMetrics = Date.now();
    const m = await api(`/v1/jobs/${enc(jobId)}/metrics`);
    const loss = [{ name: "training loss", points: m.series.filter((p) => p.train_loss !== null).map((p) => [p.step, p.train_loss]) }];
    const speed = [{ name: "tokens/s", points: m.series.filter((p) => p.tokens_per_s !== null).map((p) => [p.step, p.tokens_per_s]), color: "#2ca02c" }];
    lossBox.replaceChildren(lineChart(loss, { title: "Training loss by step", xLabel: "step", yLabel: "loss", testid: "loss-curve" }));
    speedBox.replaceChildren(lineChart(speed, { title: "Throughput by step", xLabel: "step", yLabel: "tokens/s", testid: "speed-curve", height: 200 }));
    const latest = m.series.filter((p) => p.tokens_per_s !== null).pop();
    stats.querySelector('[data-testid="job-tps"]').textContent = latest ? fmtNumber(latest.tokens_per_s, 1) : "–";
    const held = Object.entries(m.eval_losses || {});
    evalBox.replaceChildren(
      held.length
        ? h("p", {}, "Held-out loss of this stage's model: ", held.map(([domain, value]) => `${domain} ${fmtNumber(value)}`).join(", "), m.general_loss !== null ? `; general corpus ${fmtNumber(m.general_loss)}` : "")
        : h("p", { class: "muted" }, "Held-out losses appear when the stage has succeeded."),
    );
  }

  function metricsSoon() {
    if (metricsTimer || stopped) return;
    const wait = Math.max(0, METRICS_EVERY_MS - (Date.now() - lastMetrics));
    metricsTimer = setTimeout(() => {
      metricsTimer = null;
      loadMetrics().catch(() => {});
    }, wait);
  }

  function finish(final) {
    if (final) showJob(final);
    if (source) source.close();
    source = null;
    clearTimeout(metricsTimer);
    metricsTimer = null;
    loadMetrics().catch(() => {});
  }

  // polling fallback (an EventSource that cannot connect)
  async function poll() {
    if (stopped) return;
    try {
      showJob(await api(`/v1/jobs/${enc(jobId)}`));
      const events = `/v1/jobs/${enc(jobId)}/events`;
      addEvents(await allPages(lastEventId === null ? events : `${events}?after=${enc(lastEventId)}`));
      metricsSoon();
    } catch {
      /* keep polling */
    }
    if (!TERMINAL.has(job.status)) pollTimer = setTimeout(poll, 2000);
    else finish();
  }

  function follow() {
    if (typeof EventSource === "undefined") {
      poll();
      return;
    }
    source = new EventSource(`/v1/jobs/${enc(jobId)}/events?stream=true`);
    source.addEventListener("message", (message) => {
      const event = JSON.parse(message.data);
      addEvents([event]);
      if (event.type === "progress" || event.type === "phase") metricsSoon();
    });
    source.addEventListener("job", (message) => showJob(JSON.parse(message.data)));
    source.addEventListener("end", (message) => {
      const final = JSON.parse(message.data);
      finish(final && final.id !== undefined ? final : null);
    });
    source.addEventListener("error", () => {
      // closed by the server (CLOSED): fall back to polling; else EventSource retries itself
      if (source && source.readyState === EventSource.CLOSED) {
        source = null;
        poll();
      }
    });
  }

  cancelButton.addEventListener("click", async () => {
    if (!window.confirm("Cancel this job? Later queued stages of the lineage are cancelled too.")) return;
    cancelButton.disabled = true;
    try {
      showJob(await api(`/v1/jobs/${enc(jobId)}/cancel`, { method: "POST" }));
    } catch (failure) {
      errorBox.textContent = problemText(failure);
    } finally {
      cancelButton.disabled = false;
    }
  });

  view.replaceChildren(
    h(
      "nav",
      { class: "crumbs", "aria-label": "breadcrumb" },
      h("a", { href: "#/lineages" }, "Lineages"),
      h("a", { href: `#/lineage/${enc(job.lineage_id)}` }, lineage.name),
      h("a", { href: `#/job/${enc(job.id)}`, "aria-current": "page" }, `job of stage ${job.stage_position}`),
    ),
    h("h1", {}, `Stage ${job.stage_position}: ${job.domain}`),
    h("div", { class: "card" }, h("p", {}, "Status: ", status), bar, stats, errorBox, cancelButton),
    h(
      "div",
      { class: "grid2" },
      h("section", { class: "card", "aria-labelledby": "loss-title" }, h("h2", { id: "loss-title" }, "Training loss"), lossBox, evalBox),
      h("section", { class: "card", "aria-labelledby": "speed-title" }, h("h2", { id: "speed-title" }, "Throughput"), speedBox),
    ),
    h(
      "section",
      { class: "card", "aria-labelledby": "events-title" },
      h("h2", { id: "events-title" }, "Event log"),
      h(
        "div",
        { class: "events table-wrap", tabindex: "0", "aria-label": "event log, scrollable" },
        h(
          "table",
          { "data-testid": "events" },
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Time"), h("th", { scope: "col", class: "opt" }, "Level"), h("th", { scope: "col" }, "Type"), h("th", { scope: "col" }, "Message"))),
          tbody,
        ),
      ),
    ),
  );
  showJob(job);
  await loadMetrics().catch(() => {});
  if (TERMINAL.has(job.status)) {
    addEvents(await allPages(`/v1/jobs/${enc(jobId)}/events`));
  } else {
    follow();
  }
  return () => {
    stopped = true;
    if (source) source.close();
    clearTimeout(pollTimer);
    clearTimeout(metricsTimer);
  };
}
