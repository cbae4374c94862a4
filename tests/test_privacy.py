"""DP-SGD behaviour: clipping, noise scale, calibration, run-long accounting, budget refusals."""

import json
import math

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict
from omegaconf import OmegaConf

from dplora import client, config, data, models, privacy, protocol
from dplora.privacy import BudgetExhausted, PrivacyAccount
from dplora.train import sequence_losses, train_round


def _account(cfg, q=0.25, **changes):
    steps = privacy.steps_per_round(q, cfg.train.local_epochs)
    account = PrivacyAccount.plan(cfg.privacy, q, cfg.num_rounds * steps)
    for k, v in changes.items():
        setattr(account, k, v)
    return account


def _private(account, model, dataset, batch_size=16, steps=1, mode="hooks"):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    return account.make_private(model, optimizer, dataset, batch_size, steps, mode)


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
@pytest.mark.parametrize("target", [1.0, 8.0])
def test_calibrated_noise_meets_target_within_5_percent(accountant, target):
    cfg = OmegaConf.create({"target_epsilon": target, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": accountant})
    q = privacy.sample_rate(32, 775)
    account = PrivacyAccount.plan(cfg, q, 3 * privacy.steps_per_round(q, 1))
    assert account.planned_steps == 3 * math.ceil(775 / 32)
    eps = account.epsilon(account.planned_steps)
    assert 0.95 * target <= eps <= target
    # a round more than planned goes over budget, and the account refuses it
    account.steps = account.planned_steps
    with pytest.raises(BudgetExhausted, match="budget"):
        account.check_budget(privacy.steps_per_round(q, 1))


def test_more_noise_for_smaller_epsilon():
    sigmas = []
    for eps in (1.0, 4.0, 8.0):
        cfg = OmegaConf.create({"target_epsilon": eps, "delta": 1e-5, "max_grad_norm": 1.0, "accountant": "prv"})
        sigmas.append(PrivacyAccount.plan(cfg, 0.05, 40).noise_multiplier)
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0


def test_per_example_clipping_bound_holds(tiny_cfg):
    cfg = tiny_cfg
    model, tok = models.build_model(cfg)
    train_set = data.encode(data.load_split(cfg.dataset, "train").select(range(8)), tok, cfg)
    clip = 1e-3  # far below the raw per-example gradient norms, so clipping is active
    account = _account(cfg, noise_multiplier=0.0, max_grad_norm=clip)
    module, optimizer, _, _, _ = _private(account, model, train_set, batch_size=4)
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
    account = _account(cfg, noise_multiplier=sigma, max_grad_norm=0.5)
    module, optimizer, _, _, _ = _private(account, model, train_set, batch_size=cfg.train.batch_size)
    batch = [t[:16] for t in train_set.tensors]
    optimizer.zero_grad()
    (0.0 * sequence_losses(module, batch, cfg.model.task)).mean().backward()
    optimizer.pre_step()  # clip, add noise, scale
    grad = torch.cat([p.grad.flatten() for p in optimizer.params])
    expected = sigma * 0.5 / cfg.train.batch_size  # divided by the public expected batch size
    assert optimizer.expected_batch_size == cfg.train.batch_size
    assert grad.numel() > 5000
    assert abs(float(grad.std()) / expected - 1) < 0.05
    assert abs(float(grad.mean())) < 3 * expected / math.sqrt(grad.numel())


def test_lora_weights_change_after_a_dp_step_and_base_does_not(tiny_cfg):
    cfg = tiny_cfg
    model, tok = models.build_model(cfg)
    train_set = data.encode(data.load_split(cfg.dataset, "train"), tok, cfg)
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = models.adapter_state(model)
    account = _account(cfg)
    assert account.private and account.noise_multiplier > 0
    steps = privacy.steps_per_round(account.sample_rate, cfg.train.local_epochs)
    result = train_round(model, train_set, cfg, account, seed=0, steps=steps)
    after = models.adapter_state(model)
    assert result["steps"] == account.steps == steps == 4
    assert all(before[k].abs().sum() == 0 for k in before if "lora_B" in k)  # peft starts B at zero
    assert all(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "functorch"])
def test_every_mode_steps_through_empty_poisson_batches(tiny_cfg, mode):
    """Four records at q=0.1: two of three batches are empty. Each is still a DP step (noise, accountant)."""
    cfg = OmegaConf.merge(tiny_cfg, {"privacy": {"grad_sample_mode": mode}})
    model, tok = models.build_model(cfg)
    train_set = data.encode(data.load_split(cfg.dataset, "train").select(range(4)), tok, cfg)
    account = _account(cfg, q=0.1)
    before = models.adapter_state(model)
    result = train_round(model, train_set, cfg, account, seed=0, steps=12)
    assert result["steps"] == account.steps == 12  # planned and taken agree; every empty batch counted
    after = models.adapter_state(model)
    assert all(not torch.equal(before[k], after[k]) for k in before)  # noise reached every tensor

    module, optimizer, _, accountant, _ = _private(_account(cfg, q=0.1), model, train_set, mode=mode)
    optimizer.zero_grad()
    privacy.empty_gradients(optimizer)  # a batch with no example at all
    optimizer.step()
    assert [n for _, _, n in accountant.history] == [1]
    module._close()


@pytest.mark.parametrize("n, q, epochs", [(5889, 64 / 5889, 1), (775, 64 / 775, 2), (60, 0.3, 1)])
def test_planned_steps_are_the_steps_taken(tiny_cfg, n, q, epochs):
    """Calibration, the budget check and the loop count the same steps: ceil(local_epochs / q) per round."""
    steps = privacy.steps_per_round(q, epochs)
    assert steps == math.ceil(epochs / q - 1e-9)
    batches = list(privacy.poisson_batches(torch.utils.data.TensorDataset(torch.arange(n)), q, steps))
    assert len(batches) == steps
    mean = sum(len(b[0]) for b in batches) / steps
    assert abs(mean - q * n) < 5 * math.sqrt(q * n / steps) + 1


def test_neighbouring_datasets_give_replies_with_identical_metadata(tiny_cfg, tmp_path):
    """An owner with N and with N+1 records: the same privacy record, sample rate, steps and normalization;
    nothing in the reply but the DP-trained arrays can differ, and the reply holds no record count."""
    replies, normalizers = [], []
    for n in (30, 31):
        path = tmp_path / f"owner-{n}.jsonl"
        path.write_text("".join(json.dumps({"text": f"review {i} is fine", "label": ["negative", "positive"][i % 2]})
                                + "\n" for i in range(n)))
        node = {"data-path": str(path), "privacy-ledger": str(tmp_path / f"ledger-{n}.json"), "privacy-budget": 100}
        cfg = OmegaConf.merge(tiny_cfg, {"train": {"sample_rate": 0.25}})
        model, _ = models.build_model(cfg)
        original = privacy.PrivacyAccount.make_private

        def spy(self, *args, original=original, **kwargs):
            out = original(self, *args, **kwargs)
            normalizers.append(out[1].expected_batch_size)
            return out
        privacy.PrivacyAccount.make_private = spy
        try:
            replies.append(client.train(cfg, models.to_arrays(model), RecordDict(), node_config=node,
                                        server_round=1, run_key="r"))
        finally:
            privacy.PrivacyAccount.make_private = original
    small, large = replies
    assert dict(small[protocol.METRICS]) == dict(large[protocol.METRICS])
    assert set(small[protocol.METRICS]) == {"epsilon", "noise_multiplier", "sample_rate", "steps", "delta"}
    assert set(small.keys()) == set(large.keys()) == {protocol.ARRAYS, protocol.METRICS}
    assert normalizers == [tiny_cfg.train.batch_size] * 2  # not int(N x q)
    a, b = small[protocol.ARRAYS].to_torch_state_dict(), large[protocol.ARRAYS].to_torch_state_dict()
    assert {k: (v.shape, v.dtype) for k, v in a.items()} == {k: (v.shape, v.dtype) for k, v in b.items()}


def test_epsilon_across_rounds_is_one_accountant_not_a_sum(tiny_cfg):
    """Two rounds through the real client path, with the account kept in a context.state RecordDict."""
    cfg = tiny_cfg
    model, _ = models.build_model(cfg)
    arrays, state = models.to_arrays(model), RecordDict()
    eps, steps = [], []
    for server_round in (1, 2):
        reply = client.train(cfg, arrays, state, node_config={"partition-id": 0, "num-partitions": 2}, server_round=server_round)
        metrics = reply[protocol.METRICS]
        eps.append(metrics["epsilon"])
        steps.append(metrics["steps"])
        arrays = reply[protocol.ARRAYS]
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
    assert protocol.ARRAYS not in reply.array_records
    assert "refusing to train" in reply[protocol.STATUS]["refused"]
    assert "num-examples" not in reply[protocol.METRICS]
    assert reply[protocol.METRICS]["steps"] == spent.steps  # nothing more was spent
    assert PrivacyAccount.from_record(state.config_records[privacy.STATE_KEY]).steps == spent.steps


def test_non_private_training_uses_the_same_path(tiny_cfg):
    cfg = OmegaConf.merge(tiny_cfg, {"privacy": {"target_epsilon": None}})
    model, _ = models.build_model(cfg)
    state = RecordDict()
    reply = client.train(cfg, models.to_arrays(model), state, node_config={"partition-id": 0, "num-partitions": 2}, server_round=1)
    metrics = reply[protocol.METRICS]
    assert math.isinf(metrics["epsilon"]) and metrics["noise_multiplier"] == 0.0 and metrics["steps"] > 0
    assert isinstance(state.config_records[privacy.STATE_KEY], ConfigRecord)


@pytest.mark.parametrize("mode", ["hooks", "ghost", "functorch"])
@pytest.mark.parametrize("model", ["tiny-llama", "minilm"])
def test_length_bucketed_step_is_the_one_pass_step(monkeypatch, mode, model):
    """The same batch (q = 1: every record) and the same noise draw: length-sorted micro-batches of 5 with one
    noisy step give the update that one pass over the whole batch gives."""
    monkeypatch.setattr(privacy, "_secret_generator", lambda: torch.Generator().manual_seed(7))
    updates = []
    for micro in (5, 1000):
        cfg = config.compose(f"model={model} recipe=plain dataset.num_train=23 dataset.num_test=4 "
                             f"train.sample_rate=1.0 train.micro_batch_size={micro} train.optimizer=sgd "
                             f"train.momentum=0 train.learning_rate=1.0 privacy.grad_sample_mode={mode}")
        net, tok = models.build_model(cfg)
        for module in net.modules():  # MiniLM's dropout draws differently per micro-batch: not the DP mechanism
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        train_set = data.encode(data.load_split(cfg.dataset, "train"), tok, cfg)
        before = models.adapter_state(net)
        account = _account(cfg, q=1.0)
        train_round(net, train_set, cfg, account, seed=0, steps=1)
        assert account.steps == 1  # one DP step for the whole batch, however many micro-batches
        after = models.adapter_state(net)
        updates.append(torch.cat([(after[k] - before[k]).flatten() for k in sorted(before)]))
    bucketed, one_pass = updates
    assert one_pass.abs().max() > 0
    torch.testing.assert_close(bucketed, one_pass, rtol=1e-4, atol=1e-6)


def test_micro_batches_cover_the_batch_sorted_and_trimmed():
    from dplora.train import micro_batches
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]])
    batch = [torch.arange(16).view(4, 4), mask, torch.tensor([0, 1, 2, 3])]
    parts = micro_batches(batch, 2, torch.device("cpu"))
    assert [p[2].tolist() for p in parts] == [[1, 3], [0, 2]]  # longest first
    assert [p[0].shape for p in parts] == [(2, 4), (2, 2)]  # each trimmed to its own longest example


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_verify_privacy_allows_prv_its_eps_error_above_and_nothing_below(accountant, monkeypatch):
    """scripts/verify_privacy.py at a small epsilon (one round at epsilon 1): Opacus' own epsilon for the record
    re-derives with dp_accounting (PRV's upper bound lying up to its eps_error, 0.01, above the PLD one; RDP's
    within 2% of dp_accounting's RDP, 14% above PLD here); a reported epsilon below the re-derived one by more
    than the tolerance, or PRV's slack claimed by the RDP accountant, is a mismatch."""
    from experiments import verify_privacy

    sigma, q, steps, delta = 2.5, 0.05, 20, 1e-5
    independent = verify_privacy.pld_epsilon if accountant == "prv" else verify_privacy.rdp_epsilon
    derived, reported = independent(sigma, q, steps, delta), privacy.epsilon(sigma, q, steps, delta, accountant)

    def check(epsilon, accountant=accountant):
        record = {"node_id": 1, "epsilon": epsilon, "noise_multiplier": sigma, "sample_rate": q, "steps": steps,
                  "delta": delta}
        metrics = {"config": {"privacy": {"target_epsilon": 1.0, "accountant": accountant}},
                   "rounds": [{"round": 1, "clients": [record]}]}
        return verify_privacy.verify(metrics, 0.02)[0]["ok"]

    assert 0.2 < derived < 0.5 and check(reported)
    if accountant == "prv":
        assert check(derived * 1.02 + 0.0099) and not check(derived * 1.02 + 0.0101)
    else:
        assert check(derived * 1.02) and not check(derived * 1.02 + 0.0099)
        assert verify_privacy.pld_epsilon(sigma, q, steps, delta) < 0.9 * derived
    assert not check(derived * 0.97)  # understating what was spent
    assert not check(1.01)  # above the run's target


def test_the_calibration_memo_gives_opacus_sigma_and_never_trusts_an_entry_that_breaks_the_budget(tmp_path,
                                                                                                   monkeypatch):
    from opacus.accountants.utils import get_noise_multiplier

    from dplora import calibration
    from dplora.privacy import epsilon

    memo = tmp_path / "memo.json"
    monkeypatch.setenv("DPLORA_CALIBRATION_CACHE", str(memo))
    monkeypatch.setattr(calibration, "_verified", {})
    args = (4.0, 1e-5, 0.2, 30, "rdp")
    direct = get_noise_multiplier(target_epsilon=4.0, target_delta=1e-5, sample_rate=0.2, steps=30,
                                  accountant="rdp", epsilon_tolerance=0.02)
    assert calibration.noise_multiplier(*args) == direct and memo.is_file()
    (key,) = json.loads(memo.read_text())
    memo.write_text(json.dumps({key: direct / 3}))  # an edited entry: far too little noise
    monkeypatch.setattr(calibration, "_verified", {})
    assert calibration.noise_multiplier(*args) == direct  # checked, refused, recomputed
    assert json.loads(memo.read_text())[key] == direct and epsilon(direct, 0.2, 30, 1e-5, "rdp") <= 4.0
    monkeypatch.setenv("DPLORA_CALIBRATION_CACHE", str(tmp_path / "file" / "under" / "a" / "file"))
    (tmp_path / "file").write_text("not a folder")  # an unwritable cache costs time, not the run
    monkeypatch.setattr(calibration, "_verified", {})
    assert calibration.noise_multiplier(*args) == direct
