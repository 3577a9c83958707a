"""End-task evaluation through the REST API: labelled sets uploaded as corpora of purpose
``end_task`` (validated in the request), attached to domains, probed by the real worker
after each stage, and reported by ``GET /v1/lineages/{id}/metrics`` as accuracy and
macro-F1 matrices with FR/BWT/FWT."""

from __future__ import annotations

import io
import json

import pytest

from das_engine.end_task import MIN_EXAMPLES, MIN_PER_CLASS
from service_core.models import Job
from tests.service.conftest import (
    assert_problem,
    by_public,
    corpus_text,
    create_lineage,
    in_process_runner,
    new_owner,
    upload,
)

SENTENCES = {
    "news": ["the minister announced a plan", "markets fell after the report"],
    "law": ["the court dismissed the appeal", "the contract was held void"],
}


def labelled(domain: str, n: int = 12) -> bytes:
    """``n`` examples of two classes (the class decides the wording), unicode included."""
    a, b = SENTENCES[domain]
    lines = []
    for i in range(n):
        text, label = (f"{a} número {i} ✓", "α") if i % 2 else (f"{b} día {i}", 7)
        lines.append(json.dumps({"text": text, "label": label}, ensure_ascii=False))
    return ("\n".join(lines) + "\n").encode()


def upload_labelled(client, owner, content: bytes, filename: str = "task.jsonl"):  # noqa: ANN001, ANN201
    return client.post(
        "/v1/corpora",
        headers=owner.headers,
        data={"purpose": "end_task"},
        files={"file": (filename, io.BytesIO(content), "application/octet-stream")},
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory):  # noqa: ANN201
    with in_process_runner(tmp_path_factory.mktemp("end_task")) as env:
        yield env


@pytest.fixture(scope="module")
def trained(env):  # noqa: ANN201
    """Two domains, each with a labelled set (one attached at creation, one later)."""
    _, app, client, runner, _ = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    jobs = []
    for domain in ("news", "law"):
        corpus = upload(client, owner, f"{domain}.txt", corpus_text(domain)).json()["id"]
        task = upload_labelled(client, owner, labelled(domain)).json()
        assert task["purpose"] == "end_task" and task["documents"] == 12
        body = {"corpus_id": corpus, "name": domain}
        if domain == "news":
            body["end_task_corpus_id"] = task["id"]
        r = client.post(f"/v1/lineages/{lineage}/domains", headers=owner.headers, json=body)
        assert r.status_code == 202, r.text
        jobs.append(r.json()["job"]["id"])
        if domain == "law":
            r = client.put(
                f"/v1/lineages/{lineage}/stages/2/end-task",
                headers=owner.headers,
                json={"end_task_corpus_id": task["id"]},
            )
            assert r.status_code == 200, r.text
            assert r.json()["end_task_corpus_id"] == task["id"]
    assert runner.run(jobs[0]) == "succeeded"
    after_first = client.get(f"/v1/lineages/{lineage}/metrics", headers=owner.headers).json()
    assert runner.run(jobs[1]) == "succeeded"
    return owner, lineage, jobs, after_first


def test_each_stage_is_probed_on_every_attached_task(env, trained):
    _, _, client, _, _ = env
    owner, lineage, jobs, after_first = trained
    first = after_first["end_task"]
    # after stage 1 only its own task is live (law's stage has not trained yet)
    assert first["rows"] == ["base", "news"] and first["tasks"] == ["news"]
    assert first["mode"] == "linear"
    m = client.get(f"/v1/lineages/{lineage}/metrics", headers=owner.headers).json()
    assert m["loss_matrix"] and len(m["loss_matrix"]) == 2  # the loss matrix is still there
    et = m["end_task"]
    assert et["rows"] == ["base", "news", "law"] and et["tasks"] == ["news", "law"]
    for key in ("accuracy", "macro_f1"):
        assert len(et[key]) == 3 and all(len(row) == 2 for row in et[key])
        assert all(0.0 <= x <= 1.0 for row in et[key] for x in row)
    # rows already probed are kept as they were (seeded, cached cells)
    assert [row[:1] for row in et["accuracy"][:2]] == first["accuracy"]
    acc = et["accuracy"]
    s = et["summary"]["accuracy"]
    assert s["aligned_tasks"] == ["news", "law"]
    assert s["bwt"] == pytest.approx(acc[2][0] - acc[1][0])
    assert s["fwt"] == pytest.approx(acc[1][1] - acc[0][1])
    assert s["final_mean"] == pytest.approx(sum(acc[2]) / 2)
    job = client.get(f"/v1/jobs/{jobs[1]}", headers=owner.headers).json()
    assert job["progress"] == 1.0


def test_a_lineage_without_labelled_sets_has_no_end_task_block(env):
    _, app, client, _, _ = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    m = client.get(f"/v1/lineages/{lineage}/metrics", headers=owner.headers).json()
    assert m["end_task"] is None


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b'{"text": "a", "label": 1}\nnot json\n', "invalid_end_task_format"),
        (b'{"text": "", "label": 1}\n', "invalid_end_task_format"),
        (b'{"text": "a", "label": [1]}\n', "invalid_end_task_format"),
        (b'{"text": "a", "label": true}\n', "invalid_end_task_format"),
        (b'{"label": 1}\n', "invalid_end_task_format"),
        (b"\xff\xfe\n", "invalid_end_task_format"),
        (
            b"".join(b'{"text": "t%d", "label": "x"}\n' % i for i in range(MIN_EXAMPLES)),
            "end_task_too_few_classes",
        ),
        (
            b'{"text": "t", "label": "a"}\n' * (MIN_EXAMPLES - 1),
            "end_task_too_few_examples",
        ),
        (
            b'{"text": "t", "label": "a"}\n' * MIN_EXAMPLES
            + b'{"text": "u", "label": "b"}\n' * (MIN_PER_CLASS - 1),
            "end_task_too_few_examples",
        ),
    ],
)
def test_a_bad_labelled_file_is_a_422_and_nothing_is_kept(env, content, code):
    _, app, client, _, _ = env
    owner = new_owner(app)
    assert_problem(upload_labelled(client, owner, content), 422, code)
    listed = client.get("/v1/corpora", headers=owner.headers).json()
    assert listed["data"] == []


def test_purpose_and_attachments_are_checked(env):
    _, app, client, _, _ = env
    owner, other = new_owner(app), new_owner(app)
    r = client.post(
        "/v1/corpora",
        headers=owner.headers,
        data={"purpose": "fine-tune"},
        files={"file": ("t.jsonl", io.BytesIO(labelled("news")), "application/octet-stream")},
    )
    assert_problem(r, 422, "validation_error")
    assert_problem(upload_labelled(client, owner, labelled("news"), "t.txt"), 422)
    text = upload(client, owner, "news.txt", corpus_text("news")).json()["id"]
    lineage = create_lineage(client, owner).json()["id"]
    body = {"corpus_id": text, "name": "news", "end_task_corpus_id": text}
    r = client.post(f"/v1/lineages/{lineage}/domains", headers=owner.headers, json=body)
    assert_problem(r, 422, "not_a_labelled_set")
    foreign = upload_labelled(client, other, labelled("news")).json()["id"]
    body["end_task_corpus_id"] = foreign
    r = client.post(f"/v1/lineages/{lineage}/domains", headers=owner.headers, json=body)
    assert_problem(r, 404)


def test_owner_isolation(env, trained):
    _, app, client, _, _ = env
    owner, lineage, _, _ = trained
    stranger = new_owner(app)
    assert_problem(client.get(f"/v1/lineages/{lineage}/metrics", headers=stranger.headers), 404)
    mine = upload_labelled(client, stranger, labelled("law")).json()["id"]
    r = client.put(
        f"/v1/lineages/{lineage}/stages/1/end-task",
        headers=stranger.headers,
        json={"end_task_corpus_id": mine},
    )
    assert_problem(r, 404)
    theirs = client.get(f"/v1/lineages/{lineage}", headers=owner.headers).json()
    task = theirs["stages"][0]["end_task_corpus_id"]
    stranger_lineage = create_lineage(client, stranger).json()["id"]
    text = upload(client, stranger, "law.txt", corpus_text("law")).json()["id"]
    body = {"corpus_id": text, "name": "law", "end_task_corpus_id": task}
    r = client.post(f"/v1/lineages/{stranger_lineage}/domains", headers=stranger.headers, json=body)
    assert_problem(r, 404)


def test_a_probe_that_fails_is_a_warning_and_the_stage_still_succeeds(env):
    from service_core.models import Corpus, JobEvent
    from service_core.storage import resolve_stored

    settings, app, client, runner, _ = env
    owner = new_owner(app)
    lineage = create_lineage(client, owner).json()["id"]
    corpus = upload(client, owner, "law.txt", corpus_text("law")).json()["id"]
    task = upload_labelled(client, owner, labelled("law")).json()["id"]
    body = {"corpus_id": corpus, "name": "law", "end_task_corpus_id": task}
    job = client.post(f"/v1/lineages/{lineage}/domains", headers=owner.headers, json=body)
    with app.state.session_factory() as session:  # the stored file goes bad after the upload
        resolve_stored(settings, by_public(session, Corpus, task).storage_path).write_text(
            "{oops\n"
        )
    job_id = job.json()["job"]["id"]
    assert runner.run(job_id) == "succeeded"
    with app.state.session_factory() as session:
        row = by_public(session, Job, job_id).id
        events = session.query(JobEvent).filter_by(job_id=row, type="end_task").all()
    assert any(e.level == "warning" and e.data["code"] == "invalid_end_task_format" for e in events)
    m = client.get(f"/v1/lineages/{lineage}/metrics", headers=owner.headers).json()
    assert m["end_task"] is None and len(m["loss_matrix"]) == 1
