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


@pytest.mark.parametrize("ks", [[0, 1, 2, 3], [1, 2], [0, 2, 3], [3]])
def test_lora_bank_deltas_stack_the_chosen_updates(ks):
    bank = LoRABank((8, 4, 3, 3), num_loras=4, rank=2, seed=0)
    with torch.no_grad():
        bank.B.normal_()
    deltas = bank.deltas(ks)
    assert deltas.shape == (len(ks), 8, 4, 3, 3)
    for i, k in enumerate(ks):
        torch.testing.assert_close(deltas[i], bank.delta(k), rtol=1e-6, atol=0)


def test_lora_bank_bad_rank():
    with pytest.raises(ValueError, match="rank 5 must be in"):
        LoRABank((4, 3), rank=5)
    with pytest.raises(ValueError, match="num_loras"):
        TimestepRouter(0)


def saved_for_backward_bytes(out: torch.Tensor) -> int:
    """Bytes of the distinct tensors that ``out``'s autograd graph keeps for its backward pass."""
    storages, nodes, stack = {}, set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.add(node)
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if isinstance(t, torch.Tensor):
                        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sum(storages.values())


def test_routed_layer_keeps_its_inputs_for_backward_not_its_outputs():
    import msfp
    from msfp.surgery import quant_layers, set_quantizers_enabled

    q = msfp.quantize(torch.nn.Sequential(torch.nn.Linear(4, 256)), "w4a4-msfp")
    set_quantizers_enabled(q, False)
    layer = quant_layers(q)["0"]
    layer.lora = LoRABank(layer.weight.shape, num_loras=4, rank=2, seed=0)
    x = torch.randn(8, 64, 4)  # outputs 64× the inputs' size: a kept copy of them would dominate

    def saved(choice):
        q.msfp_context.set_route(torch.nn.functional.one_hot(choice, 4).float().requires_grad_())
        out = layer(x)
        return saved_for_backward_bytes(out), out.numel() * out.element_size()

    one_lora, out_bytes = saved(torch.zeros(8, dtype=torch.long))
    four_loras, _ = saved(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    # The rows of each group and each chosen weight set are needed (small here); an index_copy into place kept
    # every group's output as well (+22% for a TALoRA training step of the default model).
    assert four_loras < one_lora + out_bytes / 4, (four_loras, one_lora, out_bytes)
