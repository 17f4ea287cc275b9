"""The config files load, validate, and apply their ablations."""

import jax
import pytest
from absl import flags
from ml_collections import config_flags

from configs import ablations, demo, mvsa, paper
from fashion_msa.model import factory, msa


@pytest.mark.parametrize("module", [demo, mvsa, paper])
def test_config_builds_a_model_config(module):
    config = module.get_config()
    model_config = msa.ModelConfig.from_config(config.model)
    assert model_config.fusion == "paper"
    assert model_config.modalities == msa.MODALITIES
    assert config.train.batch_size > 0
    assert config.data.selection_split == "val"


def test_paper_config_has_the_paper_settings():
    config = paper.get_config()
    assert config.data.source == "fashion_senti"
    assert config.model.clip.preset == "vit-b-32"
    assert config.train.tower_learning_rate == 1e-5
    assert config.train.head_learning_rate == 5e-4
    assert config.train.weight_decay == 0.01
    assert config.train.grad_clip_norm == 1.0
    assert config.train.batch_size == 32
    assert config.train.pretrain_epochs == 2
    assert config.train.finetune_epochs == 10


def test_paper_model_has_vit_b32_shapes():
    config = paper.get_config()
    model = factory.create_model(config.model)
    # eval_shape builds the parameter shapes without allocating ViT-B/32.
    params = jax.eval_shape(lambda: msa.init_params(model, jax.random.key(0)))
    count = factory.count_parameters(params["clip"])
    # transformers.CLIPModel(CLIPConfig()), the ViT-B/32 shape, has 151,277,313
    # parameters (counted with transformers 5.25).
    assert count == 151_277_313


def test_mvsa_default_input_is_the_shared_copy():
    config = mvsa.get_config()
    assert config.data.input_dir.endswith("shared/data/mvsa_single")
    assert config.data.test_split == ""


@pytest.mark.parametrize(
    "name, fusion, modalities, use_adapter, pretrain",
    [
        ("full", "paper", msa.MODALITIES, True, True),
        ("no_pretraining", "paper", msa.MODALITIES, True, False),
        ("no_adapter", "paper", msa.MODALITIES, False, False),
        ("attention", "attention", msa.MODALITIES, True, True),
        ("text_only", "concat", ("text",), True, True),
        (
            "I+T+A+Ip",
            "concat",
            ("text", "image", "attributes", "pseudo_image"),
            True,
            True,
        ),
    ],
)
def test_ablations(name, fusion, modalities, use_adapter, pretrain):
    config = demo.get_config(name)
    model_config = msa.ModelConfig.from_config(config.model)
    assert model_config.fusion == fusion
    assert model_config.modalities == modalities
    assert model_config.use_adapter == use_adapter
    assert config.model.pretrain_adapter == pretrain


def test_unknown_ablation_rejected():
    with pytest.raises(ValueError, match="unknown ablation"):
        ablations.apply(demo.get_config(), "T+X")


def test_config_file_argument_selects_ablation():
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values)
    flag_values(["prog", "--config=configs/demo.py:text_only"])
    assert flag_values.config.model.modalities == "text"
    assert flag_values.config.model.fusion == "concat"
