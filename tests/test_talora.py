import pytest
import torch

from msfp.talora import LoRABank, TimestepRouter


@pytest.mark.parametrize("num_loras", [1, 2, 4])
def test_router_initialises_to_contiguous_intervals(num_loras):
    router = TimestepRouter(num_loras=num_loras, num_train_timesteps=1000)
    assert router.init_contiguous(seed=0) == 1.0
    t = torch.arange(1000)
    assignment = router.assignment(t)
    assert torch.equal(assignment, t * num_loras // 1000)
    assert torch.all(assignment[1:] >= assignment[:-1])  # contiguous and ordered


def test_router_init_is_deterministic():
    a, b = TimestepRouter(4), TimestepRouter(4)
    a.init_contiguous(seed=3)
    b.init_contiguous(seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_router_is_hard_per_sample_and_passes_gradients():
    router = TimestepRouter(4)
    router.init_contiguous()
    t = torch.tensor([10, 990, 400, 10])
    onehot = router(t)
    assert torch.equal(onehot.detach(), torch.nn.functional.one_hot(torch.tensor([0, 3, 1, 0]), 4).float())
    # Straight-through: a loss on the routed mix of per-LoRA outputs reaches the MLP.
    per_lora_outputs = torch.randn(4, 4)
    (onehot * per_lora_outputs).sum().backward()
    grads = [p.grad for p in router.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_lora_bank_starts_at_zero_and_reshapes():
    bank = LoRABank((8, 4, 3, 3), num_loras=3, rank=2, seed=0)
    for k in range(3):
        d = bank.delta(k)
        assert d.shape == (8, 4, 3, 3) and torch.count_nonzero(d) == 0
    with torch.no_grad():
        bank.B.normal_()
    assert not torch.equal(bank.delta(0), bank.delta(1))
    assert torch.linalg.matrix_rank(bank.delta(2).reshape(8, -1)) <= 2


def test_lora_bank_bad_rank():
    with pytest.raises(ValueError, match="rank 5 must be in"):
        LoRABank((4, 3), rank=5)
    with pytest.raises(ValueError, match="num_loras"):
        TimestepRouter(0)
