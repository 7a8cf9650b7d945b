"""The preference losses against TRL (the installed version is the reference implementation).

TRL 1.16 has no standalone DPO loss function: DPOTrainer._compute_loss runs the model itself. It is called
here as an unbound method on the smallest stand-in TRL allows: a `self` holding only the attributes it reads
(beta, loss types, an identity accelerator, a metrics store) with precompute_ref_logps=True, so the reference
log-probs come from the batch, and a stand-in `model` whose output is the per-token log-probs of the
completion tokens (TRL sums them: each row's tokens are spread so that they sum to the fixed per-pair logps,
which keeps the gradient w.r.t. those logps TRL's own). ORPO and SimPO: ORPOTrainer/CPOTrainer's
get_batch_loss_metrics, unbound, on a stand-in whose concatenated_forward returns the fixed mean logps and NLL,
so TRL's own odds_ratio_loss / cpo_loss and its assembly of the loss and metrics run unchanged.
Gradients are compared w.r.t. the policy logps (and the NLL), all in float64, within 1e-5 relative.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from functools import partial
from types import SimpleNamespace

import pytest
import torch

from phi3local.train.preference_loss import default_sft_weight, preference_loss, summarize, uses_reference

warnings.filterwarnings("ignore")
trl = pytest.importorskip("trl")

RTOL = 1e-5
PAIRS = 6
# The metrics every loss shares with TRL (DPO/IPO and SimPO: all but the NLL).
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected", "nll_loss")


def close(a, b, rtol=RTOL):
    a = torch.as_tensor(a, dtype=torch.float64).detach()
    b = torch.as_tensor(b, dtype=torch.float64).detach()
    return torch.allclose(a, b, rtol=rtol, atol=1e-12), float(((a - b).abs() / b.abs().clamp(min=1e-30)).max())


def assert_same_as_trl(name, ours, theirs, keys):
    """ours (loss, gradients, per-pair metrics) against theirs (TRL's loss, gradients, metrics): the loss, each
    gradient and the summarized metrics `keys` within RTOL."""
    loss, grads, metrics = ours
    their_loss, their_grads, their_metrics = theirs
    ok, rel = close(loss, their_loss)
    assert ok, f"{name} loss {float(loss)} vs TRL {float(their_loss)} (rel {rel:.2e})"
    for mine, ref in zip(grads, their_grads):
        ok, rel = close(mine, ref)
        assert ok, f"{name} gradient differs from TRL's (max rel {rel:.2e})"
    mine = summarize(metrics)
    for key in keys:
        ok, rel = close(mine[key], their_metrics[key])
        assert ok, f"{key}: {mine[key]} vs TRL {their_metrics[key]}"


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    nc = torch.randint(3, 40, (PAIRS,), generator=g)
    nr = torch.randint(3, 40, (PAIRS,), generator=g)
    # Summed log-probs of plausible size: about -0.2 to -3 nats per token.
    pc = -(torch.rand(PAIRS, generator=g, dtype=torch.float64) * 2.8 + 0.2) * nc
    pr = -(torch.rand(PAIRS, generator=g, dtype=torch.float64) * 2.8 + 0.2) * nr
    rc = pc + torch.randn(PAIRS, generator=g, dtype=torch.float64) * 3
    rr = pr + torch.randn(PAIRS, generator=g, dtype=torch.float64) * 3
    nll = torch.tensor(1.7, dtype=torch.float64)
    return SimpleNamespace(pc=pc, pr=pr, rc=rc, rr=rr, nc=nc, nr=nr, nll=nll)


def leaves(b):
    return b.pc.clone().requires_grad_(True), b.pr.clone().requires_grad_(True)


class Identity:
    device = torch.device("cpu")

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def unwrap_model(m):
        return m


# -------------------------------------------------------------------------------------------------- DPO / IPO


def trl_dpo(loss_type, beta, pc, pr, b):
    """TRL DPOTrainer._compute_loss on a stand-in; returns (loss, metrics)."""
    from trl import DPOTrainer

    prompt = 2
    width = prompt + int(max(b.nc.max(), b.nr.max())) + 1
    lengths = torch.cat([b.nc, b.nr])
    completion = torch.zeros(2 * PAIRS, width, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        completion[i, prompt:prompt + n] = 1
    shift = completion[:, 1:].to(torch.float64)
    logps = torch.cat([pc, pr])
    per_token = logps[:, None] * shift / lengths[:, None].to(torch.float64)  # sums to the per-pair logps

    def model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(per_token, dtype=torch.bool))

    metrics = defaultdict(lambda: defaultdict(list))
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=Identity(), aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, use_weighting=False, label_smoothing=0.0, _metrics=metrics, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": torch.ones(2 * PAIRS, width, dtype=torch.long), "attention_mask": torch.ones_like(completion),
              "completion_mask": completion, "ref_chosen_logps": b.rc, "ref_rejected_logps": b.rr}
    loss = DPOTrainer._compute_loss(stand_in, model, inputs, False)
    return loss, {k: v[-1] for k, v in metrics["train"].items()}


@pytest.mark.parametrize("name,loss_type,beta", [("dpo", "sigmoid", 0.1), ("dpo", "sigmoid", 0.5),
                                                  ("ipo", "ipo", 0.1), ("ipo", "ipo", 1.0)])
def test_dpo_ipo_equal_trl(batch, name, loss_type, beta):
    pc, pr = leaves(batch)
    per_pair, metrics = preference_loss(name, pc, pr, batch.rc, batch.rr, beta=beta, chosen_lengths=batch.nc,
                                        rejected_lengths=batch.nr)
    ours = per_pair.mean()
    g_ours = torch.autograd.grad(ours, (pc, pr))

    tc, tr = leaves(batch)
    theirs, their_metrics = trl_dpo(loss_type, beta, tc, tr, batch)
    g_theirs = torch.autograd.grad(theirs, (tc, tr))

    assert_same_as_trl(name, (ours, g_ours, metrics), (theirs, g_theirs, their_metrics), METRICS[:-1])


def test_dpo_at_step_zero_is_ln2_with_zero_margins(batch):
    """A fresh adapter: the policy IS the reference, so the loss is ln 2 and every reward/margin is 0."""
    for dtype in (torch.float64, torch.float32):
        pc, pr = batch.pc.to(dtype), batch.pr.to(dtype)
        per_pair, metrics = preference_loss("dpo", pc, pr, pc.clone(), pr.clone(), beta=0.1,
                                            chosen_lengths=batch.nc, rejected_lengths=batch.nr)
        assert torch.equal(per_pair, torch.full_like(per_pair, math.log(2)))
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert torch.equal(metrics[key], torch.zeros_like(per_pair)), key
    per_pair, _ = preference_loss("ipo", batch.pc, batch.pr, batch.pc, batch.pr, beta=0.1,
                                  chosen_lengths=batch.nc, rejected_lengths=batch.nr)
    assert torch.allclose(per_pair, torch.full_like(per_pair, (1 / 0.2) ** 2))  # (0 - 1/(2 beta))^2


# --------------------------------------------------------------------------------------------- ORPO / SimPO


def trl_orpo(beta, ac, ar, nll):
    from trl.experimental.orpo import ORPOTrainer

    stand_in = SimpleNamespace(beta=beta, accelerator=Identity(), aux_loss_enabled=False)
    stand_in.odds_ratio_loss = partial(ORPOTrainer.odds_ratio_loss, stand_in)
    logits = torch.zeros(PAIRS, 1, 1)
    stand_in.concatenated_forward = lambda model, batch: (ac, ar, logits, logits, nll)
    return ORPOTrainer.get_batch_loss_metrics(stand_in, None, {})


def trl_simpo(beta, gamma, cpo_alpha, ac, ar, nll):
    from trl.experimental.cpo import CPOTrainer

    stand_in = SimpleNamespace(beta=beta, simpo_gamma=gamma, loss_type="simpo", alpha=0.0, label_smoothing=0.0,
                               cpo_alpha=cpo_alpha, accelerator=Identity(), aux_loss_enabled=False)
    stand_in.cpo_loss = partial(CPOTrainer.cpo_loss, stand_in)
    logits = torch.zeros(PAIRS, 1, 1)
    nll_used = nll if cpo_alpha else torch.tensor(0.0, dtype=nll.dtype)  # as TRL's concatenated_forward
    stand_in.concatenated_forward = lambda model, batch: (ac, ar, logits, logits, nll_used)
    return CPOTrainer.get_batch_loss_metrics(stand_in, None, {})


@pytest.mark.parametrize("beta", [0.1, 0.25])
def test_orpo_equal_trl(batch, beta):
    pc, pr = leaves(batch)
    nll = batch.nll.clone().requires_grad_(True)
    per_pair, metrics = preference_loss("orpo", pc, pr, beta=beta, chosen_lengths=batch.nc,
                                        rejected_lengths=batch.nr, chosen_nll=nll)
    ours = per_pair.mean()
    g_ours = torch.autograd.grad(ours, (pc, pr, nll))

    tc, tr = leaves(batch)
    tnll = batch.nll.clone().requires_grad_(True)
    theirs, their_metrics = trl_orpo(beta, tc / batch.nc, tr / batch.nr, tnll)  # TRL's ORPO takes mean logps
    g_theirs = torch.autograd.grad(theirs, (tc, tr, tnll))
    assert_same_as_trl("orpo", (ours, g_ours, metrics), (theirs, g_theirs, their_metrics),
                       (*METRICS, "log_odds_ratio", "log_odds_chosen"))


@pytest.mark.parametrize("beta,gamma,sft", [(2.0, 0.5, 0.0), (10.0, 1.6, 0.0), (0.1, 0.5, 1.0)])
def test_simpo_equal_trl(batch, beta, gamma, sft):
    pc, pr = leaves(batch)
    nll = batch.nll.clone().requires_grad_(True)
    per_pair, metrics = preference_loss("simpo", pc, pr, beta=beta, simpo_gamma=gamma, sft_weight=sft,
                                        chosen_lengths=batch.nc, rejected_lengths=batch.nr, chosen_nll=nll)
    ours = per_pair.mean()
    wrt = (pc, pr, nll) if sft else (pc, pr)
    g_ours = torch.autograd.grad(ours, wrt)

    tc, tr = leaves(batch)
    tnll = batch.nll.clone().requires_grad_(True)
    theirs, their_metrics = trl_simpo(beta, gamma, sft, tc / batch.nc, tr / batch.nr, tnll)
    g_theirs = torch.autograd.grad(theirs, (tc, tr, tnll) if sft else (tc, tr))
    assert_same_as_trl("simpo", (ours, g_ours, metrics), (theirs, g_theirs, their_metrics), METRICS[:-1])


def test_float32_matches_float64_trl(batch):
    """The training loop's float32 log-probs give TRL's float64 values within 1e-5 relative too."""
    for name, loss_type in (("dpo", "sigmoid"), ("ipo", "ipo")):
        per_pair, _ = preference_loss(name, batch.pc.float(), batch.pr.float(), batch.rc.float(), batch.rr.float(),
                                      beta=0.1, chosen_lengths=batch.nc, rejected_lengths=batch.nr)
        theirs, _ = trl_dpo(loss_type, 0.1, batch.pc, batch.pr, batch)
        assert close(per_pair.mean(), theirs)[0], name


# --------------------------------------------------------------------------------------------------- contract


def test_contract_errors_and_defaults(batch):
    kw = dict(beta=0.1, chosen_lengths=batch.nc, rejected_lengths=batch.nr)
    assert uses_reference("dpo") and uses_reference("ipo") and not uses_reference("orpo") and not uses_reference("simpo")
    assert default_sft_weight("orpo") == 1.0 and default_sft_weight("dpo") == 0.0
    with pytest.raises(ValueError, match="unknown preference loss 'kto'"):
        preference_loss("kto", batch.pc, batch.pr, **kw)
    with pytest.raises(ValueError, match="reference"):
        preference_loss("dpo", batch.pc, batch.pr, **kw)
    with pytest.raises(ValueError, match="chosen_nll"):
        preference_loss("orpo", batch.pc, batch.pr, **kw)  # orpo's default sft_weight 1 needs the NLL
    per_pair, metrics = preference_loss("orpo", batch.pc, batch.pr, sft_weight=0, **kw)
    assert per_pair.shape == (PAIRS,) and "nll_loss" not in metrics
    # DPO + sft_weight (RPO): the NLL is added per pair.
    base, _ = preference_loss("dpo", batch.pc, batch.pr, batch.rc, batch.rr, **kw)
    rpo, _ = preference_loss("dpo", batch.pc, batch.pr, batch.rc, batch.rr, sft_weight=0.5,
                             chosen_nll=torch.full((PAIRS,), 2.0, dtype=torch.float64), **kw)
    assert torch.allclose(rpo - base, torch.ones_like(base))
    # The reference gets no gradient even when the caller's tensor has one.
    rc = batch.rc.clone().requires_grad_(True)
    out, _ = preference_loss("dpo", batch.pc, batch.pr, rc, batch.rr, **kw)
    assert not out.requires_grad
