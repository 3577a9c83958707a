// #/lineage/<id>: the ordered domains as a timeline (state, tokens, duration, strategy),
// adding a domain (upload with progress), cancelling, downloads, forking.

import { allPages, api, uploadForm } from "../api.js";
import { enc, fmtDuration, fmtNumber, fmtTime, h, problemText, progressBar, secondsBetween, setProgress, statusBadge } from "../dom.js";

const ACTIVE = new Set(["queued", "running", "cancelling", "validating"]);
const REFRESH_MS = 2000;

function fact(label, value) {
  return h("div", {}, h("dt", {}, label), h("dd", {}, value));
}

function stageCard(lineage, stage, job, withImportance, onChange) {
  const base = `/v1/lineages/${enc(lineage.id)}/stages/${enc(stage.position)}`;
  const active = ACTIVE.has(stage.status);
  const tokens = stage.trained_tokens ?? (job ? job.trained_tokens : null);
  const duration = job ? secondsBetween(job.started_at, job.finished_at) : null;
  const message = h("p", { class: "error", role: "status" });
  const actions = h(
    "div",
    { class: "actions" },
    h("a", { href: `#/job/${enc(stage.job_id)}`, class: "button secondary" }, "Job details"),
  );
  if (active) {
    const cancel = h("button", { type: "button", class: "danger", "data-testid": `cancel-${stage.position}` }, "Cancel job");
    cancel.addEventListener("click", async () => {
      if (!window.confirm(`Cancel the job of stage ${stage.position} (${stage.name})? Later queued stages are cancelled too.`)) return;
      cancel.disabled = true;
      try {
        await api(`/v1/jobs/${enc(stage.job_id)}/cancel`, { method: "POST" });
        onChange();
      } catch (error) {
        message.textContent = problemText(error);
        cancel.disabled = false;
      }
    });
    actions.append(cancel);
  }
  if (stage.checkpoint_available) {
    actions.append(h("a", { href: `${base}/checkpoint`, class: "button secondary", download: "", "data-testid": `checkpoint-${stage.position}` }, "Download checkpoint (.tar)"));
    if (withImportance) {
      actions.append(h("a", { href: `${base}/importance`, class: "button secondary", download: "" }, "Download importance (.tar)"));
    }
  }
  const card = h(
    "div",
    { class: "card" },
    h(
      "div",
      { class: "stage-head" },
      h("h3", {}, `${stage.position}. ${stage.name}`),
      statusBadge(stage.status),
      job && job.phase && active ? h("span", { class: "muted" }, `phase: ${job.phase}`) : null,
    ),
    h(
      "dl",
      { class: "facts" },
      fact("Strategy", lineage.strategy),
      fact("Tokens trained", fmtNumber(tokens)),
      fact("Steps", job && job.total_steps ? `${fmtNumber(job.step ?? 0)} / ${fmtNumber(job.total_steps)}` : fmtNumber(stage.steps)),
      fact("Duration", fmtDuration(duration)),
      fact(active ? "ETA" : "Finished", active ? fmtDuration(job ? job.eta_seconds : null) : fmtTime(stage.finished_at)),
    ),
    active ? progressBar(job ? job.progress : 0, `stage ${stage.position} progress`, `stage-progress-${stage.position}`) : null,
    job && job.error ? h("p", { class: "error" }, `${job.error.code}: ${job.error.message}`) : null,
    actions,
    message,
  );
  return h("li", { class: stage.status, "data-testid": `stage-${stage.position}` }, card);
}

function addDomainForm(lineage, onAdded) {
  const error = h("p", { class: "error", role: "alert" });
  const bar = progressBar(0, "upload progress", "upload-progress");
  bar.hidden = true;
  const form = h(
    "form",
    { id: "add-domain", class: "card", "aria-labelledby": "add-title" },
    h("h2", { id: "add-title" }, "Add a domain"),
    h("p", { class: "muted" }, "Upload the domain's text (.txt: documents separated by blank lines, or .jsonl with a \"text\" field; gzip allowed). It trains as the next stage."),
    h(
      "div",
      { class: "row" },
      h(
        "div",
        {},
        h("label", { for: "domain-name" }, "Domain name"),
        h("input", { id: "domain-name", name: "name", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9_.\\-]{0,63}", "aria-describedby": "domain-help" }),
      ),
      h("div", {}, h("label", { for: "domain-file" }, "Corpus file"), h("input", { id: "domain-file", name: "file", type: "file", required: true })),
    ),
    h("p", { id: "domain-help", class: "muted" }, "1 to 64 of letters, digits, _ . -"),
    bar,
    h("button", { type: "submit" }, "Upload and train"),
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.textContent = "";
    const data = new FormData();
    data.append("name", form.name.value);
    data.append("file", form.file.files[0]);
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    bar.hidden = false;
    setProgress(bar, 0);
    try {
      const accepted = await uploadForm(`/v1/lineages/${enc(lineage.id)}/domains`, data, (fraction) => setProgress(bar, fraction));
      setProgress(bar, 1);
      form.reset();
      onAdded(accepted);
    } catch (failure) {
      error.textContent = problemText(failure);
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

function forkForm(lineage, onForked) {
  const done = lineage.stages.filter((st) => st.status === "succeeded");
  if (!done.length) return null;
  const error = h("p", { class: "error", role: "alert" });
  const form = h(
    "form",
    { class: "card", "aria-labelledby": "fork-title" },
    h("h2", { id: "fork-title" }, "Fork"),
    h("p", { class: "muted" }, "A new lineage continuing from one of these stages (compare strategies or domain orders side by side in the forgetting view)."),
    h(
      "div",
      { class: "row" },
      h("div", {}, h("label", { for: "fork-name" }, "New lineage's name"), h("input", { id: "fork-name", name: "name", required: true, maxlength: 200 })),
      h(
        "div",
        {},
        h("label", { for: "fork-stage" }, "After stage"),
        h("select", { id: "fork-stage", name: "from_stage" }, done.map((st) => h("option", { value: st.position }, `${st.position}. ${st.name}`))),
      ),
    ),
    h("button", { type: "submit", class: "secondary" }, "Fork"),
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      const child = await api(`/v1/lineages/${enc(lineage.id)}/fork`, { method: "POST", json: { name: form.name.value, from_stage: Number(form.from_stage.value) } });
      onForked(child);
    } catch (failure) {
      error.textContent = problemText(failure);
    }
  });
  return form;
}

export async function renderLineage(view, lineageId) {
  let timer = null;
  let stopped = false;
  const timeline = h("ol", { class: "timeline", "aria-label": "stages in training order", "data-testid": "timeline" });
  let withImportance = new Set();

  async function refresh() {
    const [lineage, jobs] = await Promise.all([
      api(`/v1/lineages/${enc(lineageId)}`),
      allPages(`/v1/jobs?lineage_id=${enc(lineageId)}&limit=100`),
    ]);
    const byId = new Map(jobs.map((job) => [String(job.id), job]));
    const succeeded = lineage.stages.filter((st) => st.status === "succeeded").length;
    if (succeeded && succeeded !== withImportance.size) {
      const summary = await api(`/v1/lineages/${enc(lineageId)}/importance`).catch(() => ({ stages: [] }));
      withImportance = new Set(summary.stages.map((st) => st.position));
    }
    timeline.replaceChildren(
      ...lineage.stages.map((st) => stageCard(lineage, st, byId.get(String(st.job_id)), withImportance.has(st.position), () => schedule())),
    );
    if (!lineage.stages.length) timeline.append(h("li", {}, h("p", { class: "muted" }, "No domain yet: add the first one below.")));
    return lineage;
  }

  // refresh soon (after a change), then every REFRESH_MS while a stage is queued or running
  function schedule(delay = 50) {
    if (stopped) return;
    clearTimeout(timer);
    timer = setTimeout(async () => {
      let again = true;
      try {
        const now = await refresh();
        again = now.stages.some((st) => ACTIVE.has(st.status));
      } catch {
        again = true;
      }
      if (again) schedule(REFRESH_MS);
    }, delay);
  }

  const lineage = await refresh();
  const parent = lineage.forked_from_id === null || lineage.forked_from_id === undefined
    ? null
    : h("p", {}, "Fork of ", h("a", { href: `#/lineage/${enc(lineage.forked_from_id)}` }, "its parent lineage"), ` after stage ${lineage.forked_from_position}.`);
  const parts = [
    h("nav", { class: "crumbs", "aria-label": "breadcrumb" }, h("a", { href: "#/lineages" }, "Lineages"), h("a", { href: `#/lineage/${enc(lineage.id)}`, "aria-current": "page" }, lineage.name)),
    h("h1", {}, lineage.name),
    h(
      "dl",
      { class: "facts card" },
      fact("Strategy", lineage.strategy),
      fact("Base model", `${lineage.base_model} (${lineage.architecture}, ${lineage.objective})`),
      fact("Created", fmtTime(lineage.created_at)),
      fact(
        "Hyper-parameters",
        h("code", {}, Object.entries(lineage.hyperparameters).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(", ") || "defaults"),
      ),
    ),
    parent,
    h(
      "div",
      { class: "actions" },
      h("a", { href: `#/lineage/${enc(lineage.id)}/forgetting`, class: "button" }, "Forgetting"),
      h("a", { href: `#/lineage/${enc(lineage.id)}/importance`, class: "button secondary" }, "Importance"),
    ),
    h("h2", {}, "Domains, in training order"),
    timeline,
    addDomainForm(lineage, () => schedule()),
    forkForm(lineage, (child) => {
      window.location.hash = `#/lineage/${enc(child.id)}`;
    }),
  ];
  view.replaceChildren(...parts.filter(Boolean));
  if (lineage.stages.some((st) => ACTIVE.has(st.status))) schedule(REFRESH_MS);
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
