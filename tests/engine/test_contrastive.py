"""InfoNCE and DAS's views: the positive is a second dropout view of the *same* input."""

import math

import torch
import torch.nn.functional as F

from das_engine.config import TrainingConfig
from das_engine.contrastive import info_nce
from das_engine.importance import Importance
from das_engine.objective import Batcher
from das_engine.strategies import StageContext
from das_engine.strategies.das import DAS
from das_engine.units import build_unit_map


def test_info_nce_matches_the_formula():
    g = torch.Generator().manual_seed(0)
    a, p, q = (torch.randn(5, 8, generator=g) for _ in range(3))
    tau = 0.05
    loss = info_nce(a, p, q, tau)
    an, pn, qn = (F.normalize(x, dim=-1) for x in (a, p, q))
    manual = 0.0
    for i in range(5):
        pos = math.exp(float(an[i] @ pn[i]) / tau)
        denom = sum(math.exp(float(an[i] @ pn[k]) / tau) for k in range(5))
        denom += sum(math.exp(float(an[i] @ qn[j]) / tau) for j in range(5))
        manual -= math.log(pos / denom)
    assert math.isclose(float(loss), manual / 5, rel_tol=1e-4)


def test_info_nce_is_lowest_when_positive_matches_the_anchor():
    g = torch.Generator().manual_seed(1)
    a, q = torch.randn(4, 16, generator=g), torch.randn(4, 16, generator=g)
    matched = info_nce(a, a.clone(), q)
    shuffled = info_nce(a, a.roll(1, 0), q)
    assert float(matched) < 0.1 < float(shuffled)


def _das(tokenizer, model):
    um = build_unit_map(model)
    imp = Importance({k: torch.full(s, 0.5) for k, s in um.shapes().items()})
    das = DAS(TrainingConfig(contrast_weight=1.0))
    das.prepare(StageContext(model, um, das.config, imp))
    return das


def test_das_positive_is_the_same_example_under_another_dropout_mask(tokenizer, roberta, batch):
    b = Batcher(tokenizer, "mlm")(batch["input_ids"], batch["attention_mask"], seed=0)
    das = _das(tokenizer, roberta)
    roberta.eval()  # dropout off: both views of x_i must then be identical...
    _, anchor, positive, previous = das.views(roberta, b)
    assert torch.allclose(anchor, positive, atol=1e-5)
    # ...and differ from every other example (a repeat/view mis-pairing would match j != i)
    for i in range(anchor.shape[0]):
        for j in range(anchor.shape[0]):
            if i != j:
                assert not torch.allclose(anchor[i], positive[j], atol=1e-3)
    assert previous.shape == anchor.shape
    assert not torch.allclose(previous, anchor, atol=1e-4)  # gates at I_acc change the view
    roberta.train()  # dropout on: the two views differ but stay closest to each other
    torch.manual_seed(0)
    _, anchor, positive, _ = das.views(roberta, b)
    assert not torch.equal(anchor, positive)
    sims = F.normalize(anchor, dim=-1) @ F.normalize(positive, dim=-1).T
    assert (sims.argmax(1) == torch.arange(anchor.shape[0])).all()


def test_das_loss_adds_the_weighted_contrast(tokenizer, roberta, batch):
    b = Batcher(tokenizer, "mlm")(batch["input_ids"], batch["attention_mask"], seed=0)
    das = _das(tokenizer, roberta)
    roberta.eval()
    total, logs = das.loss(roberta, b)
    assert math.isclose(float(total), logs["lm_loss"] + logs["contrast"], rel_tol=1e-5)
    das.config = das.config.replace(contrast_weight=0.0)
    total0, logs0 = das.loss(roberta, b)
    assert "contrast" not in logs0 and math.isclose(float(total0), logs["lm_loss"], rel_tol=1e-5)
