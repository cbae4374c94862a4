"""DP-SGD behaviour: clipping, noise scale, calibration, run-long accounting, budget refusals."""

import math

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from omegaconf import OmegaConf

from dplora import client, data, models, privacy
from dplora.privacy import BudgetExhausted, PrivacyAccount
from dplora.train import sequence_losses, train_round


def _account(cfg, n, batch_size=None, **changes):
    account = PrivacyAccount.plan(cfg.privacy, n, batch_size or cfg.train.batch_size,
                                  cfg.num_rounds * cfg.train.local_epochs)
    for k, v in changes.items():
        setattr(account, k, v)
    return account


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibrated_noise_meets_target_within_5_percent(accountant, target):
    cfg = OmegaConf.create({"target_epsilon": target, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": accountant})
    account = PrivacyAccount.plan(cfg, num_examples=775, batch_size=32, planned_epochs=3)
    assert account.planned_steps == 3 * math.ceil(775 / 32)
    eps = account.epsilon(account.planned_steps)
    assert 0.95 * target <= eps <= target
    # one step more than planned goes over budget, and the account refuses it
    account.steps = account.planned_steps
    with pytest.raises(BudgetExhausted, match="budget"):
        account.check_budget(1)


def test_more_noise_for_smaller_epsilon():
    sigmas = []
    for eps in (1.0, 4.0, 8.0):
        cfg = OmegaConf.create({"target_epsilon": eps, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": "prv"})
        sigmas.append(PrivacyAccount.plan(cfg, 500, 25, 2).noise_multiplier)
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0


def test_per_example_clipping_bound_holds(tiny_cfg):
    cfg = tiny_cfg
    model, tok = models.build_model(cfg)
    train_set = data.encode(data.load_split(cfg.dataset, "train").select(range(8)), tok, cfg)
    clip = 1e-3  # far below the raw per-example gradient norms, so clipping is active
    account = _account(cfg, len(train_set), batch_size=4, noise_multiplier=0.0, max_grad_norm=clip)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loader = torch.utils.data.DataLoader(train_set, batch_size=4)
    module, optimizer, _, _, _ = account.make_private(model, optimizer, loader)
    for i in range(len(train_set)):
        example = [t[i:i + 1] for t in train_set.tensors]
        optimizer.zero_grad()
        sequence_losses(module, example, cfg.model.task).mean().backward()
        raw = torch.cat([p.grad_sample.flatten() for p in optimizer.params]).norm()
        assert raw > 10 * clip
        optimizer.clip_and_accumulate()
        clipped = torch.cat([p.summed_grad.flatten() for p in optimizer.params]).norm()
        assert clipped <= clip * (1 + 1e-4)
        assert clipped >= 0.99 * clip  # clipped to the bound, not zeroed


@pytest.mark.parametrize("sigma", [0.5, 2.0])
def test_noise_scales_as_configured(tiny_cfg, sigma):
    """With zero gradients, the update is pure noise of std sigma * C / expected batch size."""
    cfg = tiny_cfg
    model, tok = models.build_model(cfg)
    train_set = data.encode(data.load_split(cfg.dataset, "train"), tok, cfg)
    account = _account(cfg, len(train_set), noise_multiplier=sigma, max_grad_norm=0.5)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.train.batch_size)
    module, optimizer, loader, _, _ = account.make_private(model, optimizer, loader)
    batch = [t[:16] for t in train_set.tensors]
    optimizer.zero_grad()
    (0.0 * sequence_losses(module, batch, cfg.model.task)).mean().backward()
    optimizer.pre_step()  # clip, add noise, scale
    grad = torch.cat([p.grad.flatten() for p in optimizer.params])
    expected = sigma * 0.5 / optimizer.expected_batch_size
    assert grad.numel() > 5000
    assert abs(float(grad.std()) / expected - 1) < 0.05
    assert abs(float(grad.mean())) < 3 * expected / math.sqrt(grad.numel())


def test_lora_weights_change_after_a_dp_step_and_base_does_not(tiny_cfg):
    cfg = tiny_cfg
    model, tok = models.build_model(cfg)
    train_set = data.encode(data.load_split(cfg.dataset, "train"), tok, cfg)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = models.adapter_state(model)
    account = _account(cfg, len(train_set))
    assert account.private and account.noise_multiplier > 0
    result = train_round(model, train_set, cfg, account, seed=0)
    after = models.adapter_state(model)
    assert result["steps"] == account.steps == cfg.train.local_epochs * round(1 / account.sample_rate)
    assert all(before[k].abs().sum() == 0 for k in before if "lora_B" in k)  # peft starts B at zero
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_empty_poisson_batch_still_steps_the_accountant(tiny_cfg):
    cfg = tiny_cfg
    model, tok = models.build_model(cfg)
    train_set = data.encode(data.load_split(cfg.dataset, "train"), tok, cfg)
    account = _account(cfg, len(train_set))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.train.batch_size)
    module, optimizer, loader, engine, _ = account.make_private(model, optimizer, loader)
    before = models.adapter_state(model)
    optimizer.zero_grad()
    privacy.empty_batch_step(optimizer)
    account.record_steps(engine)
    assert account.steps == 1
    after = models.adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the noise was applied


def test_epsilon_across_rounds_is_one_accountant_not_a_sum(tiny_cfg):
    """Two rounds through the real client path, with the account kept in a context.state RecordDict."""
    cfg = tiny_cfg
    model, _ = models.build_model(cfg)
    arrays, state = models.to_arrays(model), RecordDict()
    eps, steps = [], []
    for server_round in (1, 2):
        reply = client.train(cfg, arrays, state, node_config={"partition-id": 0, "num-partitions": 2}, server_round=server_round)
        metrics = reply[client.METRICS]
        eps.append(metrics["epsilon"])
        steps.append(metrics["steps"])
        arrays = reply[client.ARRAYS]
    assert steps[1] == 2 * steps[0] > 0
    q, sigma, delta = metrics["sample_rate"], metrics["noise_multiplier"], metrics["delta"]
    assert eps[1] == pytest.approx(privacy.epsilon(sigma, q, steps[1], delta, "prv"), rel=1e-9)
    assert eps[0] < eps[1] < 2 * eps[0]  # composition is sublinear: a sum would overstate it
    assert eps[1] <= cfg.privacy.target_epsilon
    restored = PrivacyAccount.from_record(state.config_records[privacy.STATE_KEY])
    assert restored.steps == steps[1] and restored.noise_multiplier == sigma


def test_client_refuses_once_the_budget_is_spent(tiny_cfg):
    cfg = tiny_cfg
    model, _ = models.build_model(cfg)
    arrays, state = models.to_arrays(model), RecordDict()
    for server_round in (1, 2):  # the planned run spends the whole budget
        client.train(cfg, arrays, state, node_config={"partition-id": 1, "num-partitions": 2}, server_round=server_round)
    spent = PrivacyAccount.from_record(state.config_records[privacy.STATE_KEY])
    reply = client.train(cfg, arrays, state, node_config={"partition-id": 1, "num-partitions": 2}, server_round=3)
    assert client.ARRAYS not in reply.array_records
    assert "refusing to train" in reply[client.STATUS]["refused"]
    assert reply[client.METRICS]["num-examples"] == 0
    assert reply[client.METRICS]["steps"] == spent.steps  # nothing more was spent
    assert PrivacyAccount.from_record(state.config_records[privacy.STATE_KEY]).steps == spent.steps


def test_non_private_training_uses_the_same_path(tiny_cfg):
    cfg = OmegaConf.merge(tiny_cfg, {"privacy": {"target_epsilon": None}})
    model, _ = models.build_model(cfg)
    state = RecordDict()
    reply = client.train(cfg, models.to_arrays(model), state, node_config={"partition-id": 0, "num-partitions": 2}, server_round=1)
    metrics = reply[client.METRICS]
    assert math.isinf(metrics["epsilon"]) and metrics["noise_multiplier"] == 0.0 and metrics["steps"] > 0
    assert isinstance(state.config_records[privacy.STATE_KEY], ConfigRecord)
