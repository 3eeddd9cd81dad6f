import pytest
import yaml

from mnv_train import recipe as recipes
from mnv_train.errors import UserError

from conftest import TINY, merge


def test_unknown_key_names_key_and_closest_valid_key():
    with pytest.raises(UserError, match=r"unknown recipe key 'optim.lrr'; did you mean 'lr'\?"):
        recipes.from_dict(merge(TINY, {'optim': {'lrr': 0.1}}))


def test_unknown_section_is_named():
    with pytest.raises(UserError, match=r"unknown recipe key 'optimizer'; did you mean 'optim'\?"):
        recipes.from_dict({'optimizer': {}})


@pytest.mark.parametrize('change, message', [
    ({'optim': {'lr': 'fast'}}, r"optim.lr: expected a number, got 'fast'"),
    ({'schedule': {'epochs': 2.5}}, r'schedule.epochs: expected an integer'),
    ({'ema': {'enabled': 'yes'}}, r'ema.enabled: expected true/false'),
    ({'train': {'amp': 'fp8'}}, r"train.amp: 'fp8' is not one of 'none', 'bf16', 'fp16'"),
    ({'optim': {'lr': -1}}, r'optim.lr: -1 must be > 0'),
    ({'aug': {'scale': [1.0, 0.5]}}, r'aug.scale: expected \[low, high\]'),
    ({'optim': {'betas': [0.9]}}, r'optim.betas: expected two numbers'),
    ({'schedule': {'epochs': 5, 'warmup_epochs': 5}}, r'warmup_epochs \(5.0\) must be below'),
    ({'data': {'extra_evals': [[448]]}}, r'data.extra_evals: expected \[img_size, crop_pct\] pairs'),
    ({'schedule': {'train_size_ramp': {'start_size': 32, 'end_epoch': 1}}}, r'start_size \(32\) must be below '
     r'data.img_size \(32\)'),
    ({'schedule': {'train_size_ramp': {'start_size': 16, 'end_epoch': 3}}}, r'end_epoch \(3\) < the run\'s 2'),
    ({'schedule': {'train_size_ramp': {'start_size': 16, 'end_epoch': 2}}}, r'end_epoch \(2\) < the run\'s 2'),
    ({'schedule': {'train_size_ramp': {'start_size': 16, 'end_epoch': 1}}, 'data': {'pipeline': 'dali'}},
     r'train_size_ramp runs with data.pipeline host only'),
])
def test_wrong_type_or_range_names_the_key_path(change, message):
    with pytest.raises(UserError, match=message):
        recipes.from_dict(merge(TINY, change))


def test_data_decode_device_is_retired_in_one_line_pointing_to_dali_and_a_saved_host_value_still_loads():
    with pytest.raises(UserError, match=r"^data.decode 'device' was retired: .*data.pipeline dali") as error:
        recipes.load('mnv4_conv_small', ['data.decode=device'])
    assert '\n' not in str(error.value)
    saved = recipes.from_dict(merge(TINY, {'data': {'decode': 'host'}}))  # every recipe saved before held it
    assert 'decode' not in saved.to_dict()['data'] and saved == recipes.from_dict(TINY)


def test_ints_are_accepted_where_numbers_are_expected():
    assert recipes.from_dict(merge(TINY, {'optim': {'lr': 1}})).optim.lr == 1.0


def test_base_inheritance_merges_sections(tmp_path):
    (tmp_path / 'parent.yaml').write_text(yaml.safe_dump(TINY))
    (tmp_path / 'child.yaml').write_text(yaml.safe_dump({'base': 'parent', 'optim': {'lr': 0.5}}))
    recipe = recipes.load(str(tmp_path / 'child.yaml'))
    assert recipe.name == 'child'
    assert recipe.optim.lr == 0.5
    assert recipe.optim.weight_decay == TINY['optim']['weight_decay']
    assert recipe.data.img_size == TINY['data']['img_size']


def test_a_base_beside_the_recipe_comes_before_the_shipped_one_of_that_name(tmp_path):
    shipped = recipes.load('mnv4_conv_small_tf')
    copy = recipes.load_raw(str(recipes.RECIPES_DIR / 'mnv4_conv_small_tf.yaml'))
    (tmp_path / 'mnv4_conv_small_tf.yaml').write_text(yaml.safe_dump(merge(copy, {'optim': {'lr': 0.0005}})))
    (tmp_path / 'mine.yaml').write_text('base: mnv4_conv_small_tf\n')
    assert shipped.optim.lr != 0.0005
    assert recipes.load(str(tmp_path / 'mine.yaml')).optim.lr == 0.0005  # the edited copy beside it


def test_base_chain_loop_is_an_error(tmp_path):
    (tmp_path / 'a.yaml').write_text('base: b\n')
    (tmp_path / 'b.yaml').write_text('base: a\n')
    with pytest.raises(UserError, match='loops back'):
        recipes.load(str(tmp_path / 'a.yaml'))


def test_set_overrides_nested_keys_with_yaml_values(tmp_path):
    path = tmp_path / 'r.yaml'
    path.write_text(yaml.safe_dump(TINY))
    recipe = recipes.load(str(path), ['optim.lr=2.5e-4', 'aug.scale=[0.2, 1.0]', 'ema.enabled=false'])
    assert recipe.optim.lr == 0.00025  # 1e-3 style numbers are numbers, not YAML 1.1 strings
    assert recipe.aug.scale == [0.2, 1.0]
    assert recipe.ema.enabled is False
    with pytest.raises(UserError, match=r"unknown recipe key 'optim.wd'"):
        recipes.load(str(path), ['optim.wd=0.1'])
    with pytest.raises(UserError, match='expected key.path=value'):
        recipes.load(str(path), ['optim.lr'])


def test_recipe_name_resolves_to_recipes_folder_and_suggests_close_names():
    assert recipes.resolve_path('fmnist_mnv4_conv_small') == recipes.RECIPES_DIR / 'fmnist_mnv4_conv_small.yaml'
    with pytest.raises(UserError, match="did you mean 'fmnist_mnv4_conv_small'"):
        recipes.resolve_path('fmnist_mnv4_conv_smal')


def test_broken_yaml_is_reported_with_its_line(tmp_path):
    path = tmp_path / 'bad.yaml'
    path.write_text('optim:\n  lr: [1, 2\n')
    with pytest.raises(UserError, match=r'bad.yaml line \d+: not valid YAML'):
        recipes.load(str(path))


def test_resolved_recipe_round_trips_through_yaml():
    recipe = recipes.from_dict(TINY)
    assert recipes.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def test_every_shipped_recipe_loads():
    names = [r.name for r in recipes.list_recipes()]
    assert 'fmnist_mnv4_conv_small' in names
