import pytest

from ddmim.config import config_from_dict, make_config, preset_names
from ddmim.errors import UserError


def test_presets_load_and_seed_values():
    assert {"seed", "tiny"} <= set(preset_names())
    cfg = make_config("seed")
    assert (cfg.model.img_size, cfg.model.patch_size, cfg.model.embed_dim) == (224, 4, 96)
    assert cfg.model.depths == [2, 2, 6, 2] and cfg.model.num_heads == [3, 6, 12, 24]
    assert (cfg.train.batch_size, cfg.train.epochs) == (52, 50)
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.step_size, cfg.optim.gamma) == (5e-3, 1e-4, 20, 0.1)
    assert cfg.mask.ratios == [0.5, 0.5, 0.5, 0.0] and cfg.ddmim.perceptual_weights == [1.0, 1.0, 1.0, 0.1]
    assert (cfg.ddmim.tau, cfg.ddmim.contrastive_weight, cfg.ema.decay, cfg.ema.every) == (0.05, 1.0, 0.999, 32)


def test_overrides_are_typed_and_round_trip():
    cfg = make_config("tiny", ["optim.lr=1e-4", "model.depths=[1,1,1,1]", "ddmim.recon_normalize=masked"])
    assert cfg.optim.lr == 1e-4 and cfg.model.depths == [1, 1, 1, 1] and cfg.ddmim.recon_normalize == "masked"
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["model.img_size=100"], "img_size"),
    (["model.colour=3"], "unknown option model.colour"),
    (["optim.lr=fast"], "optim.lr must be of type float"),
    (["mask.ratios=[0.5,0.5]"], "mask.ratios"),
    (["ddmim.recon_normalize=pixels"], "recon_normalize"),
    (["nonsense"], "section.key=value"),
    (["model.num_heads=[5,2,4,8]"], "num_heads"),
])
def test_invalid_overrides_are_refused(overrides, message):
    with pytest.raises(UserError, match=message):
        make_config("tiny", overrides)


def test_unknown_preset():
    with pytest.raises(UserError, match="unknown pretrain preset 'huge'"):
        make_config("huge")


def _presets_in(folder, monkeypatch, files: dict[str, str]):
    """Preset files in `folder`, read in place of the shipped ones (both kinds read the same folder)."""
    import ddmim.config_engine as config

    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text)
    monkeypatch.setattr(config.resources, "files", lambda package: folder)


def test_a_preset_composes_its_bases_in_order_and_its_own_values_win(tmp_path, monkeypatch):
    _presets_in(tmp_path, monkeypatch, {
        "_small": "model: {embed_dim: 32, window_size: 4}\ntrain: {batch_size: 16}\n",
        "mid": "base: _small\nmodel: {embed_dim: 48}\noptim: {lr: 1.0e-3}\n",
        "top": "base: [mid, _small]\ntrain: {epochs: 3}\n",
    })
    from ddmim.config import preset_values

    values = preset_values("top")
    assert values["model"] == {"embed_dim": 32, "window_size": 4}  # _small, listed after mid, wins over it
    assert values["optim"] == {"lr": 1e-3} and values["train"] == {"batch_size": 16, "epochs": 3}
    assert values["name"] == "top" and "base" not in values
    assert preset_names() == ["mid", "top"]  # a fragment is not a preset


@pytest.mark.parametrize("files, message", [
    ({"a": "base: b\n", "b": "base: a\n"}, "preset bases form a circle: a -> b -> a"),
    ({"a": "base: _gone\n"}, "preset a names base '_gone', which does not exist"),
])
def test_bad_bases_are_refused(files, message, tmp_path, monkeypatch):
    _presets_in(tmp_path, monkeypatch, files)
    with pytest.raises(UserError, match=message):
        make_config("a")


@pytest.mark.parametrize("preset", ["tiny", "tiny_simmim", "tiny_mae"])
def test_a_config_of_an_earlier_version_is_read_in_the_new_places(preset):
    from ddmim.config import MOVED_KEYS

    new = make_config(preset)
    old = new.to_dict()
    for (section, key), (to_section, to_key) in MOVED_KEYS.items():  # back to the layout checkpoints once saved
        old.setdefault(section, {})[key] = old[to_section].pop(to_key)
    del old["ddmim"], old["mae"]
    assert config_from_dict(old) == new


def test_an_old_style_override_wins_over_the_preset():
    assert make_config("tiny_mae", ["model.decoder_dim=32", "model.decoder_heads=4"]).mae.decoder_dim == 32
    assert make_config("tiny", ["model.proj_out=16"]).ddmim.proj_out == 16
    simmim = make_config("tiny_simmim", ["loss.recon_normalize=all", "loss.tau=0.1"])  # DDMIM's loss keys of before
    assert (simmim.ddmim.recon_normalize, simmim.ddmim.tau) == ("all", 0.1)


def test_a_fine_tuning_config_of_an_earlier_version_drops_the_pretraining_keys():
    from ddmim.finetune_config import finetune_config_from_dict, make_finetune_config

    new = make_finetune_config("tiny")
    old = new.to_dict()
    old["model"].update(proj_hidden=128, proj_out=64, mask_token=False, decoder_dim=512, decoder_depth=8,
                        decoder_heads=16)
    assert finetune_config_from_dict(old) == new


@pytest.mark.parametrize("key, allowed", [
    ("ddmim.recon_normalize", "all, masked"), ("ema.count", "epoch_batches, optimizer_steps"),
    ("optim.schedule", "step, cosine"), ("data.ffcv_order", "random, quasi_random"),
    ("train.kernels", "auto, triton, torch"), ("model.perceptual_tap", "after_next_merge, stage_output"),
])
def test_a_closed_choice_names_its_values(key, allowed):
    with pytest.raises(UserError, match=f"{key} must be one of {allowed}, got 'other'"):
        make_config("tiny", [f"{key}=other"])
    with pytest.raises(UserError, match=f"{key} must be one of"):
        make_config("tiny", [f"{key}=1"])  # a value of another type is no choice either


def test_only_a_method_with_negatives_needs_two_images_per_batch():
    from ddmim.models.factory import pretraining_model

    for preset in ("tiny_simmim", "tiny_mae"):
        pretraining_model(make_config(preset, ["train.batch_size=1"]))
    with pytest.raises(UserError, match="contrastive loss needs negatives"):
        pretraining_model(make_config("tiny", ["train.batch_size=1"]))
