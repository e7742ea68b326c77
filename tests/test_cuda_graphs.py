import contextlib
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

import msfp
from msfp import cuda_graphs
from msfp.cuda_graphs import GraphedDenoiser
from msfp.fp8 import convert_to_fp8
from msfp.samples import generate
from msfp.sampling import sample
from msfp.talora import add_talora
from tiny_models import scheduler, sdxl_cond, tiny_sdxl_unet, tiny_unet

aten = torch.ops.aten
# Operators whose CUDA implementations read GPU data back to the host, which a CUDA graph capture cannot do.
HOST_READS = {aten._local_scalar_dense.default, aten.bincount.default, aten.nonzero.default, aten.equal.default,
              aten.is_nonzero.default, aten.masked_select.default, aten._unique2.default, aten.unique_dim.default,
              aten.unique_consecutive.default}
# A tensor made from Python data (torch.tensor, torch.as_tensor of a list): on a GPU, an upload, which a capture
# cannot do either.
HOST_UPLOADS = {aten.lift_fresh.default}


class HostTransfer(AssertionError):
    pass


class _ForbidHostTransfers(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise HostTransfer(f"{func} reads GPU data back to the host")
        if func in HOST_UPLOADS:
            raise HostTransfer(f"{func} makes a tensor from host data, which a GPU would have to upload")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_transfers():
    """What a CUDA graph capture forbids, checked on the CPU: no operator that reads data back or uploads it, no
    ``tolist``."""
    with _ForbidHostTransfers(), mock.patch.object(torch.Tensor, "tolist", side_effect=HostTransfer("tolist")):
        yield


def routed_model(fp8: bool, use_kernels: bool | None = False):
    """A tiny W4A4 UNet with four distinct TALoRA LoRAs, routed by timestep (the router's contiguous start:
    t < 250 → LoRA 0, … t ≥ 750 → LoRA 3), and eight activation scales per layer, one per eighth of the timesteps,
    so that one graph (one route) serves two scales, which it must pick by the timestep it is given, not the one it
    was captured with; ``fp8``: on the FP8 path (``use_kernels`` as convert_to_fp8's)."""
    config = msfp.QuantConfig.preset("w4a4-msfp")
    config.act_timestep_groups = 8
    q = msfp.quantize(tiny_unet(), config)
    add_talora(q, num_loras=4, rank=2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in q.modules():
            if getattr(m, "lora", None) is not None:
                m.lora.B.copy_(torch.randn(m.lora.B.shape, generator=gen) * 0.3)
                m.act_quantizer.scale.mul_(torch.linspace(0.5, 2.0, 8))
    if fp8:
        convert_to_fp8(q, use_kernels=use_kernels)
    return q.eval()


class StandInCapture:
    """CUDA graph capture emulated on the CPU: the captured call runs under no_host_transfers, and a "replay" reruns it
    into the captured output, with the route group sizes the capture had (a graph holds them fixed) given to the
    model's ``context``. ``captures`` lists those sizes, one entry per capture."""

    def __init__(self):
        self.captures, self.context = [], None

    def __call__(self, call, warmup, pool):
        for _ in range(warmup):
            call()
        context = self.context
        known = None if context is None else context.known_route_counts
        with no_host_transfers():
            output = call()

        def replay():
            if context is not None:
                context.known_route_counts = known
            try:
                with no_host_transfers():
                    output.copy_(call())
            finally:
                if context is not None:
                    context.known_route_counts = None

        self.captures.append(known)
        return replay, output


@pytest.fixture
def stand_in_capture(monkeypatch):
    capture = StandInCapture()
    monkeypatch.setattr(cuda_graphs, "capture", capture)
    monkeypatch.setattr(cuda_graphs, "_new_pool", lambda: "pool")
    monkeypatch.setattr(cuda_graphs, "_check_on_cuda", lambda model: None)
    return capture


def test_a_routed_forward_reads_its_route_groups_back():
    # What the wrapper works around (and what shows the check below can fail).
    q = routed_model(fp8=True)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 900])
    with torch.no_grad(), no_host_transfers(), pytest.raises(HostTransfer, match="bincount"):
        q(x, t)


@pytest.mark.parametrize("fp8", [False, True])
def test_graphed_calls_equal_eager_calls_with_one_graph_per_route_grouping(stand_in_capture, fp8):
    q = routed_model(fp8)
    stand_in_capture.context = q.msfp_context
    graphed = GraphedDenoiser(q)
    torch.manual_seed(0)
    calls = [torch.tensor([100, 100, 100]), torch.tensor([900, 900, 900]), torch.tensor([120, 130, 140]),
             torch.tensor([100, 600, 900]), torch.tensor([900, 600, 100]), torch.tensor([900, 910, 999])]
    with torch.no_grad():
        for t in calls:
            x = torch.randn(3, 1, 8, 8)
            got, want = graphed(x, t), q(x, t).sample
            assert torch.equal(got, want), t
    # Uniform t at LoRA 0, uniform at LoRA 3, and one sample each at LoRAs 0, 2, 3 (in either order): three graphs,
    # each captured without reading the GPU, with the group sizes given to it.
    assert stand_in_capture.captures == [[3, 0, 0, 0], [0, 0, 0, 3], [1, 0, 1, 1]]
    assert len(graphed.graphs) == 3


def test_each_call_gets_its_own_output_and_inputs_are_copied(stand_in_capture):
    q = tiny_unet()  # any denoiser
    graphed, x, t = GraphedDenoiser(q), torch.randn(2, 1, 8, 8), torch.tensor([10, 20])
    with torch.no_grad():
        first = graphed(x, t)
        kept = first.clone()
        x.add_(1.0)  # the graph read a copy; the next call copies the new values in
        second = graphed(x, 15)  # a scalar timestep, as diffusers models take it: its own kind of call
        third = graphed(x, t)
        want = q(x, t).sample
    assert torch.equal(first, kept) and not torch.equal(first, third)
    assert torch.equal(third, want)
    assert second.shape == first.shape and len(graphed.graphs) == 2


def test_unhashable_arguments_bad_warmup_and_wrapped_routes_are_refused(stand_in_capture):
    q = routed_model(fp8=False)
    with pytest.raises(TypeError, match="argument 'extra' is a list"):
        GraphedDenoiser(q)(torch.randn(1, 1, 8, 8), torch.tensor([1]), extra=[1, 2])
    # Tensors hash by identity: fresh ones in a tuple (ControlNet's residuals) captured a new graph on every call.
    with pytest.raises(TypeError, match="argument 'residuals' holds tensors inside a tuple; pass them as separate"):
        GraphedDenoiser(q)(torch.randn(1, 1, 8, 8), torch.tensor([1]), residuals=(torch.zeros(1), torch.zeros(1)))
    with pytest.raises(ValueError, match="warmup must be ≥ 1"):
        GraphedDenoiser(q, warmup=0)
    wrapper = torch.nn.Sequential()
    wrapper.add_module("unet", q)
    with pytest.raises(ValueError, match="unet routes its TALoRA LoRAs by timestep, which selects the graph; wrap "
                                         "unet itself"):
        GraphedDenoiser(wrapper)


def test_generate_with_guidance_graphs_the_model_inside_it(stand_in_capture, tmp_path):
    # msfp sample --guidance --cuda-graphs: the graphs wrap the denoiser, and classifier-free guidance calls it (with
    # the doubled batch and class labels); the images equal eager sampling's.
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=4, in_channels=1, out_channels=2,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=5).eval()
    common = dict(num_samples=4, num_inference_steps=3, batch_size=2, guidance=3.0, disable=True)
    eager = generate(dit, scheduler(), tmp_path / "eager.npz", **common)
    graphed = generate(dit, scheduler(), tmp_path / "graphed.npz", cuda_graphs=True, **common)
    assert np.array_equal(graphed["images"], eager["images"]) and np.array_equal(graphed["labels"], eager["labels"])
    assert stand_in_capture.captures == [None]  # both batches of 2 (4 rows with guidance): one graph


class _StubStream:
    def wait_stream(self, other):
        pass


class _StubGraph:
    def replay(self):
        pass


@pytest.fixture
def stub_cuda(monkeypatch):
    """The real :func:`cuda_graphs.capture` on the CPU: torch.cuda's streams and graphs do nothing (a "capture" is one
    more eager call)."""
    monkeypatch.setattr(torch.cuda, "Stream", _StubStream)
    monkeypatch.setattr(torch.cuda, "current_stream", _StubStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _StubGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
    monkeypatch.setattr(cuda_graphs, "_new_pool", lambda: "pool")
    monkeypatch.setattr(cuda_graphs, "_check_on_cuda", lambda model: None)


def test_a_model_error_in_the_warm_up_is_not_blamed_on_the_capture(stub_cuda):
    # It was relabelled "capturing … in a CUDA graph failed (sample without CUDA graphs …)", where eager sampling
    # fails the same way.
    q, x, t = tiny_unet(), torch.randn(2, 3, 8, 8), torch.tensor([1, 2])  # 3 channels for a 1-channel model
    graphed = GraphedDenoiser(q)
    with torch.no_grad(), pytest.raises(RuntimeError) as eager:
        q(x, t)
    with torch.no_grad(), pytest.raises(type(eager.value)) as got:
        graphed(x, t)
    assert str(got.value) == str(eager.value) and graphed.graphs == {}


def test_a_failed_capture_says_which_call(stub_cuda, monkeypatch):
    @contextlib.contextmanager
    def graph(graph, pool=None):
        yield
        raise RuntimeError("operation not permitted when stream is capturing")  # as the capture's end reports it

    monkeypatch.setattr(torch.cuda, "graph", graph)
    graphed = GraphedDenoiser(tiny_unet())
    with pytest.raises(RuntimeError, match=r"capturing UNet2DModel called with \{'sample': \(2, 1, 8, 8\), 'timestep': "
                                           r"\(2,\)\} in a CUDA graph failed \(sample without CUDA graphs.*not permitted"):
        graphed(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    assert graphed.graphs == {}



def test_a_tensor_input_off_the_models_device_is_named(stand_in_capture):
    # A CPU timestep for a GPU model failed inside the capture, with the generic capture message; "meta" stands in.
    graphed = GraphedDenoiser(tiny_unet())
    with torch.no_grad(), pytest.raises(ValueError, match="argument 'timestep' is on meta, but the model is on cpu; a "
                                                          "graph reads its tensor inputs on the model's device"):
        graphed(torch.randn(2, 1, 8, 8), torch.tensor([1, 2], device="meta"))
    assert graphed.graphs == {}


def test_nested_conditioning_is_copied_into_the_graph_entry_by_entry(stand_in_capture):
    # SDXL's added_cond_kwargs: a dict of tensors, refused before ("pass them as separate tensor arguments", which a
    # diffusers UNet cannot take).
    q = tiny_sdxl_unet()
    graphed, x, t = GraphedDenoiser(q), torch.randn(2, 4, 8, 8), torch.tensor([10, 700])
    with torch.no_grad():
        for seed in (0, 1, 0):  # new values of every entry, copied in
            cond = sdxl_cond(2, seed=seed)
            assert torch.equal(graphed(x, t, **cond), q(x, t, **cond).sample)
        assert len(graphed.graphs) == 1
        # The entries select the graph, in their order too: a model may read them in order, and a graph replays the
        # order it was captured with.
        reordered = sdxl_cond(2, seed=2)
        reordered["added_cond_kwargs"] = dict(reversed(reordered["added_cond_kwargs"].items()))
        extra = sdxl_cond(2, seed=3)
        extra["added_cond_kwargs"]["unread"] = torch.zeros(2, 1)  # (the UNet reads only the entries it needs)
        for cond in (reordered, extra, sdxl_cond(2, seed=4)):
            assert torch.equal(graphed(x, t, **cond), q(x, t, **cond).sample)
        assert len(graphed.graphs) == 3
        other = sdxl_cond(2)
        other["added_cond_kwargs"]["time_ids"] = other["added_cond_kwargs"]["time_ids"].to("meta")
        with pytest.raises(ValueError, match=r"argument added_cond_kwargs\['time_ids'\] is on meta, but the model is "
                                             "on cpu"):
            graphed(x, t, **other)
        with pytest.raises(TypeError, match=r"argument added_cond_kwargs\['scale'\] is a list, which cannot select"):
            graphed(x, t, encoder_hidden_states=torch.zeros(2, 3, 8), added_cond_kwargs={"scale": [1]})


def test_a_call_under_inference_mode_gets_its_own_graph(stand_in_capture):
    # Inference tensors captured first used to make the next no_grad call of that shape fail on their in-place
    # update.
    graphed = GraphedDenoiser(tiny_unet())
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
    with torch.inference_mode():
        first = graphed(x, t)
    with torch.no_grad():
        assert torch.equal(graphed(x, t), first)
    assert len(graphed.graphs) == 2


def test_the_device_check_looks_at_buffers_too():
    # An FP8-converted plain denoiser keeps codes and scales as buffers only: it used to be reported "on cpu".
    only_buffers = torch.nn.Module()
    only_buffers.register_buffer("codes", torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match="it is on meta"):
        GraphedDenoiser(only_buffers)


def test_sampling_with_cuda_graphs_needs_a_cuda_model():
    q = msfp.quantize(tiny_unet(), "w4a4-msfp").eval()
    with pytest.raises(ValueError, match="CUDA graphs need the model on a CUDA device; it is on cpu"):
        sample(q, scheduler(), num_samples=1, num_inference_steps=2, cuda_graphs=True, disable=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fp8", [False, True])
def test_sampling_from_cuda_graphs_equals_eager_sampling_on_gpu(fp8):
    # On a GPU with FP8 tensor cores the fp8 model runs the Triton kernels (on others, the emulated path): the
    # graphs replay the kernels of the eager calls, so the images should agree to the last bits. The check allows
    # 1e-5 (about 80 ulps at 1): it has not run on a GPU yet, and cuBLAS may pick other algorithms under capture.
    q = routed_model(fp8, use_kernels=None).cuda()
    common = dict(num_samples=6, num_inference_steps=8, batch_size=4, disable=True)  # two batch sizes: 4 and 2
    with torch.no_grad():
        eager = sample(q, scheduler(), **common)
        graphed = sample(q, scheduler(), cuda_graphs=True, **common)
    assert torch.allclose(graphed, eager, rtol=0, atol=1e-5), (graphed - eager).abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graphs_sharing_a_pool_replay_in_any_order_on_gpu():
    # Three graphs in one memory pool (uniform routes to LoRA 0 and 3, one sample each to LoRAs 0, 2, 3), replayed
    # in other orders than captured and at timesteps of other scale groups than captured with: a later capture may reuse an earlier one's freed intermediates, which is
    # harmless only because each replay writes before it reads and its output is copied out at once.
    q = routed_model(fp8=True, use_kernels=None).cuda()
    graphed = GraphedDenoiser(q)
    with torch.no_grad():
        for t in ([100, 100, 100], [900, 900, 900], [100, 600, 900], [900, 600, 100], [200, 200, 200],
                  [800, 800, 800], [130, 620, 990]):
            x, t = torch.randn(3, 1, 8, 8, device="cuda"), torch.tensor(t, device="cuda")
            got, want = graphed(x, t), q(x, t).sample
            assert torch.allclose(got, want, rtol=0, atol=1e-5), (t, (got - want).abs().max())
    assert len(graphed.graphs) == 3
