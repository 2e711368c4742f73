"""Behavioural tests of the per-query image priors (tv / dip / inr / warp) and RowAdam."""
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from disc_pl.cf.optim import RowAdam
from disc_pl.cf.priors import DIPPrior, INRPrior, TVPrior, WarpPrior, build_prior

CONF = Path(__file__).resolve().parents[1] / "conf" / "prior"

# Tiny but structurally complete generators (the yaml sizes are tested in test_configs_build).
TINY = {
    "tv": {},
    "dip": dict(scales=2, channels=8, skip_channels=4, input_channels=8),
    "inr": dict(n_frequencies=32, hidden=64, depth=2, sigma=3.0),
    "warp": dict(grid=4),
}
FIT = {"tv": (1, None), "dip": (150, 0.02), "inr": (60, 2e-3), "warp": (1, None)}  # (steps, lr) to reach 30 dB


# Tiny kernels on a shared, oversubscribed CPU: intra-op threads only add sync waits
# (measured: ~250x slower per DIP step with 2 threads under load).
pytestmark = pytest.mark.usefixtures("one_thread")


def structured(n: int, channels: int = 3, size: int = 16) -> torch.Tensor:
    """n different images [n, C, size, size]: a gradient, a bright rectangle and a dark disc."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for i in range(n):
        img = torch.stack([0.2 + 0.5 * ys * (c + 1) / channels + 0.3 * xs * (i + 1) / n for c in range(channels)])
        img[:, size // 4 : size // 2, size // 4 : 3 * size // 4] = 0.9 - 0.2 * i / n
        disc = (ys - 0.7) ** 2 + (xs - 0.3 - 0.1 * i) ** 2 < 0.03
        img[:, disc] = 0.05
        images.append(img.clamp(0, 1))
    return torch.stack(images)


@pytest.mark.parametrize("name", ["tv", "dip", "inr"])
def test_fits_structured_image(name):
    images = structured(1)
    prior = build_prior(name, images, [0], **TINY[name])
    steps, lr = FIT[name]
    psnr = prior.reconstruct(steps, psnr_target=30, lr=lr)
    assert psnr.shape == (1,)
    assert psnr.item() >= 28
    out = prior()
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize("name", ["tv", "dip", "inr", "warp"])
def test_batched_reconstruction_equals_single(name):
    images, seeds = structured(3), [7, 3, 11]
    steps = 25
    batched = build_prior(name, images, seeds, **TINY[name])
    # A target between the queries' PSNRs makes some stop early (row-subset path).
    psnr_b = batched.reconstruct(steps, psnr_target=22, lr=FIT[name][1])
    for i in range(3):
        single = build_prior(name, images[i : i + 1], seeds[i : i + 1], **TINY[name])
        psnr_s = single.reconstruct(steps, psnr_target=22, lr=FIT[name][1])
        torch.testing.assert_close(single(), batched()[i : i + 1], atol=1e-4, rtol=0)
        torch.testing.assert_close(psnr_s, psnr_b[i : i + 1], atol=1e-2, rtol=0)


def test_seed_determines_initialisation():
    images = structured(2)
    a = build_prior("inr", images, [1, 2], **TINY["inr"])()
    b = build_prior("inr", images.flip(0), [2, 1], **TINY["inr"])()
    torch.testing.assert_close(a, b.flip(0), atol=1e-5, rtol=0)
    assert (a[0] - a[1]).abs().max() > 1e-3  # different seeds -> different generators


@pytest.mark.parametrize("name", ["tv", "dip", "inr", "warp"])
def test_rows_match_full_output(name):
    prior = build_prior(name, structured(4), [0, 1, 2, 3], **TINY[name])
    idx = torch.tensor([2, 0])
    with torch.no_grad():
        torch.testing.assert_close(prior(idx), prior()[idx])
        prior.set_trainable(prior.groups[-1:])  # cached prefix path
        torch.testing.assert_close(prior(idx), prior()[idx])


@pytest.mark.parametrize(
    "name, trainable", [("dip", ["dec0", "out"]), ("dip", ["dec1", "dec0", "out"]), ("inr", ["hidden1", "out"])]
)
def test_cached_prefix_same_output_and_gradients_computed_once(name, trainable):
    images = structured(3)
    prior = build_prior(name, images, [0, 1, 2], **TINY[name])
    idx = torch.tensor([2, 1])

    def loss_and_grads():
        out = prior(idx)
        (out * images[idx]).sum().backward()
        grads = [p.grad.clone() for p in prior.parameter_groups(trainable)]
        for p in prior.parameters():
            p.grad = None
        return out.detach(), grads

    reference_out, reference_grads = loss_and_grads()  # everything trainable, nothing cached

    prior.set_trainable(trainable)
    frozen = [g for g in prior.groups if g not in trainable]
    calls = dict.fromkeys(frozen, 0)
    for g in frozen:
        prior.net.blocks[g].register_forward_hook(lambda *_, g=g: calls.__setitem__(g, calls[g] + 1))
    for _ in range(3):
        out, grads = loss_and_grads()
        torch.testing.assert_close(out, reference_out, atol=1e-6, rtol=0)
        for g, r in zip(grads, reference_grads):
            torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-5)
    assert calls == dict.fromkeys(frozen, 1)  # the frozen prefix ran once, to fill the cache
    assert all(not p.requires_grad for g in frozen for p in prior.parameter_groups([g]))


def test_reconstruct_restores_trainable_groups_and_refreshes_cache():
    prior = build_prior("inr", structured(2), [0, 1], **TINY["inr"])
    prior.set_trainable(["out"])
    before = prior().detach()
    prior.reconstruct(5, psnr_target=99, lr=1e-3)
    assert [p.requires_grad for p in prior.parameter_groups(["all"])] == [
        False, False, False, False, True, True  # hidden0 (W, b), hidden1 (W, b), out (W, b)
    ]
    after = prior()
    assert (after - before).abs().max() > 1e-4  # not the stale pre-reconstruction cache
    prior.set_trainable(["all"])
    torch.testing.assert_close(prior(), after)


def test_rowadam_leaves_other_rows_bit_identical_and_matches_adam():
    torch.manual_seed(0)
    w = torch.randn(4, 3, 5, requires_grad=True)
    b = torch.randn(4, 5, requires_grad=True)
    ref_w = w[2].detach().clone().requires_grad_(True)
    ref_b = b[2].detach().clone().requires_grad_(True)
    untouched = [w[[0, 1, 3]].detach().clone(), b[[0, 1, 3]].detach().clone()]
    opt = RowAdam([w, b], lr=0.05)
    ref = torch.optim.Adam([ref_w, ref_b], lr=0.05, foreach=False)
    for _ in range(6):
        gw, gb = torch.randn(4, 3, 5), torch.randn(4, 5)
        opt.zero_grad()
        w.grad, b.grad = gw, gb
        opt.step(torch.tensor([2]))
        ref.zero_grad()
        ref_w.grad, ref_b.grad = gw[2].clone(), gb[2].clone()
        ref.step()
    assert torch.equal(w[[0, 1, 3]], untouched[0]) and torch.equal(b[[0, 1, 3]], untouched[1])
    assert torch.equal(opt.exp_avg[0][[0, 1, 3]], torch.zeros(3, 3, 5))
    torch.testing.assert_close(w[2], ref_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(b[2], ref_b, atol=1e-6, rtol=0)


def test_rowadam_row_trajectory_independent_of_other_rows_and_lr_scale():
    torch.manual_seed(1)
    start = torch.randn(3, 4)
    grads = torch.randn(5, 3, 4)
    a, c = start.clone().requires_grad_(True), start.clone().requires_grad_(True)
    opt_a = RowAdam([a], lr=0.1)
    opt_c = RowAdam([c], lr=0.1, lr_scale=torch.tensor([1.0, 0.5, 1.0]))
    for t in range(5):
        a.grad = grads[t]
        opt_a.step(torch.tensor([0, 1]) if t % 2 else None)  # rows 0, 1 every step; row 2 sometimes
        c.grad = grads[t]
        opt_c.step(torch.tensor([0, 1]) if t % 2 else torch.tensor([1, 0, 2]))
    assert torch.equal(a[0], c[0])  # row 0 the same whatever the other rows did
    torch.testing.assert_close(a[2], c[2])  # row 2 stepped at the same times either way
    assert opt_a.steps[0].tolist() == [5, 5, 3]
    assert not torch.allclose(a[1], c[1])  # half the step size


def test_dip_rejects_bad_image_size():
    with pytest.raises(ValueError, match=r"20x20.*scales=3.*2\*\*scales = 8.*scales <= 2 for 20x20"):
        DIPPrior(torch.rand(1, 3, 20, 20), [0], scales=3, channels=4)
    # Divisible, but the coarsest scale would be 1x1 (instance norm needs > 1 pixel).
    with pytest.raises(ValueError, match=r"16x16.*scales <= 3 for 16x16"):
        DIPPrior(torch.rand(1, 3, 16, 16), [0], scales=4, channels=4)
    assert DIPPrior(torch.rand(1, 3, 16, 32), [0], scales=4, channels=4)().shape == (1, 3, 16, 32)


def test_unknown_group_lists_groups():
    prior = build_prior("dip", structured(1), [0], **TINY["dip"])
    with pytest.raises(ValueError, match=r"dec7.*'enc0', 'enc1', 'dec1', 'dec0', 'out'"):
        prior.set_trainable(["dec7"])
    with pytest.raises(ValueError, match="unknown prior"):
        build_prior("gan", structured(1), [0])


@pytest.mark.parametrize("name", ["tv", "dip", "inr", "warp"])
def test_gradients_reach_every_trainable_parameter(name):
    images = structured(2)
    prior = build_prior(name, images, [0, 1], **TINY[name])
    idx = torch.tensor([1])
    # A loss that drives the output away from the query (as a counterfactual loss would).
    (prior(idx) - images[idx].flip(-1)).square().mean().backward()
    for p in prior.parameter_groups(["all"]):
        assert p.grad is not None and p.grad[1].abs().sum() > 0, name
        assert p.grad[0].abs().sum() == 0  # row 0 was not in the batch


@pytest.mark.parametrize("name", ["tv", "dip", "inr", "warp"])
def test_grayscale(name):
    images = structured(2, channels=1)
    prior = build_prior(name, images, [0, 1], **TINY[name])
    psnr = prior.reconstruct(FIT[name][0], psnr_target=30, lr=FIT[name][1])
    assert prior().shape == (2, 1, 16, 16)
    assert (psnr >= 25).all()


def test_tv_regulariser_and_clamp():
    x = torch.zeros(1, 1, 2, 2)
    x[0, 0, 0, 0] = 1.0  # one bright pixel: |dx| = |dy| = 1 once out of 2 differences each
    prior = TVPrior(x, [0], alpha_tv=0.5, alpha_l2=0.1, tv_beta=2.0)
    expected = 0.5 * (0.5 + 0.5) + 0.1 * 0.25
    torch.testing.assert_close(prior.regularizer(x), torch.tensor([expected]))
    assert build_prior("inr", x, [0], **TINY["inr"]).regularizer(x).tolist() == [0.0]

    # A pixel pushed past 1 stays clamped; its parameter drifts out only by Adam's decaying
    # momentum (~10 lr, not one lr per step as with a plain straight-through clamp), so it
    # comes back soon after the gradient reverses.
    lr = 0.01
    opt = RowAdam(prior.parameter_groups(["pixels"]), lr=lr)
    for sign in [-1.0] * 60 + [1.0] * 30:
        opt.zero_grad()
        (sign * prior()[0, 0, 0, 0]).backward()
        opt.step()
        if sign < 0:
            assert prior().max() <= 1.0 and prior.pixels.max() <= 1 + 12 * lr
    assert prior()[0, 0, 0, 0] < 0.9


@pytest.mark.parametrize("name", ["tv", "dip", "inr", "warp"])
def test_configs_build(name):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    assert cfg.name == name and {"max_steps", "psnr_target", "lr"} <= set(cfg.recon) <= {
        "max_steps", "psnr_target", "lr", "sizes"}
    factory = instantiate(cfg.hparams)  # the run's generator factory: (images, seeds) -> Prior
    prior = factory(torch.rand(1, 3, 32, 32), [0])
    stages = OmegaConf.to_container(cfg.stages)
    assert stages == prior.default_stages
    for stage in stages:
        prior.set_trainable(stage)  # every name is a group of this prior
    assert isinstance(prior, {"tv": TVPrior, "dip": DIPPrior, "inr": INRPrior, "warp": WarpPrior}[name])


def test_run_config_prior_is_one_factory_built_from_the_command_line():
    """`prior.hparams.*` on the command line reaches the generator through one factory."""
    import functools

    from conftest import compose_cfg

    from disc_pl.errors import ConfigError
    from disc_pl.job import inversion_options
    from disc_pl.validate import validate_run_config

    cfg = compose_cfg(["prior=inr", "prior.hparams.hidden=32", "cache_dir=/unused"])
    options, factory = inversion_options(cfg)
    assert isinstance(factory, functools.partial) and factory.func is INRPrior
    assert factory.keywords["hidden"] == 32
    prior = factory(torch.rand(2, 3, 32, 32), [0, 1])
    assert isinstance(prior, INRPrior) and options.stages[-1].groups == ["all"]
    with pytest.raises(ConfigError) as info:
        validate_run_config(compose_cfg(["prior.hparams._target_=collections.OrderedDict", "cache_dir=/unused"]))
    assert info.value.key == "prior.hparams._target_" and "subclass of disc_pl.cf.priors.Prior" in str(info.value)


# -- coarse-to-fine rendering ------------------------------------------------------------------
def test_coarse_grid_sits_where_bilinear_enlargement_puts_it():
    """A linear image sampled on the coarse grid and enlarged bilinearly (align_corners=False)
    is the full-grid sampling of the same function, away from the clamped border pixels."""
    from disc_pl.nets.siren import pixel_grid

    def f(grid, h, w):  # a linear function of the coordinates, as an image [1, 1, h, w]
        return (0.3 + 0.7 * grid[:, 0] - 0.4 * grid[:, 1]).reshape(1, 1, h, w)

    full = f(pixel_grid(16, 12), 16, 12)
    for size in ((8, 6), (4, 3)):
        coarse = f(pixel_grid(16, 12, size), *size)
        up = torch.nn.functional.interpolate(coarse, size=(16, 12), mode="bilinear", align_corners=False)
        border = 16 // size[0]
        torch.testing.assert_close(up[..., border:-border, border:-border], full[..., border:-border, border:-border])
    assert torch.equal(pixel_grid(16, 12, (16, 12)), torch.stack(torch.meshgrid(
        torch.arange(16) / 16, torch.arange(12) / 12, indexing="ij"), -1).reshape(-1, 2))


def test_inr_coarse_render_samples_the_same_function():
    """The INR at half resolution is its full-size render sampled between pixels: enlarged
    back it is close to the full render, and returning to full size is bit-identical."""
    images = structured(2, size=16)
    prior = INRPrior(images, [1, 2], **TINY["inr"])
    prior.reconstruct(60, psnr_target=60, lr=2e-3)
    with torch.no_grad():
        full = prior()
        prior.set_render_size(prior.size_at(8))
        assert prior.render_size == (8, 8)
        coarse = prior()
        prior.set_render_size(prior.full_size)
        again = prior()
    assert coarse.shape == (2, 3, 8, 8)
    assert torch.equal(again, full)
    up = torch.nn.functional.interpolate(coarse, size=(16, 16), mode="bilinear", align_corners=False)
    assert (up - full).abs().mean() < 0.1 * (full - full.mean()).abs().mean() + 0.05


def test_coarse_to_fine_reconstruction_reaches_full_size_target_with_fewer_full_size_steps():
    images = structured(1, size=32)
    target = 26.0
    counts = {}
    for sizes in ((None,), (16, None)):
        prior = INRPrior(images, [0], **TINY["inr"])
        calls = []
        forward = prior.forward
        prior.forward = lambda *a, _p=prior, _c=calls, _f=forward, **k: (_c.append(_p.render_size), _f(*a, **k))[1]
        psnr = prior.reconstruct(150, psnr_target=target, lr=2e-3, sizes=sizes)
        assert prior.render_size == (32, 32) and float(psnr) >= target - 1
        counts[sizes] = sum(size == (32, 32) for size in calls)
    assert counts[(16, None)] < counts[(None,)]  # the coarse phase did most of the fitting


def test_coarse_only_reconstruction_fits_the_grid_and_renders_full_size():
    images = structured(2, size=32)
    prior = INRPrior(images, [0, 1], **TINY["inr"])
    psnr = prior.reconstruct(150, psnr_target=30, lr=2e-3, sizes=(16,))
    assert prior.render_size == (32, 32) and prior().shape == images.shape
    with torch.no_grad():
        prior.set_render_size((16, 16))
        coarse = torch.nn.functional.interpolate(images, size=(16, 16), mode="area")
        on_grid = -10 * torch.log10((prior() - coarse).square().flatten(1).mean(1))
    torch.testing.assert_close(psnr, on_grid)  # the PSNR reported is the one on the fitted grid
    assert (psnr >= 29).all()
    assert prior.size_at(16) == (16, 16) and prior.size_at(None) == prior.size_at(64) == (32, 32)


def test_tv_prior_refuses_coarse_rendering():
    prior = TVPrior(structured(1), [0])
    with pytest.raises(ValueError, match="full size only"):
        prior.set_render_size((8, 8))


def test_a_prior_checks_its_own_schedule_and_reports_every_problem_at_once():
    from disc_pl.errors import ConfigError

    inr = INRPrior(torch.rand(1, 1, 32, 32), [0], n_frequencies=4, hidden=8, depth=2)
    inr.check_schedule([["out"], ["hidden1", "out"], ["all"]], [16, None, None], [16])  # all valid: no error
    with pytest.raises(ConfigError) as err:
        inr.check_schedule([["out"], ["hidden2", "out"]], [16, None, None], [2])
    assert [p.key for p in err.value.problems] == ["prior.stages[1]", "prior.recon.sizes", "prior.sizes"]
    assert "hidden0, hidden1, out" in err.value.problems[0].allowed
    assert inr.render_size == (32, 32)  # probing the grids leaves the full size
    tv = TVPrior(torch.rand(1, 1, 32, 32), [0])
    with pytest.raises(ConfigError, match="full size only"):
        tv.check_schedule(None, None, [16])
    with pytest.raises(ConfigError) as err:
        DIPPrior(torch.rand(1, 1, 24, 24), [0], scales=5, channels=4)
    assert err.value.key == "prior.hparams.scales" and "1 <= scales <= 3" in str(err.value)


def test_warp_starts_at_the_query_and_a_constant_field_translates_it():
    """d = 0 renders the query exactly; a constant d = (2, -1) px renders x(p + d): the query
    moved 2 px left and 1 px down, the border repeated."""
    images = structured(2)
    prior = WarpPrior(images, [0, 1], grid=4)
    assert torch.equal(prior(), images)
    with torch.no_grad():
        prior.flow[:, 0], prior.flow[:, 1] = 2.0, -1.0
    out = prior()
    torch.testing.assert_close(out[..., 1:, :-2], images[..., :-1, 2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out[..., 0, :-2], images[..., 0, 2:], atol=1e-5, rtol=0)  # border row
    constant = prior.flow.new_tensor([2.0, -1.0]).view(1, 2, 1, 1).expand(2, 2, 16, 16)
    torch.testing.assert_close(prior.displacement(), constant)


def test_warp_fits_a_deformation_of_its_query():
    """The prior fits a smoothly deformed copy of the query (a bend of 1.5 px) by its field
    alone: the MSE falls by more than 10x."""
    images = structured(1)
    bent = WarpPrior(images, [0], grid=4)
    with torch.no_grad():
        bent.flow[0, 1] = 1.5 * torch.linspace(-1, 1, 4).square().view(1, 4)  # dy: a parabola in x
        target = bent()
    prior = WarpPrior(images, [0], grid=4, alpha_smooth=0.0)
    opt = RowAdam(prior.parameter_groups(["all"]), lr=0.05)
    start = (prior() - target).square().mean().item()
    for _ in range(200):
        opt.zero_grad()
        loss = (prior() - target).square().mean()
        loss.backward()
        opt.step()
    assert loss.item() < start / 10, (start, loss.item())


def test_warp_grad_blur_renders_the_sharp_warp_and_pulls_a_stroke_from_afar():
    """With ``grad_blur`` the rendered image is the plain warp of the query, bit for bit close;
    only the field's gradient is taken from a blurred copy. A 1 px vertical stroke 6 px away from
    where the loss wants brightness gives the plain warp no gradient at all (its pixels do not see
    the stroke) and is pulled there by the blurred one within 100 steps."""
    images = torch.zeros(1, 1, 16, 16)
    images[..., 3] = 1.0  # the stroke: column 3
    plain, blurred = WarpPrior(images, [0], grid=8, alpha_smooth=0.0), WarpPrior(images, [0], grid=8,
                                                                                   alpha_smooth=0.0, grad_blur=2.0)
    with torch.no_grad():
        field = 0.5 * torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(0))
        plain.flow.copy_(field)
        blurred.flow.copy_(field)
    torch.testing.assert_close(blurred(), plain(), atol=1e-6, rtol=0)
    with torch.no_grad():
        plain.flow.zero_()
        blurred.flow.zero_()

    def brightness_at_column_9(prior: WarpPrior) -> torch.Tensor:
        return prior()[..., 9].mean()

    grad, = torch.autograd.grad(brightness_at_column_9(plain), plain.flow)
    assert torch.count_nonzero(grad) == 0
    opt = RowAdam(blurred.parameter_groups(["all"]), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        (-brightness_at_column_9(blurred)).backward()
        opt.step()
    assert brightness_at_column_9(blurred).item() > 0.5


def test_warp_regulariser_max_shift_and_bad_arguments():
    x = torch.rand(1, 1, 8, 8)
    prior = WarpPrior(x, [0], grid=2, alpha_smooth=0.5, alpha_mag=0.1, alpha_l1=0.2)
    with torch.no_grad():
        prior.flow[0, 0] = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # dx: 1 px jump between columns
    # smooth: dy-direction differences 0 (2 of them per channel) and dx-direction 1, 1 (of 4
    # entries over both channels: mean 0.5); magnitude: mean of d^2 = 2 / 8, of |d| = 2 / 8
    expected = 0.5 * (0.0 + 0.5) + 0.1 * (2 / 8) + 0.2 * (2 / 8)
    torch.testing.assert_close(prior.regularizer(x), torch.tensor([expected]))
    bounded = WarpPrior(x, [0], grid=2, max_shift=1.5)
    with torch.no_grad():
        bounded.flow.fill_(100.0)
    assert bounded.displacement().max() <= 1.5 + 1e-5  # the control points are bounded (round-off)
    for bad in (dict(grid=1), dict(grid=2.5), dict(alpha_smooth=-1), dict(alpha_l1=-1), dict(max_shift=0),
                dict(grad_blur=0)):
        with pytest.raises(ValueError):
            WarpPrior(x, [0], **bad)


def test_warp_erase_band_fades_the_rim_to_the_background_never_a_hole():
    """With ``erase_band`` the warp starts at the query exactly; a full erase field fades to the
    background only the object's pixels within the band of the background (a 2 px rim of a
    12 x 12 square here), never its interior; and a loss that wants the square's left 2 columns
    dark (a sleeve to remove) is met by the erase field within 150 steps, the interior kept."""
    images = torch.zeros(1, 1, 16, 16)
    images[..., 2:14, 2:14] = 0.8
    prior = WarpPrior(images, [0], grid=8, alpha_smooth=0.0, erase_band=2.0, alpha_erase=0.0)
    assert torch.equal(prior(), images)
    with torch.no_grad():
        prior.erase.fill_(1.0)
    out = prior()
    rim = torch.zeros_like(images, dtype=torch.bool)
    rim[..., 2:14, 2:14] = True
    rim[..., 4:12, 4:12] = False
    torch.testing.assert_close(out[rim], torch.zeros_like(out[rim]), atol=1e-6, rtol=0)
    assert torch.equal(out[~rim], images[~rim])  # the interior and the background as they were
    with pytest.raises(ValueError, match="erase_band"):
        WarpPrior(images, [0], erase_band=0.0)
    # a dark print inside the object is not background: nothing around it may fade
    printed = images.clone()
    printed[..., 7:9, 7:9] = 0.0
    prior = WarpPrior(printed, [0], grid=8, alpha_smooth=0.0, erase_band=2.0, alpha_erase=0.0)
    with torch.no_grad():
        prior.erase.fill_(1.0)
    out = prior()
    torch.testing.assert_close(out[rim], torch.zeros_like(out[rim]), atol=1e-6, rtol=0)
    assert torch.equal(out[~rim], printed[~rim])

    prior = WarpPrior(images, [0], grid=8, alpha_smooth=0.0, erase_band=2.0, alpha_erase=0.0)
    opt = RowAdam(prior.parameter_groups(["all"]), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        out = prior()
        loss = out[..., 2:14, 2:4].mean() + (out[..., 6:10, 6:10] - 0.8).square().mean()
        loss.backward()
        opt.step()
    out = prior().detach()
    assert out[..., 2:14, 2:4].mean() < 0.2, out[..., 2:14, 2:4].mean()
    torch.testing.assert_close(out[..., 6:10, 6:10], images[..., 6:10, 6:10], atol=0.05, rtol=0)
