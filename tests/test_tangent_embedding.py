"""mtcore/model/tangent_embedding.py: the fused value-and-derivative embedding path gives the
forces and the parameter gradients autograd gives, and is taken only where it is exact."""

from __future__ import annotations

import pytest
import torch

from helpers import model_with_stats, predict, small_input, water_frame
from mtcore.model import mlp, tangent_embedding
from mtcore.model.mlp import EmbeddingNet, new_generator

pytestmark = pytest.mark.skipif(tangent_embedding.status() != "on", reason=f"fused path {tangent_embedding.status()}")


def force_loss_gradients(net: EmbeddingNet, s0: torch.Tensor, fused: bool, energy_only: bool = False):
    """Parameter gradients of E + |dE/ds|² for E a quadratic of the net's output (dE/dG depends on
    G, so the force term's second-order path through G is exercised too)."""
    g = torch.Generator().manual_seed(3)
    mix = torch.randn(net.n_out, 3, generator=g, dtype=s0.dtype)
    s = s0.clone().requires_grad_(True)
    net.zero_grad(set_to_none=True)
    with tangent_embedding.force_training(fused):
        out = net(s)
    energy = ((out @ mix) ** 2).sum() / s.shape[0]
    (force,) = torch.autograd.grad(energy, s, create_graph=True)
    loss = energy if energy_only else energy + (force ** 2).sum()
    params = list(net.parameters())
    loss.backward(inputs=params)
    return out.detach(), force.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("neuron", [[25, 50, 100], [4, 4, 8, 8], [1, 2, 3]])  # plain/doubling, residual, odd widths
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_values_forces_and_gradients_match_autograd(neuron, dtype):
    net = EmbeddingNet(1, neuron, "tanh", False, dtype, new_generator(5))
    s0 = (torch.rand(2000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4 - 0.5).to(dtype)
    g_out, g_force, g_grads = force_loss_gradients(net, s0, fused=False)
    f_out, f_force, f_grads = force_loss_gradients(net, s0, fused=True)
    rel = 1e-12 if dtype == torch.float64 else 2e-4
    # the value: tanh as 2σ(2z) − 1 like the plain net's, with e^x of the fused loop's own (as
    # accurate as torch's, not the same bits): a few ulp of the output's scale per layer
    assert torch.allclose(f_out, g_out, rtol=0.0, atol=8 * torch.finfo(dtype).eps * float(g_out.abs().max()))
    assert torch.allclose(f_force, g_force, rtol=rel, atol=rel * float(g_force.abs().max()))
    for name, (a, b) in zip([n for n, _ in net.named_parameters()], zip(g_grads, f_grads)):
        assert float((a - b).abs().max()) <= rel * float(a.abs().max()), name


def test_energy_only_loss_needs_no_tangent_gradient():
    net = EmbeddingNet(1, [8, 16, 32], "tanh", False, torch.float64, new_generator(2))
    s0 = torch.linspace(-0.5, 3.0, 500, dtype=torch.float64).unsqueeze(1)
    _, _, plain = force_loss_gradients(net, s0, fused=False, energy_only=True)
    _, _, fused = force_loss_gradients(net, s0, fused=True, energy_only=True)
    for a, b in zip(plain, fused):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("neuron", [[25, 50, 100], [4, 4, 8, 8], [1, 2, 3]])
@pytest.mark.parametrize("energy_only", [False, True])
def test_tiles_give_the_numbers_of_one_pass(monkeypatch, neuron, energy_only):
    """The backward runs the rows through the layers in tiles (the last one shorter): the values
    and forces as all rows at once (the forward is not tiled), the parameter gradients (sums
    over tiles) to rounding."""
    net = EmbeddingNet(1, neuron, "tanh", False, torch.float64, new_generator(6))
    s0 = torch.rand(2000, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 4 - 0.5
    monkeypatch.setattr(tangent_embedding, "TILE_BYTES", 1 << 50)
    whole = force_loss_gradients(net, s0, fused=True, energy_only=energy_only)
    monkeypatch.setattr(tangent_embedding, "TILE_BYTES", 96 * max(neuron) * 8)  # 96 rows per thread
    assert len(tangent_embedding._tiles(2000, max(neuron), 8)) > 2
    tiled = force_loss_gradients(net, s0, fused=True, energy_only=energy_only)
    for a, b in zip(whole[:2], tiled[:2]):  # the same code row by row: equal to an ulp or two
        assert float((a - b).abs().max()) <= 4 * torch.finfo(a.dtype).eps * float(a.abs().max())
    for a, b in zip(whole[2], tiled[2]):
        assert float((a - b).abs().max()) <= 1e-13 * float(a.abs().max())


@pytest.mark.parametrize("openmp", [True, False])
def test_rows_split_over_threads_give_the_same_numbers(monkeypatch, openmp):
    """Rows split over torch's OpenMP threads inside the kernels (where built so) or over Python
    threads give one thread's numbers."""
    if openmp and not tangent_embedding.KERNELS.parallel:
        pytest.skip("kernels built without OpenMP here (no GNU OpenMP runtime in the process)")
    net = EmbeddingNet(1, [8, 16, 32], "tanh", False, torch.float64, new_generator(4))
    s0 = torch.linspace(-0.5, 3.0, 3001, dtype=torch.float64).unsqueeze(1)
    monkeypatch.setattr(tangent_embedding.KERNELS, "parallel", openmp)
    monkeypatch.setattr(tangent_embedding, "MIN_ROWS_PER_THREAD", 100)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = force_loss_gradients(net, s0, fused=True)
        torch.set_num_threads(3)
        split = force_loss_gradients(net, s0, fused=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.allclose(one[1], split[1], rtol=1e-14, atol=0.0)  # row-wise kernels: the same bits in practice
    # the weight gradients' sums over rows are split over threads by torch too: rounding only
    assert all(torch.allclose(a, b, rtol=1e-13, atol=1e-15) for a, b in zip(one[2], split[2]))


def test_taken_only_where_exact(monkeypatch):
    s = torch.rand(50, 1, dtype=torch.float64, requires_grad=True)
    tanh_net = EmbeddingNet(1, [4, 8], "tanh", False, torch.float64, new_generator(1))
    assert tangent_embedding.embed(tanh_net, s) is None  # outside force_training: plain net (Hessians stay right)
    with tangent_embedding.force_training():
        assert tangent_embedding.embed(tanh_net, s) is not None
        assert tangent_embedding.embed(tanh_net, s.detach()) is None  # nothing to differentiate
        with torch.no_grad():
            assert tangent_embedding.embed(tanh_net, s) is None
        assert tangent_embedding.embed(EmbeddingNet(1, [4, 8], "relu", False, torch.float64, new_generator(1)), s) is None
        assert tangent_embedding.embed(EmbeddingNet(1, [4, 8], "tanh", True, torch.float64, new_generator(1)), s) is None
        two_inputs = torch.rand(50, 2, dtype=torch.float64, requires_grad=True)
        assert tangent_embedding.embed(EmbeddingNet(2, [4, 8], "tanh", False, torch.float64, new_generator(1)), two_inputs) is None
        mixed = EmbeddingNet(1, [4, 8], "tanh", False, torch.float64, new_generator(1))
        mixed.mixed = True
        assert tangent_embedding.embed(mixed, s) is None
        assert tangent_embedding.embed(tanh_net, s.float()) is None  # weights of another dtype
    with tangent_embedding.force_training(False):
        assert tangent_embedding.embed(tanh_net, s) is None
    monkeypatch.setattr(tangent_embedding.KERNELS, "library", None)
    monkeypatch.setattr(tangent_embedding.KERNELS, "status", "off (no C compiler)")
    with tangent_embedding.force_training():  # no library: the plain net, quietly
        assert tangent_embedding.embed(tanh_net, s) is None


def count_grouped_nets(monkeypatch, taken=None) -> list:
    """Record (number of nets, fused path taken) for every call of the grouped fused nets: both
    entries, since se_e2_a takes G and T apart into its contraction and se_e2_r joins them."""
    taken = [] if taken is None else taken

    def counting(function):
        def counted(nets, x, bounds):
            out = function(nets, x, bounds)
            taken.append((len(nets), out is not None))
            return out
        return counted

    for name in ("embed_groups", "embed_group_parts"):
        monkeypatch.setattr(tangent_embedding, name, counting(getattr(tangent_embedding, name)))
    return taken


SE_E2_R = {"type": "se_e2_r", "sel": [46, 92], "rcut": 4.0, "rcut_smth": 0.5, "neuron": [5, 10, 20], "seed": 1}


@pytest.mark.parametrize("tile_bytes", [None, 2048], ids=["one-pass", "tiles"])
@pytest.mark.parametrize("descriptor", [None, SE_E2_R], ids=["se_e2_a", "se_e2_r"])
def test_model_forces_virial_and_training_gradients_match(tmp_path, monkeypatch, descriptor, tile_bytes):
    """The whole se_e2_a (or se_e2_r) + ener model on a water frame: forces, virial and the
    parameter gradient of an energy + force + virial loss, fused (all type-pair nets in one
    Function, each net's rows in one pass or in tiles) against plain."""
    if tile_bytes:  # a few dozen rows per tile
        monkeypatch.setattr(tangent_embedding, "TILE_BYTES", tile_bytes)
    doc = small_input(tmp_path, descriptor=descriptor)
    model, _ = model_with_stats(doc)
    coord, atype, box = water_frame(1)
    params = [p for p in model.parameters() if p.requires_grad]
    taken = count_grouped_nets(monkeypatch)

    def run(fused: bool):
        model.zero_grad(set_to_none=True)
        with tangent_embedding.force_training(fused):
            out = predict(model, "default", coord, atype, box, create_graph=True)
        loss = out["energy"].sum() + (out["force"] ** 2).sum() + (out["virial"] ** 2).sum() * 1e-3
        loss.backward(inputs=params)
        return out, [p.grad.clone() for p in params]

    plain, plain_grads = run(False)
    fused, fused_grads = run(True)
    assert taken == [(4, False), (4, True)]  # the path was taken, for the four nets at once
    assert torch.allclose(fused["energy"], plain["energy"], rtol=1e-15, atol=0.0)
    for key in ("force", "virial"):
        assert torch.allclose(fused[key], plain[key], rtol=1e-12, atol=1e-12 * float(plain[key].detach().abs().max()))
    for a, b in zip(plain_grads, fused_grads):
        assert float((a - b).abs().max()) <= 1e-11 * float(a.abs().max())


def test_a_scripted_net_runs_the_plain_layers():
    net = EmbeddingNet(1, [4, 8], "tanh", False, torch.float64, new_generator(1))
    scripted = torch.jit.script(net)
    s = torch.rand(20, 1, dtype=torch.float64)
    with tangent_embedding.force_training():
        assert torch.allclose(scripted(s), net(s), rtol=1e-15, atol=1e-15)
    assert isinstance(net.blocks[0], mlp.Block)


def test_the_trainer_takes_it_for_its_step_only(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from helpers import write_input
    from mtcore.config import load_config
    from mtcore.train.trainer import Trainer

    trainer = Trainer(load_config(write_input(tmp_path, small_input(tmp_path, numb_steps=2))), tmp_path,
                      Console(file=io.StringIO()))
    taken = []
    embed = tangent_embedding.embed

    def counting(net, x):
        out = embed(net, x)
        if x.requires_grad:  # (the padded slots' constant rows need no derivative)
            taken.append(("one", out is not None))
        return out

    monkeypatch.setattr(tangent_embedding, "embed", counting)
    count_grouped_nets(monkeypatch, taken)
    assert trainer.train_step("default")
    assert taken == [(4, True)]  # the four type-pair nets of the force-trained step, as one Function
    taken.clear()
    trainer.display_values()  # validation: plain nets
    assert taken and not any(ok for _, ok in taken)


@pytest.mark.parametrize("neuron", [[25, 50, 100], [4, 4, 8, 8]])  # doubling, residual
def test_nets_in_one_function_match_each_net_alone(neuron):
    """embed_groups: three nets on blocks of rows of different sizes give, to the last bit, the
    rows each net gives alone (to 4 ulp), and the same force-loss parameter gradients to rounding."""
    nets = [EmbeddingNet(1, neuron, "tanh", False, torch.float64, new_generator(seed)) for seed in (1, 2, 3)]
    bounds = [(0, 700), (700, 750), (750, 2000)]
    s0 = torch.rand(2000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 4 - 0.5
    mix = torch.randn(neuron[-1], 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    params = [p for net in nets for p in net.parameters()]

    def run(together: bool):
        s = s0.clone().requires_grad_(True)
        for net in nets:
            net.zero_grad(set_to_none=True)
        with tangent_embedding.force_training(True):
            if together:
                out = tangent_embedding.embed_groups(nets, s, bounds)
                assert out is not None
            else:
                out = torch.cat([net(s[lo:hi]) for net, (lo, hi) in zip(nets, bounds)])
        energy = ((out @ mix) ** 2).sum() / s.shape[0]
        (force,) = torch.autograd.grad(energy, s, create_graph=True)
        (energy + (force ** 2).sum()).backward(inputs=params)
        return out.detach(), force.detach(), [p.grad.clone() for p in params]

    alone, together = run(False), run(True)
    # the same operators on the same rows: equal to the last bit in practice
    assert torch.allclose(together[0], alone[0], rtol=4 * torch.finfo(torch.float64).eps, atol=0.0)
    assert torch.allclose(together[1], alone[1], rtol=1e-13, atol=0.0)
    for a, b in zip(alone[2], together[2]):
        assert float((a - b).abs().max()) <= 1e-12 * float(a.abs().max())
    with tangent_embedding.force_training(True):  # blocks must tile the rows in order
        s = s0.clone().requires_grad_(True)
        assert tangent_embedding.embed_groups(nets, s, [(0, 700), (750, 800), (800, 2000)]) is None
        assert tangent_embedding.embed_groups(nets, s, [(0, 700), (700, 750), (750, 1999)]) is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_loops_own_tanh_is_as_accurate_as_torchs_and_lets_nan_through(dtype):
    """fwdz takes tanh as 2σ(z) − 1 with an e^x of its own: against the exact value it is as close
    as torch's sigmoid form, over the whole range (both ends saturate to ±1 without overflow), and
    NaN stays NaN (a clamp that swallowed it would hide diverged weights from the trainer)."""
    tangent_embedding.KERNELS.load()
    z = torch.cat([torch.linspace(-60, 60, 200001, dtype=torch.float64),
                   torch.tensor([-1e300, -800.0, 800.0, 1e300, float("inf"), -float("inf"), float("nan")],
                                dtype=torch.float64)]).to(dtype)
    P = z.numel()
    zy = z.clone().unsqueeze(1)
    zero, bias = torch.zeros(P, 1, dtype=dtype), torch.zeros(1, dtype=dtype)  # held: the loop reads them
    out, tout = torch.empty(P, 1, dtype=dtype), torch.empty(P, 1, dtype=dtype)
    suffix = "f64" if dtype == torch.float64 else "f32"
    getattr(tangent_embedding.KERNELS.library, f"fwdz_{suffix}")(
        P, 1, 1, 0, zy.data_ptr(), bias.data_ptr(), zero.data_ptr(), zero.data_ptr(), zero.data_ptr(),
        out.data_ptr(), tout.data_ptr())
    got = zy.squeeze(1)
    sig = torch.sigmoid(z)
    torchs = sig + sig - 1
    exact = torch.tanh(z.double() / 2)
    finite = torch.isfinite(z[:-1])
    ours_err = float((got[:-1].double() - exact[:-1]).abs()[finite].max())
    torchs_err = float((torchs[:-1].double() - exact[:-1]).abs()[finite].max())
    assert ours_err <= 1.5 * torchs_err
    assert got[-7:-1].tolist() == [-1.0, -1.0, 1.0, 1.0, 1.0, -1.0]
    assert torch.isnan(got[-1]) and torch.isnan(out[-1, 0])
