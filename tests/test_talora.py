import numpy as np
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


@pytest.mark.parametrize("num_loras", [1, 4])
def test_lora_assignment_takes_a_scalar_timestep(num_loras):
    from types import SimpleNamespace

    from msfp.talora import lora_assignment

    router = TimestepRouter(num_loras)
    router.init_contiguous(seed=0)
    model = SimpleNamespace(msfp_router=router)
    # A single-LoRA model's took len() of it: "len() of a 0-d tensor", while K > 1 gave a one-element list.
    for t in (999, torch.tensor(999), np.int64(999)):
        assert lora_assignment(model, t) == [num_loras - 1]
    assert lora_assignment(model, [0, 999]) == [0, num_loras - 1]


def test_router_init_is_deterministic():
    a, b = TimestepRouter(4), TimestepRouter(4)
    a.init_contiguous(seed=3)
    b.init_contiguous(seed=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    # Building one draws nothing from the global RNG (loading a TALoRA checkpoint changed it), and the unused router
    # of a single-LoRA model, which is saved with it, was whatever that RNG gave.
    torch.manual_seed(0)
    expected = torch.randn(3)
    torch.manual_seed(0)
    single = TimestepRouter(1)
    assert torch.equal(torch.randn(3), expected)
    torch.manual_seed(1)
    assert all(torch.equal(p, q) for p, q in zip(single.parameters(), TimestepRouter(1).parameters()))


def test_the_routers_choice_does_not_depend_on_the_callers_autocast():
    # A pipeline run under torch.autocast computed the logits in bfloat16: a trained boundary next to a timestep
    # sent it to another LoRA than without autocast.
    router = TimestepRouter(4)
    router.init_contiguous()
    with torch.no_grad():
        router.mlp[2].bias[1] -= 7.94  # a boundary moved by training to just beside t = 255
    t = torch.arange(1000)
    plain = router.assignment(t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert router.logits(t).dtype == torch.float32
        assert torch.equal(router.assignment(t), plain) and torch.equal(router(t).argmax(1), plain)


def test_router_is_hard_per_sample_and_passes_gradients():
    router = TimestepRouter(4)
    router.init_contiguous()
    t = torch.tensor([10, 990, 400, 10])
    onehot = router(t)
    assert torch.equal(onehot.detach(), torch.nn.functional.one_hot(torch.tensor([0, 3, 1, 0]), 4).float())
    # Exactly 0 and 1 at every timestep: (hard + soft) - soft gave 0.99999994 at some, scaling those outputs.
    gates = router(torch.arange(1000)).detach()
    assert torch.equal(gates, torch.nn.functional.one_hot(gates.argmax(1), 4).float())
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


def test_the_router_gets_the_straight_through_gradient_of_the_mixture_of_all_loras(monkeypatch):
    """SPEC §2.3: a hard choice with a straight-through estimator, i.e. the gradient of Σ_j r_j·y_j. Only the chosen
    LoRA's term used to reach the router: nonzero where all LoRAs are equal (the start of fine-tuning), and with
    cosine ±1 to the right gradient, sign by chance, otherwise."""
    import copy

    import msfp
    from msfp.layers import QuantLayer
    from msfp.surgery import quant_layers
    from msfp.talora import add_talora
    from tiny_models import tiny_unet

    def mixture(self, x):  # every LoRA's output, weighted by the route: the textbook estimator, K times the work
        x = self.act_quantizer(x, self.context.groups(self.act_quantizer.num_groups, x.shape[0], self.name))
        route = self.context.route
        outs = torch.stack([self._op(x, self.quantized_weight(k)) for k in range(self.num_weight_sets)], 1)
        return (route.view(*route.shape, *[1] * (outs.dim() - 2)) * outs).sum(1)

    q = msfp.quantize(tiny_unet(), "w4a4-msfp")
    for layer in quant_layers(q).values():  # uncalibrated scales are fine: the estimator is what is compared
        layer.act_quantizer.scale.data.fill_(0.05)
        layer.weight_quantizer.scale.data.fill_(0.02)
    add_talora(q, num_loras=4, rank=2)
    x, t, target = torch.randn(8, 1, 8, 8), torch.tensor([10, 200, 300, 400, 600, 700, 900, 990]), torch.randn(8, 1, 8, 8)

    def router_gradient(model):
        model.msfp_router.zero_grad()
        (model(x, t).sample - target).pow(2).mean().backward()
        return torch.cat([p.grad.flatten() for p in model.msfp_router.parameters()])

    scale = None
    for std in (0.05, 0.0):  # distinct LoRAs, then identical ones (as fine-tuning starts: nothing to choose between)
        model = copy.deepcopy(q)
        torch.manual_seed(1)
        for layer in quant_layers(model).values():
            torch.nn.init.normal_(layer.lora.B, std=std)
        got = router_gradient(model)
        with monkeypatch.context() as patch:
            patch.setattr(QuantLayer, "forward", mixture)
            expected = router_gradient(model)
        scale = expected.abs().max() if scale is None else scale
        assert (got - expected).abs().max() < 1e-3 * scale, std


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_routed_model_trains_in_its_dtype(dtype):
    import msfp
    from msfp.surgery import quant_layers
    from msfp.talora import add_talora
    from tiny_models import tiny_unet

    q = msfp.quantize(tiny_unet().to(dtype), "w4a4-msfp")
    for layer in quant_layers(q).values():  # stand-in scales: no calibration needed to run it
        layer.act_quantizer.scale.data.fill_(0.05)
        layer.weight_quantizer.scale.data.fill_(0.02)
    router = add_talora(q, num_loras=4, rank=2)
    out = q(torch.randn(4, 1, 8, 8, dtype=dtype), torch.tensor([10, 300, 600, 900])).sample
    # The float32 router's zero-valued gradient path used to promote the output, and the next layer failed.
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert next(router.parameters()).grad is not None


def test_each_lora_bank_is_made_beside_its_weight():
    import msfp
    from msfp.surgery import quant_layers
    from msfp.talora import add_talora
    from tiny_models import tiny_unet

    q = msfp.quantize(tiny_unet(), "w4a4-msfp")
    quant_layers(q)["conv_out"].to("meta")  # a model split across devices ("meta" stands in for a second GPU)
    add_talora(q, num_loras=2, rank=2)
    for name, layer in quant_layers(q).items():
        assert {p.device.type for p in layer.lora.parameters()} == {layer.weight.device.type}, name
    assert quant_layers(q)["conv_out"].lora.A.device.type == "meta"


def test_a_refused_or_interrupted_add_talora_leaves_no_loras(monkeypatch):
    # The router and its hook came first: a failure while building the banks left them, and the next call was
    # refused ("already has TALoRA LoRAs").
    import msfp
    import msfp.talora
    from msfp.surgery import quant_layers
    from msfp.talora import add_talora
    from tiny_models import tiny_unet

    q = msfp.quantize(tiny_unet(), "w4a4-msfp")
    with pytest.raises(ValueError, match=r"add_talora: rank must be a whole number ≥ 1, got 0"):
        add_talora(q, num_loras=4, rank=0)
    with pytest.raises(ValueError, match=r"add_talora: num_loras must be a whole number ≥ 1, got 2.0"):
        add_talora(q, num_loras=2.0, rank=4)  # was a TypeError from nn.Linear, after the checks
    built = []

    def interrupted(*args, **kwargs):
        if len(built) == 3:
            raise KeyboardInterrupt
        built.append(1)
        return LoRABank(*args, **kwargs)

    monkeypatch.setattr(msfp.talora, "LoRABank", interrupted)
    with pytest.raises(KeyboardInterrupt):
        add_talora(q, num_loras=4, rank=2)
    assert not hasattr(q, "msfp_router") and all(layer.lora is None for layer in quant_layers(q).values())
    assert len(q._forward_pre_hooks) == 1  # msfp.quantize's timestep hook, not the routing one
    monkeypatch.undo()
    add_talora(q, num_loras=4, rank=np.int64(2))  # any integer, recorded as a plain int (JSON in checkpoints)
    assert type(q.msfp_talora["rank"]) is int
    q(torch.randn(2, 1, 8, 8), torch.tensor([10, 900]))
