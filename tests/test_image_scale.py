"""Image scale: the configurable U-Net, the trainer's options for images, and their bad input."""

import numpy as np
import pytest
import torch

from unstir import nets
from unstir.training import TrainConfig, train


def test_unet_default_layout_is_the_earlier_one_and_options_change_it():
    assert nets.count_parameters(nets.UNet(1, 8)) == 518_113  # the layout earlier runs were saved with
    assert nets.UNet(1, 8).config == {"kind": "unet", "channels": 1, "size": 8, "widths": [32, 64],
                                      "num_classes": 0, "time_scale": 1000.0}
    net = nets.UNet(3, 32, (32, 64, 64), num_classes=18, res_blocks=2, attention=(16,), dropout=0.1, heads=2)
    # Attention follows exactly the blocks at 16 px: level 1, two blocks down and two up.
    attn = [type(m).__name__ for m in (*net.down_attn, *net.up_attn)]
    assert attn == ["Identity"] * 2 + ["Attention"] * 2 + ["Identity"] * 2 + ["Identity"] * 2 + ["Attention"] * 2 + \
        ["Identity"] * 2
    assert len(net.down) == len(net.up) == 6
    rebuilt = nets.build(net.config)
    rebuilt.load_state_dict(net.state_dict())
    x, t, y = torch.randn(3, 3, 32, 32), torch.rand(3), torch.tensor([0, 5, 17])
    net.eval(), rebuilt.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, y), rebuilt(x, t, y))
        # Samples are independent within a batch (GroupNorm normalises each sample): the basis of sharded sampling.
        torch.testing.assert_close(net(x[1:2], t[1:2], y[1:2]), net(x, t, y)[1:2], rtol=1e-4, atol=1e-5)
    net.train()
    with torch.no_grad():
        assert not torch.equal(net(x, t, y), net(x, t, y)), "dropout is active in training"


@pytest.mark.parametrize("options, message", [
    (dict(widths=(8, 16, 16, 16, 16)), r"image size 8 is not divisible by 2\^4 = 16"),
    (dict(attention=(16,)), r"attention resolution\(s\) \[16\] do not occur: at size 8 with 2 levels the "
                            r"resolutions are \[8, 4\]"),
    (dict(res_blocks=0), r"res_blocks must be an integer >= 1, got 0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(widths=(12, 24)), r"divisible by groups \(8\)"),
    (dict(batch_size=10, accumulate=3), r"batch_size 10 does not split into 1 process\(es\) x 3 micro-batch\(es\) "
                                        r"\(--accumulate\): choose a multiple of 3"),
])
def test_unet_and_accumulation_settings_are_checked_before_training(tmp_path, options, message):
    cfg = TrainConfig(**{"data": "digits", "steps": 2, "batch_size": 8, **options})
    with pytest.raises(ValueError, match=message):
        train(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "run.json").exists(), "refused before any work"


def test_unet_options_on_vector_data_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"--widths, --dropout configure the image U-Net; 'moons' is vector data"):
        train(TrainConfig(data="moons", steps=2, widths=(16, 32), dropout=0.1), tmp_path / "r", progress=False)


def test_gradient_accumulation_and_channels_last_give_the_same_training(tmp_path):
    """The micro-batches of --accumulate sum to the batch's gradient, and NHWC memory computes the same
    network: equal weights after a few steps, up to float rounding."""
    from unstir import data
    from unstir.processes import make_process
    from unstir.training import build_net

    base = dict(data="digits", steps=4, batch_size=12, checkpoint_every=4, warmup=1, lr=1e-3, widths=(16, 32))
    torch.manual_seed(0)  # train's initialisation
    init = build_net(TrainConfig(**base), data.load("digits"), make_process("vp")).state_dict()
    ref = train(TrainConfig(**base), tmp_path / "ref", progress=False).net.state_dict()

    def flat(state):
        return torch.cat([state[k].flatten() - init[k].flatten() for k in init])

    moved = flat(ref).norm()
    assert moved > 1e-3, "the weights moved"
    for name, extra in (("acc", dict(accumulate=3)), ("nhwc", dict(channels_last=True))):
        got = train(TrainConfig(**base, **extra), tmp_path / name, progress=False).net.state_dict()
        # Adam divides by the gradient's running RMS, so an element whose gradient is rounding-sized can move by up
        # to lr either way: compare the whole update, not each element. Measured: 3.3e-5 (acc), 1.4e-4 (nhwc).
        assert (flat(got) - flat(ref)).norm() / moved < 2e-3, name


def test_cli_takes_the_unet_options_and_a_resume_keeps_them(tmp_path, capsys):
    from unstir.cli import main
    from unstir.runs import load_run

    run = tmp_path / "run"
    args = ["train", "--data", "digits", "--steps", "2", "--batch-size", "8", "--widths", "16,32", "--res-blocks", "2",
            "--attention", "4", "--dropout", "0.1", "--out", str(run), "--quiet"]
    assert main(args) == 0
    model = load_run(run)
    cfg = model.run_info["net"]
    assert (cfg["widths"], cfg["res_blocks"], cfg["attention"], cfg["dropout"]) == ([16, 32], 2, [4], 0.1)
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--quiet"]) == 0
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--res-blocks", "1", "--quiet"]) == 2
    assert "--res-blocks: run has 2, asked 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", "digits", "--widths", "16;32", "--out", str(tmp_path / "x")])


def test_image_folder_of_mixed_colour_modes_is_refused(tmp_path):
    from PIL import Image

    from unstir import data

    folder = tmp_path / "mixed"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8), "L").save(folder / "a.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8), "RGB").save(folder / "b.png")
    with pytest.raises(ValueError, match=r"mix colour modes: colour \(e.g. b.png\), grayscale \(e.g. a.png\)"):
        data.image_folder(folder, mode="RGB")


def test_a_torch_device_is_recorded_by_its_name(tmp_path):
    import json

    train(TrainConfig(data="moons", steps=2, warmup=0, batch_size=8, device=torch.device("cpu")), tmp_path / "r",
          progress=False)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["device"] == "cpu"


def test_a_64x64_colour_folder_trains_and_samples_end_to_end(tmp_path, capsys):
    """A folder of 64x64 RGB images: trained (a small U-Net, three levels), sampled to a folder of 64x64 PNGs
    with --nfe (no teleport: 12,288 values per sample is above what a run stores moments for)."""
    from PIL import Image

    from unstir.cli import main

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB").save(folder / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", "--data", str(folder), "--mode", "RGB", "--size", "64", "--widths", "8,16,16",
                 "--steps", "2", "--batch-size", "4", "--out", str(run), "--quiet"]) == 0
    assert not (run / "moments.safetensors").exists()
    assert main(["sample", "--run", str(run), "--nfe", "3", "-n", "2", "--out", str(tmp_path / "s"), "--quiet"]) == 0
    assert "2 samples with ipndm (3 model evaluations)" in capsys.readouterr().out
    assert Image.open(tmp_path / "s" / "000001.png").size == (64, 64)
    assert np.load(tmp_path / "s" / "samples.npz")["x"].shape == (2, 3, 64, 64)


def test_diffusers_unet_trains_resumes_and_samples_through_unstir(tmp_path, capsys):
    """--net diffusers: diffusers' UNet2DModel with the same options (attention at 8 px -> AttnDownBlock2D),
    trained by unstir's loop, checkpointed in safetensors, rebuilt by load_run with the same outputs, sampled,
    class-conditional with the null label; on vector data it is refused before work."""
    pytest.importorskip("diffusers")
    import unstir
    from unstir.cli import main

    run = tmp_path / "run"
    assert main(["train", "--data", "shapes32", "--net", "diffusers", "--widths", "8,16,16", "--attention", "8",
                 "--class-conditional", "--steps", "3", "--batch-size", "4", "--out", str(run),
                 "--quiet"]) == 0
    model = unstir.load_run(run)
    net = model.net
    assert type(net).__name__ == "DiffusersUNet"
    assert [type(b).__name__ for b in net.unet.down_blocks] == ["DownBlock2D", "DownBlock2D", "AttnDownBlock2D"]
    assert net.unet.config.num_class_embeds == 19
    x, t = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        a, b = model(x, t, torch.tensor([1, 2])).eps, unstir.load_run(run)(x, t, torch.tensor([1, 2])).eps
    assert torch.equal(a, b) and not torch.equal(a, model(x, t).eps)  # the null label differs from class 1/2
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--quiet"]) == 0
    assert main(["sample", "--run", str(run), "--steps", "2", "-n", "2", "--out", str(tmp_path / "s.npy"),
                 "--quiet"]) == 0
    assert np.load(tmp_path / "s.npy").shape == (2, 3, 32, 32)
    # the likelihood's Hutchinson divergence: UNet2DModel's backward cannot be vmapped, so one pass per probe,
    # the same numbers as the batched pass gives for unstir's own net
    from unstir.pf_ode import divergence

    probes = torch.randn(3, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _, div = divergence(lambda z: model(z, t).eps, x, probes)
    assert div.shape == (2, 3) and torch.isfinite(div).all()
    with torch.enable_grad():
        z = x.clone().requires_grad_(True)
        out = model(z, t).eps
        one = (torch.autograd.grad(out, z, probes[1])[0] * probes[1]).flatten(1).sum(1)
    torch.testing.assert_close(div[:, 1], one, rtol=1e-5, atol=1e-4)
    assert main(["train", "--data", "moons", "--net", "diffusers", "--out", str(tmp_path / "v")]) == 2
    assert "--net configures the image U-Net; 'moons' is vector data" in capsys.readouterr().err


@pytest.mark.parametrize("heads", [1, 2])
def test_unet_attention_attends_over_pixels(heads):
    """The U-Net's self-attention against a loop written from its definition (DDPM's AttnBlock, Ho et al.
    2020): per head, softmax over the h*w pixels of q_i . k_j / sqrt(c / heads), values mixed across pixels,
    a 1x1 projection and the residual. Attending over channels instead, or without the scale, fails."""
    torch.manual_seed(0)
    block = nets.Attention(8, groups=4, heads=heads).double()
    x = torch.randn(2, 8, 3, 5, dtype=torch.float64)
    qkv = block.qkv(block.norm(x))  # (b, 3c, h, w)
    c, hw, dh = 8, 15, 8 // heads
    expected = torch.empty(2, 8, 15, dtype=torch.float64)
    for b in range(2):
        q, k, v = (qkv[b, i * c:(i + 1) * c].reshape(c, hw) for i in range(3))
        for head in range(heads):
            rows = slice(head * dh, (head + 1) * dh)
            for i in range(hw):  # pixel i attends to every pixel j
                w = torch.softmax(torch.stack([q[rows, i] @ k[rows, j] for j in range(hw)]) / dh ** 0.5, 0)
                expected[b, rows, i] = sum(w[j] * v[rows, j] for j in range(hw))
    expected = x + block.proj(expected.reshape(2, 8, 3, 5))
    torch.testing.assert_close(block(x), expected, rtol=1e-10, atol=1e-10)


def test_networks_run_in_double_precision():
    """`UNet.double()` failed: the time embedding forced t to float32. It now follows the parameters' dtype, and
    in float32 gives what it gave before (the embedding's arithmetic is unchanged there)."""
    torch.manual_seed(0)
    for net, shape in ((nets.UNet(), (2, 1, 8, 8)), (nets.MLP(2), (2, 2))):
        x, t = torch.randn(shape), torch.rand(2)
        single = net(x, t)
        double = net.double()(x.double(), t.double())
        assert double.dtype == torch.float64
        torch.testing.assert_close(double.float(), single, rtol=1e-4, atol=1e-5)
