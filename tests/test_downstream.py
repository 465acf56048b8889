"""Fine-tuning, frozen-feature evaluation, export and pictures of a pretrained backbone."""
import copy
import json

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import load_file

from ddmim.checkpoints import load_pretraining
from ddmim.cli import main
from ddmim.config import make_config
from ddmim.eval.export import export_backbone
from ddmim.eval.features import load_backbone
from ddmim.eval.frozen import evaluate_backbone
from ddmim.eval.reconstruction import HEADER_PX, PANELS, visualize
from ddmim.finetune_config import make_finetune_config
from ddmim.models.classifier import load_encoder_weights
from ddmim.models.factory import classifier, plain_backbone
from ddmim.probes import knn_predict, pooled_features
from ddmim.train.finetune import make_optimizer, make_scheduler

TINY_SHAPE = ["model.img_size=32", "model.patch_size=2", "model.embed_dim=32", "model.depths=[1,1,2,1]",
              "model.num_heads=[1,2,4,8]", "model.window_size=4"]


def test_knn_on_toy_features_with_known_answer():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, -0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [0.6, 0.8]])
    # k=5 takes every train point: the weighted vote, not the count, decides the third point
    assert knn_predict(train, labels, test, num_classes=2, k=3).tolist() == [0, 1, 1]
    assert knn_predict(train, labels, test[2:], num_classes=2, k=5, temperature=0.05).tolist() == [1]
    assert knn_predict(train, labels, test[2:], num_classes=2, k=5, temperature=100.0).tolist() == [0]


def test_linear_probe_trains_only_the_head(sample_root):
    cfg = make_config("tiny", ["data.num_workers=0"])
    torch.manual_seed(0)
    net = plain_backbone(cfg.model).eval()
    before = copy.deepcopy(net.state_dict())
    result = evaluate_backbone("linear", net, cfg, sample_root, epochs=50)
    assert result["top1"] > 30.0  # 10 classes: far above chance even on random features
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


@pytest.mark.parametrize("head", ["bn_mlp", "linear"])
def test_finetune_loads_every_encoder_weight_and_drops_the_rest(pretrain_ckpt, head):
    pre_cfg, state = load_pretraining(pretrain_ckpt)
    raw = torch.load(pretrain_ckpt, weights_only=False)["state_dict"]
    assert any(k.startswith(("model.teacher.", "model.decoder.", "model.proj.")) for k in raw)
    net = classifier(pre_cfg.model, 10, head, 64, 0.0)
    loaded = load_encoder_weights(net, state, head)
    target = net.state_dict()
    encoder_keys = [k for k in state if not k.startswith("head.")]
    assert loaded == len(encoder_keys) + (2 if head == "bn_mlp" else 0)  # the BN-MLP head keeps the 768->1024 layer
    for k in encoder_keys:
        assert torch.equal(target[k], state[k]), k
    if head == "bn_mlp":
        assert torch.equal(target["head.fc.0.weight"], state["head.fc.weight"])
    assert not any(k.startswith(("teacher", "decoder", "proj")) for k in target)


def test_layer_decay_gives_each_depth_its_learning_rate():
    cfg = make_finetune_config("mim", TINY_SHAPE)
    net = classifier(cfg.model, 10, "linear", 0, 0.0)
    optimizer = make_optimizer(net, cfg.optim, cfg.optim.lr)
    cfg.optim.warmup_epochs = 0
    make_scheduler(optimizer, cfg.optim, cfg.optim.lr, epochs=10, steps_per_epoch=5).step_update(0)
    lr_of = {n: g["lr"] for g in optimizer.param_groups for n, p in net.named_parameters()
             if any(p is q for q in g["params"])}
    ld, base, blocks = cfg.optim.layer_decay, cfg.optim.lr, sum(cfg.model.depths)
    # one layer per transformer block (5 here), patch embedding below them, head at the top
    assert lr_of["head.fc.weight"] == pytest.approx(base)
    assert lr_of["layers.3.blocks.0.mlp.fc1.weight"] == pytest.approx(base * ld)
    assert lr_of["layers.0.blocks.0.mlp.fc1.weight"] == pytest.approx(base * ld ** blocks)
    assert lr_of["patch_embed.proj.weight"] == pytest.approx(base * ld ** (blocks + 1))


def test_export_round_trip_into_timm(pretrain_ckpt, tmp_path):
    result = export_backbone(pretrain_ckpt, tmp_path / "export")
    cfg, _ = load_pretraining(pretrain_ckpt)
    recipe = json.loads((tmp_path / "export" / "timm.json").read_text())
    model = timm.create_model(recipe["model_name"], **recipe["kwargs"])
    model.load_state_dict(load_file(result["weights"]), strict=True)
    ours, _ = load_backbone(pretrain_ckpt, cfg)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), pooled_features(ours, images), rtol=1e-5, atol=1e-5)
    assert "timm.create_model" in result["timm"] and "strict=True" in result["timm"]
    assert recipe["kwargs"]["num_classes"] == 0 and model.num_classes == 0


def test_visualisation_writes_the_grid(pretrain_ckpt, sample_root, tmp_path):
    out = visualize(pretrain_ckpt, sample_root, tmp_path / "grid.png", num=3)
    image = torch.tensor(list(Image.open(out["grid"]).convert("RGB").getdata()), dtype=torch.float32)
    width, height = Image.open(out["grid"]).size
    zoom, pad, size = 3, 2, 32  # 32 px images are enlarged 3x
    assert (width, height) == (len(PANELS) * (zoom * size + pad) + pad, HEADER_PX + 3 * (zoom * size + pad) + pad)
    pixels = image.view(height, width, 3)
    cell, top = zoom * size + pad, HEADER_PX + pad
    masked = pixels[top:top + zoom * size, pad + cell:pad + cell + zoom * size]
    recon = pixels[top:top + zoom * size, pad + 2 * cell:pad + 2 * cell + zoom * size]
    assert (masked - recon).abs().mean() > 1.0
    # each column is named in the strip above it: dark text over a white strip
    header = pixels[:HEADER_PX]
    inked = [(header[:, pad + c * cell:(c + 1) * cell] < 128).any(dim=-1).sum().item() for c in range(len(PANELS))]
    assert all(n > 20 for n in inked), inked
    assert (header[:, -pad:] == 255).all()  # the margin holds no ink: the test can tell ink from none


def _err(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err.strip()


def test_bad_checkpoints_and_class_counts(capsys, tmp_path, sample_root, pretrain_ckpt, finetune_ckpt):
    code, err = _err(capsys, "finetune", "--data", str(sample_root), "--ckpt", str(tmp_path / "nope.ckpt"))
    assert code == 2 and "nope.ckpt does not exist" in err
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(pretrain_ckpt.read_bytes()[:5000])
    code, err = _err(capsys, "export", "--ckpt", str(truncated), "--out", str(tmp_path / "e"))
    assert code == 2 and "truncated.ckpt cannot be read" in err and "\n" not in err
    code, err = _err(capsys, "finetune", "--data", str(sample_root), "--ckpt", str(finetune_ckpt))
    assert code == 2 and "is a finetune checkpoint; a pretraining checkpoint" in err
    code, err = _err(capsys, "eval", "knn", "--data", str(sample_root), "--ckpt", str(finetune_ckpt))
    assert code == 2 and str(finetune_ckpt) in err
    code, err = _err(capsys, "finetune", "--data", str(sample_root), "--ckpt", str(pretrain_ckpt),
                     "--num-classes", "1000", "--out", str(tmp_path / "ft"))
    assert code == 2 and "--num-classes 1000 disagrees with the data" in err and "10 classes" in err
    assert not (tmp_path / "ft").exists()


def test_finetune_from_pretrained_checkpoint_runs_and_reports(sample_root, pretrain_ckpt, tmp_path, capsys):
    assert main(["finetune", "--data", str(sample_root), "--ckpt", str(pretrain_ckpt), "--preset", "tiny",
                 "--epochs", "1", "--max-steps", "3", "--workers", "0", "--out", str(tmp_path / "ft"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "top-5" in out and "encoder tensors" in out
